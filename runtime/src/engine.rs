//! The engine: a loaded model, its tokenizer, and the KV cache it owns, with
//! generation on top of the batch-first [`Llama::forward`].
//!
//! [`Engine::generate_batch`] runs several requests as one batch — prefill of
//! all prompts in one step, then one decode step for every unfinished
//! sequence at a time — which is the same step loop the server's scheduler
//! drives with requests joining and leaving between steps.
//!
//! The engine holds one [`DepthProfile`] ([`Engine::set_depth`]), which
//! [`Engine::generate_batch`] honours for every request: full depth; static
//! exit (prompt and decode run the first `k` layers); CALM dynamic exit
//! (prompts run every layer, decode tokens may exit, see [`crate::model::exit`]);
//! or lossless self-speculative decoding (prompts at full depth, then
//! [`Engine::speculative_step`]s; greedy requests only). Each [`Generation`]
//! reports what the profile did in [`DepthStats`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arqon_variants::DepthProfile;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::chat::{ChatTemplate, Message, CHATML_TEMPLATE};
use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::{read_config, SafetensorsFolder};
use crate::model::{rows, DecodeGraphs, KvCache, Llama, LogitsFor, LoraAdapter, SeqChunk, SeqId, StepOutput, StepPlan};
use crate::sampling::{RowWeights, Sampler, SamplingParams, StopScan, StopStrings};
use crate::speculative::{speculative_step, SpecInput, SpecResult};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// A model ready to run: decoder, tokenizer and chat template.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (the checkpoint's, or ChatML when it has none).
    pub chat: ChatTemplate,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Loads a GGUF file or a Hugging Face folder to run on the CPU.
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_on(path, &Device::Cpu)
}

/// Loads a GGUF file or a Hugging Face folder to run on `device` (see
/// [`crate::device::open`]): weights, and the KV caches the model makes, live there.
pub fn load_on(path: &Path, device: &Device) -> Result<LoadedModel> {
    let (model, tokenizer) = if path.is_dir() {
        let (cfg, special) = read_config(path)?;
        let tokenizer = Tokenizer::from_hf_dir(path, special.bos, &special.eos)?;
        let weights = SafetensorsFolder::open(path)?.weights(&cfg, device)?;
        (Llama::new(cfg, weights, device.clone())?, tokenizer)
    } else {
        let mut f = GgufFile::open(path)?;
        let cfg = f.config()?;
        let tokenizer = Tokenizer::from_gguf(&f.vocab()?)?;
        let weights = f.weights(&cfg, device)?;
        (Llama::new(cfg, weights, device.clone())?, tokenizer)
    };
    // The engine may run on another thread (its own stream).
    crate::device::settle(device)?;
    assemble(model, tokenizer, path)
}

/// Completes a [`LoadedModel`] from a decoder and its tokenizer (adds the chat template).
pub(crate) fn assemble(model: Llama, tokenizer: Tokenizer, source: &Path) -> Result<LoadedModel> {
    let text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    let eos = text(tokenizer.stop_ids().first().copied());
    let chat = ChatTemplate::new(tokenizer.chat_template().unwrap_or(CHATML_TEMPLATE), &text(tokenizer.bos()), &eos)?;
    Ok(LoadedModel { model, tokenizer, chat, source: source.to_path_buf() })
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// At most this many new tokens.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output text).
    pub stop: Vec<String>,
    /// Extra token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// No stop (token or string) before this many new tokens (vLLM's
    /// `min_tokens`): the stop tokens are masked out until then.
    pub min_tokens: usize,
    /// A LoRA adapter applied to this sequence at run time (loaded for this model).
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl GenerateRequest {
    /// A greedy request for `max_tokens` tokens after `prompt_ids`.
    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt_ids,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            adapter: None,
        }
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Seconds spent in the prefill step.
    pub prefill_s: f64,
    /// Seconds spent in decode steps.
    pub decode_s: f64,
    /// Prompt tokens per second of prefill.
    pub prefill_tokens_per_s: f64,
    /// Generated tokens per second of decode (first token excluded: it comes from prefill).
    pub decode_tokens_per_s: f64,
}

/// The result of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The prompt's ids.
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids (an end-of-generation token, if produced, is the last).
    pub token_ids: Vec<u32>,
    /// Generated text (stop strings and special tokens removed).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// How long it took.
    pub timings: Timings,
    /// What the engine's depth profile did.
    pub depth: DepthStats,
}

/// What a depth profile did for one request's decode tokens (those after
/// the first, which comes from prefill).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DepthStats {
    /// The profile's tag (`full`, `exit12`, `calm8@0.90`, `spec10x4`).
    pub profile: String,
    /// Decoder layers run per decode token. For exit profiles this is the
    /// mean exit depth; for self-speculative decoding it counts draft and
    /// verification layers together, per token emitted.
    pub mean_layers: f64,
    /// Tokens drafted (self-speculative only).
    pub drafted: usize,
    /// Drafts accepted (self-speculative only).
    pub accepted: usize,
    /// `accepted / drafted` (0 when nothing was drafted).
    pub acceptance_rate: f64,
    /// Verification steps run (self-speculative only).
    pub verify_steps: usize,
}

/// Running totals behind [`DepthStats`].
#[derive(Debug, Clone, Copy, Default)]
struct DepthTally {
    layers: usize,
    tokens: usize,
    drafted: usize,
    accepted: usize,
    verify_steps: usize,
}

impl DepthTally {
    fn stats(&self, profile: &DepthProfile) -> DepthStats {
        let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        DepthStats {
            profile: profile.tag(),
            mean_layers: ratio(self.layers, self.tokens),
            drafted: self.drafted,
            accepted: self.accepted,
            acceptance_rate: ratio(self.accepted, self.drafted),
            verify_steps: self.verify_steps,
        }
    }
}

/// The per-sequence state of a running generation: sampler, detokenizer,
/// stop-string matcher, and what has been produced.
#[derive(Debug)]
pub struct SequenceState {
    /// The sequence's id in the KV cache.
    pub seq: SeqId,
    req: GenerateRequest,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stops: StopStrings,
    /// Generated ids so far.
    pub token_ids: Vec<u32>,
    /// Text emitted so far.
    pub text: String,
    /// Set once the sequence has finished.
    pub finish: Option<FinishReason>,
}

impl SequenceState {
    /// Validates `req` against the model and prepares its state.
    pub fn new(seq: SeqId, req: GenerateRequest, context: usize) -> Result<Self> {
        if req.prompt_ids.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty: give at least one token".into()));
        }
        if req.max_tokens == 0 {
            return Err(Error::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if req.min_tokens > req.max_tokens {
            return Err(Error::InvalidRequest(format!(
                "min_tokens ({}) must not exceed max_tokens ({})",
                req.min_tokens, req.max_tokens
            )));
        }
        if req.prompt_ids.len() + req.max_tokens > context {
            return Err(Error::ContextOverflow {
                prompt_tokens: req.prompt_ids.len(),
                max_tokens: req.max_tokens,
                context,
            });
        }
        let sampler = Sampler::new(req.sampling.clone(), &req.prompt_ids)?;
        let stops = StopStrings::new(&req.stop);
        let detok = IncrementalDecoder::continuing(&req.prompt_ids);
        Ok(SequenceState { seq, req, sampler, detok, stops, token_ids: Vec::new(), text: String::new(), finish: None })
    }

    /// The request being served.
    pub fn request(&self) -> &GenerateRequest {
        &self.req
    }

    /// Samples from `logits`, updates text and finish state, and returns the
    /// new text to stream (possibly empty).
    pub fn accept(&mut self, logits: &mut [f32], tok: &Tokenizer) -> Result<String> {
        if self.token_ids.len() < self.req.min_tokens {
            let eos = tok.stop_ids().iter().filter(|_| !self.req.ignore_eos);
            for &id in eos.chain(&self.req.stop_token_ids) {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let id = self.sampler.sample(logits);
        self.accept_token(id, tok)
    }

    /// Whether `min_tokens` are out: before, [`SequenceState::accept`]
    /// masks the stop ids in the whole row.
    fn past_min_tokens(&self) -> bool {
        self.token_ids.len() >= self.req.min_tokens
    }

    /// Whether its next token is the plain argmax of the logits (plain
    /// greedy, and past `min_tokens`): then the argmax alone may be taken,
    /// on the device or by self-speculation, with [`SequenceState::accept_token`].
    pub fn takes_argmax(&self) -> bool {
        plain_greedy(&self.req.sampling) && self.past_min_tokens()
    }

    /// How many of the row's best logits its next token needs when it needs
    /// no others (see [`Sampler::candidates_needed`]), past `min_tokens`
    /// (which masks stop ids in the whole row): then the device may pick
    /// them and [`SequenceState::accept_candidates`] draws from them.
    pub fn takes_candidates(&self, max: usize) -> Option<usize> {
        self.past_min_tokens().then(|| self.sampler.candidates_needed(max)).flatten()
    }

    /// Draws the next token from the row's best `(id, logit)` pairs (see
    /// [`SequenceState::takes_candidates`]) and takes it as
    /// [`SequenceState::accept`] does: the token `accept` picks from the row.
    pub fn accept_candidates(&mut self, candidates: &[(u32, f32)], tok: &Tokenizer) -> Result<String> {
        let id = self.sampler.sample_candidates(candidates);
        self.accept_token(id, tok)
    }

    /// Whether its next token, from a row of `vocab` logits, needs of the
    /// row only its weights and one chunk (see
    /// [`Sampler::chunked_draw`]), past `min_tokens`.
    pub fn takes_chunked(&self, vocab: usize) -> bool {
        self.past_min_tokens() && self.sampler.chunked_draw(vocab)
    }

    /// The sampling settings a device needs to weigh its row: `(temperature, min_p)`.
    pub fn temperature_and_min_p(&self) -> (f32, f32) {
        (self.req.sampling.temperature, self.req.sampling.min_p)
    }

    /// Draws the next token from the row's `weights` and `chunk(c)`, its
    /// logits of chunk `c` (see [`SequenceState::takes_chunked`]), and takes
    /// it as [`SequenceState::accept`] does.
    pub fn accept_chunked(
        &mut self,
        weights: &RowWeights,
        chunk: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
        tok: &Tokenizer,
    ) -> Result<String> {
        let id = self.sampler.sample_chunked(weights, chunk)?;
        self.accept_token(id, tok)
    }

    /// Whether its next token, from a row of `vocab` logits, is a top-p draw
    /// over the whole row (see [`Sampler::nucleus_draw`]), past `min_tokens`.
    pub fn takes_nucleus(&self, vocab: usize) -> bool {
        self.past_min_tokens() && self.sampler.nucleus_draw(vocab)
    }

    /// Draws the next token from the row's `weights` and best `candidates`
    /// (of `of_best`; see [`Sampler::sample_nucleus`]), or, when its nucleus
    /// may reach past them, from the whole row, `row()`; takes it as
    /// [`SequenceState::accept`] does.
    pub fn accept_nucleus(
        &mut self,
        (weights, candidates, of_best): (&RowWeights, &[(u32, f32)], usize),
        row: &mut dyn FnMut() -> Result<Vec<f32>>,
        tok: &Tokenizer,
    ) -> Result<String> {
        match self.sampler.sample_nucleus(weights, candidates, of_best) {
            Some(id) => self.accept_token(id, tok),
            None => self.accept(&mut row()?, tok),
        }
    }

    /// Takes `id` as the next token without sampling (self-speculative
    /// decoding picks greedy ids itself; penalties are not applied, so use it
    /// only for plain greedy requests) and updates text and finish state as
    /// [`SequenceState::accept`] does.
    pub fn accept_token(&mut self, id: u32, tok: &Tokenizer) -> Result<String> {
        self.token_ids.push(id);
        let is_stop_id =
            (!self.req.ignore_eos && tok.stop_ids().contains(&id)) || self.req.stop_token_ids.contains(&id);
        let mut delta = if self.token_ids.len() < self.req.min_tokens {
            // Too early to stop: the stop strings are not looked for yet.
            self.detok.push(tok, id)?
        } else if is_stop_id {
            // The text held back for a stop string that never came is the
            // model's: it goes out with the end.
            self.finish = Some(FinishReason::Stop);
            self.stops.flush()
        } else {
            let piece = self.detok.push(tok, id)?;
            match self.stops.push(&piece) {
                StopScan::Continue(s) => s,
                StopScan::Stopped(s) => {
                    self.finish = Some(FinishReason::Stop);
                    s
                }
            }
        };
        if self.finish.is_none() && self.token_ids.len() >= self.req.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish == Some(FinishReason::Length) {
            delta.push_str(&self.stops.flush());
        }
        self.text.push_str(&delta);
        Ok(delta)
    }
}

/// A model and the KV cache of its live sequences.
#[derive(Debug)]
pub struct Engine {
    loaded: LoadedModel,
    kv: KvCache,
    next_seq: u64,
    depth: DepthProfile,
    /// Decode steps on fixed buffers, as CUDA graphs on a GPU.
    graphs: DecodeGraphs,
}

impl Engine {
    /// An engine with an empty cache; its decode steps run as graphs where
    /// [`crate::model::graph::enabled_on`] says.
    pub fn new(loaded: LoadedModel) -> Self {
        let kv = loaded.model.new_kv_cache();
        let graphs = DecodeGraphs::for_device(loaded.model.device());
        Engine { loaded, kv, next_seq: 0, depth: DepthProfile::Full, graphs }
    }

    /// Whether [`Engine::generate_batch`]'s decode steps run on fixed
    /// buffers (replayed as CUDA graphs on a GPU; see [`crate::model::graph`]).
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.graphs = DecodeGraphs::new(on);
    }

    /// Holds keys and values in `dtype` from now on (see
    /// [`Llama::new_kv_cache_in`]); only while no sequence is live.
    pub fn set_kv_cache_dtype(&mut self, dtype: DType) -> Result<()> {
        if self.kv.num_sequences() > 0 {
            return Err(Error::InvalidRequest("the KV cache's dtype changes only while it is empty".into()));
        }
        self.kv = self.loaded.model.new_kv_cache_in(dtype)?;
        Ok(())
    }

    /// What the KV cache holds.
    pub fn kv_cache_dtype(&self) -> DType {
        self.kv.shape().dtype
    }

    /// The decode steps' graphs.
    pub fn decode_graphs(&self) -> &DecodeGraphs {
        &self.graphs
    }

    /// Sets the depth profile [`Engine::generate_batch`] runs, after checking
    /// it against the model's layer count.
    pub fn set_depth(&mut self, profile: DepthProfile) -> Result<()> {
        profile.check(self.loaded.model.config().num_layers).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.depth = profile;
        Ok(())
    }

    /// The depth profile in use (default [`DepthProfile::Full`]).
    pub fn depth(&self) -> DepthProfile {
        self.depth
    }

    /// The loaded model.
    pub fn loaded(&self) -> &LoadedModel {
        &self.loaded
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.loaded.tokenizer
    }

    /// The KV cache.
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// The model's context length.
    pub fn context_len(&self) -> usize {
        self.loaded.model.config().max_position_embeddings
    }

    /// Reads the PEFT adapter folder `dir`, checked against this model.
    pub fn load_adapter(&self, dir: &Path) -> Result<Arc<LoraAdapter>> {
        Ok(Arc::new(LoraAdapter::load(dir, self.loaded.model.config(), self.loaded.model.device())?))
    }

    /// Replaces the model with `adapter` merged into its weights (see
    /// [`Llama::merged`]). Only between generations: the cache must be empty.
    pub fn merge_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        if self.kv.num_sequences() > 0 {
            return Err(Error::InvalidRequest("cannot merge an adapter while sequences are live".into()));
        }
        self.loaded.model = self.loaded.model.merged(adapter)?;
        Ok(())
    }

    /// Registers a new sequence in the cache.
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.kv.add(id)?;
        Ok(id)
    }

    /// Frees a sequence's cache.
    pub fn remove_sequence(&mut self, seq: SeqId) {
        self.kv.remove(seq);
    }

    /// One forward step over `batch` (see [`Llama::forward`]).
    pub fn step(&mut self, batch: &[SeqChunk<'_>], which: LogitsFor) -> Result<Tensor> {
        self.loaded.model.forward(batch, &mut self.kv, which)
    }

    /// One forward step over `batch` as `plan` says (see [`Llama::forward_with`]).
    pub fn step_with(&mut self, batch: &[SeqChunk<'_>], which: LogitsFor, plan: StepPlan) -> Result<StepOutput> {
        self.loaded.model.forward_with(batch, &mut self.kv, which, plan)
    }

    /// One lossless self-speculative step for several sequences at once
    /// (see [`crate::speculative`]): each sequence's KV must hold every token
    /// but its `last`; on return it holds every token but the last returned.
    /// Greedy only: the caller applies stop conditions to the returned tokens
    /// in order and drops any after a stop.
    pub fn speculative_step(
        &mut self,
        seqs: &[SpecInput],
        draft_layers: usize,
        draft_tokens: usize,
    ) -> Result<Vec<SpecResult>> {
        speculative_step(&self.loaded.model, &mut self.kv, seqs, draft_layers, draft_tokens)
    }

    /// Tokenizes a plain prompt (adding BOS where the model wants it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.loaded.tokenizer.encode(text, true)
    }

    /// Renders `messages` with the chat template and tokenizes the result.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.loaded.chat.render(messages, true)?;
        // The template writes BOS itself where the model wants one.
        self.loaded.tokenizer.encode(&text, false)
    }

    /// Runs one request to completion, calling `on_text` with each new piece of text.
    pub fn generate(&mut self, req: GenerateRequest, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let mut out = self.generate_batch(vec![req], &mut |_, t| on_text(t))?;
        Ok(out.remove(0))
    }

    /// Runs several requests as one batch to completion. `on_text(i, piece)`
    /// streams request `i`'s text. All sequences are freed on return, error or not.
    pub fn generate_batch(
        &mut self,
        reqs: Vec<GenerateRequest>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generation>> {
        let ctx = self.context_len();
        if matches!(self.depth, DepthProfile::SelfSpeculative { .. }) {
            if let Some(r) = reqs.iter().find(|r| !plain_greedy(&r.sampling) || r.min_tokens > 0) {
                return Err(Error::InvalidRequest(format!(
                    "self-speculative decoding is greedy only (temperature 0, no penalties, no min_tokens), got {:?} \
                     with min_tokens {}",
                    r.sampling, r.min_tokens
                )));
            }
            if reqs.iter().any(|r| r.adapter.is_some()) {
                return Err(Error::InvalidRequest(
                    "self-speculative decoding does not take run-time LoRA adapters: merge the adapter instead".into(),
                ));
            }
        }
        let mut states = Vec::with_capacity(reqs.len());
        for req in reqs {
            let seq = self.add_sequence()?;
            match SequenceState::new(seq, req, ctx) {
                Ok(s) => states.push(s),
                Err(e) => {
                    self.remove_sequence(seq);
                    for s in &states {
                        self.remove_sequence(s.seq);
                    }
                    return Err(e);
                }
            }
        }
        let result = self.run_states(&mut states, on_text);
        for s in &states {
            self.remove_sequence(s.seq);
        }
        result
    }

    fn run_states(
        &mut self,
        states: &mut [SequenceState],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generation>> {
        let profile = self.depth;
        let decode_plan = StepPlan::for_profile(profile);
        // Static exit runs the prompt at its depth too; CALM prompts run every layer.
        let prefill_plan = if matches!(profile, DepthProfile::Dynamic { .. }) { StepPlan::FULL } else { decode_plan };
        let mut tally = vec![DepthTally::default(); states.len()];
        let t0 = Instant::now();
        let chunks: Vec<SeqChunk<'_>> = states
            .iter()
            .map(|s| SeqChunk { seq: s.seq, tokens: &s.req.prompt_ids, adapter: s.req.adapter.as_deref() })
            .collect();
        let out = self.loaded.model.forward_with(&chunks, &mut self.kv, LogitsFor::LastOfEachChunk, prefill_plan)?;
        self.sample_into(states, &(0..states.len()).collect::<Vec<_>>(), &out.logits, on_text)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        loop {
            let live: Vec<usize> = (0..states.len()).filter(|i| states[*i].finish.is_none()).collect();
            if live.is_empty() {
                break;
            }
            if let DepthProfile::SelfSpeculative { draft_layers, draft_tokens } = profile {
                self.speculate_into(states, &live, (draft_layers, draft_tokens), &mut tally, on_text)?;
                continue;
            }
            let last: Vec<[u32; 1]> = live.iter().map(|i| [*states[*i].token_ids.last().unwrap_or(&0)]).collect();
            let chunks: Vec<SeqChunk<'_>> = live
                .iter()
                .zip(&last)
                .map(|(i, t)| SeqChunk { seq: states[*i].seq, tokens: t, adapter: states[*i].req.adapter.as_deref() })
                .collect();
            let (out, _) = self.graphs.forward(
                &self.loaded.model,
                &chunks,
                &mut self.kv,
                LogitsFor::LastOfEachChunk,
                decode_plan,
            )?;
            for (i, l) in live.iter().zip(&out.layers_run) {
                tally[*i].layers += l;
                tally[*i].tokens += 1;
            }
            self.sample_into(states, &live, &out.logits, on_text)?;
        }
        let decode = t1.elapsed();
        Ok(states
            .iter()
            .zip(&tally)
            .map(|(s, t)| self.finish_generation(s, prefill, decode, t.stats(&profile)))
            .collect())
    }

    /// One self-speculative step for the `live` states; feeds the returned
    /// tokens through each state's stop checks, dropping any past a stop.
    fn speculate_into(
        &mut self,
        states: &mut [SequenceState],
        live: &[usize],
        (draft_layers, draft_tokens): (usize, usize),
        tally: &mut [DepthTally],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<()> {
        let inputs: Vec<SpecInput> = live
            .iter()
            .map(|i| SpecInput {
                seq: states[*i].seq,
                last: *states[*i].token_ids.last().unwrap_or(&0),
                max_new: states[*i].req.max_tokens.saturating_sub(states[*i].token_ids.len()).max(1),
            })
            .collect();
        let results = speculative_step(&self.loaded.model, &mut self.kv, &inputs, draft_layers, draft_tokens)?;
        let layers = self.loaded.model.config().num_layers;
        for (r, &i) in results.iter().zip(live) {
            let t = &mut tally[i];
            t.drafted += r.drafted;
            t.accepted += r.accepted;
            t.verify_steps += 1;
            t.layers += r.drafted * draft_layers + (r.drafted + 1) * layers;
            for id in &r.tokens {
                if states[i].finish.is_some() {
                    break;
                }
                t.tokens += 1;
                let delta = states[i].accept_token(*id, &self.loaded.tokenizer)?;
                if !delta.is_empty() {
                    on_text(i, &delta);
                }
            }
        }
        Ok(())
    }

    fn sample_into(
        &self,
        states: &mut [SequenceState],
        which: &[usize],
        logits: &Tensor,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<()> {
        for (row, &i) in rows(logits)?.iter_mut().zip(which) {
            let delta = states[i].accept(row, &self.loaded.tokenizer)?;
            if !delta.is_empty() {
                on_text(i, &delta);
            }
        }
        Ok(())
    }

    fn finish_generation(
        &self,
        s: &SequenceState,
        prefill: Duration,
        decode: Duration,
        depth: DepthStats,
    ) -> Generation {
        let rate = |n: usize, d: Duration| {
            if d.as_secs_f64() > 0.0 {
                n as f64 / d.as_secs_f64()
            } else {
                0.0
            }
        };
        Generation {
            prompt_token_ids: s.req.prompt_ids.clone(),
            token_ids: s.token_ids.clone(),
            text: s.text.clone(),
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
            timings: Timings {
                prefill_s: prefill.as_secs_f64(),
                decode_s: decode.as_secs_f64(),
                prefill_tokens_per_s: rate(s.req.prompt_ids.len(), prefill),
                decode_tokens_per_s: rate(s.token_ids.len().saturating_sub(1), decode),
            },
            depth,
        }
    }
}

/// Whether `p` picks the plain argmax of the model's logits, which is what
/// self-speculative verification compares drafts against.
/// Plain greedy: temperature 0, no penalties and no logit bias (what
/// self-speculative decoding reproduces exactly).
pub(crate) fn plain_greedy(p: &SamplingParams) -> bool {
    p.is_greedy() && p.unpenalised()
}
