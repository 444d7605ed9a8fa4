//! The scheduler: one dedicated OS thread that owns the [`Engine`] (and so the
//! KV cache) and steps the running batch — iteration-level scheduling as Orca
//! and vLLM do it.
//!
//! Each loop iteration is one step boundary:
//! 1. take new jobs off the channel (blocking only when there is nothing to do);
//! 2. free the sequences whose client went away (their event receiver is gone);
//! 3. resume preempted sequences, oldest first, then admit waiting jobs, first
//!    come first served, while the batch has room and the paged KV cache has
//!    free blocks for their prompts (a prompt's `n` choices are a fork group:
//!    the first prefills and the others then fork from it), less the blocks
//!    promised to prompts still prefilling, less a watermark (as vLLM admits);
//! 4. plan one step: one decode token for every running sequence first, then
//!    prefill of newcomers in the rest of the per-step token budget, so a long
//!    prompt never stalls the running streams (a prompt that fits in one
//!    budget is prefilled whole; only longer ones are chunked); while the
//!    step needs more blocks than are free, preempt the latest admitted
//!    sequence (vLLM's recompute preemption): its blocks go back, and it waits
//!    at the head of the line to compute its prompt and tokens again;
//! 5. run it, sample, send each sequence's text to its client, and free
//!    finished ones.
//!
//! Invariants: a step never needs more blocks than are free, so it never fails
//! for want of one (a sequence holds `ceil(tokens / 16)` blocks,
//! [`KvShape::blocks_for`], and validation refused any request that could not
//! fit alone, so the oldest sequence always goes on). A sequence's tokens do
//! not depend on the rest of the batch (the engine's guarantee), so greedy
//! output equals the output alone; a resumed sequence computes its generated
//! tokens again row by row ([`Attention::PerRow`]), exactly as it decoded
//! them, so preemption does not change its output either.
//!
//! HTTP handlers talk to the thread through [`SchedulerHandle`]: a bounded
//! queue (a semaphore of `max_queue` permits; a job holds one until admitted)
//! and one unbounded event channel per job back (bounded by `max_tokens`).

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use arqon_kernels::reference::sampling::MAX_TOP_K;
use arqon_tuner::telemetry::{Cohort, ContextBucket, Event as Telemetry, RequestEvent, StepEvent, TelemetryRing};
use arqon_tuner::units::Micros;
use candle_core::Tensor;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::errors::ApiError;
use super::metrics::Metrics;
use super::validate::{Capacity, JobSpec};
use arqon_variants::DepthProfile;

use crate::control::governor::now_tick;
use crate::control::{VariantPin, VariantSlot, VariantStats};
use crate::engine::{FinishReason, SequenceState};
use crate::model::kv::KvShape;
use crate::model::{rows, sample_op, Attention, DecodeGraphs, KvCache, LogitsFor, SeqChunk, SeqId, StepPlan};
use crate::sampling::{RowWeights, CHUNK};
use crate::speculative::{drafts_for, speculative_step, SpecInput};
use crate::tokenizer::Tokenizer;

/// A token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Its text.
    pub text: String,
    /// Natural log of its probability under the model (before penalties and temperature).
    pub logprob: f32,
}

/// Log-probabilities at one position: the chosen token's and the top ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// The token that was chosen.
    pub chosen: TokenLogprob,
    /// The most likely tokens, most likely first.
    pub top: Vec<TokenLogprob>,
}

/// What the engine thread tells a request's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Choice `choice` produced a token; `text` is the new text (maybe empty, held back for a stop string).
    Token {
        /// Choice index.
        choice: usize,
        /// New text.
        text: String,
        /// Log-probabilities, when asked for.
        logprobs: Option<Logprobs>,
    },
    /// Choice `choice` finished.
    Done {
        /// Choice index.
        choice: usize,
        /// Why.
        finish: FinishReason,
        /// Tokens it generated.
        completion_tokens: usize,
    },
    /// The engine failed on this job; no more events follow.
    Failed(ApiError),
}

/// A queued job: the checked spec, its event channel and its queue slot.
struct Job {
    spec: JobSpec,
    tx: mpsc::UnboundedSender<Event>,
    arrived: Instant,
    /// Held while waiting; dropped on admission, which frees a queue place.
    _slot: OwnedSemaphorePermit,
}

/// The handlers' side of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: std_mpsc::Sender<Job>,
    slots: Arc<Semaphore>,
    max_queue: usize,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("choices", &self.spec.choices()).finish_non_exhaustive()
    }
}

impl SchedulerHandle {
    /// Queues `spec`, or answers at once: [`ApiError::QueueFull`] when every
    /// queue place is taken, [`ApiError::ShuttingDown`] when the engine is gone.
    /// Events arrive on the returned receiver; dropping it cancels the job.
    pub fn submit(&self, spec: JobSpec) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| ApiError::QueueFull)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.tx.send(Job { spec, tx, arrived: Instant::now(), _slot: slot }).map_err(|_| ApiError::ShuttingDown)?;
        Ok(rx)
    }

    /// Jobs queued and not yet admitted.
    pub fn queue_depth(&self) -> usize {
        self.max_queue.saturating_sub(self.slots.available_permits())
    }
}

/// What the engine thread owns and reads.
#[derive(Debug)]
pub struct EngineParts {
    /// The KV cache every variant's sequences share (same base, same shape).
    pub kv: KvCache,
    /// The base's tokenizer (every variant shares it).
    pub tokenizer: Tokenizer,
    /// The variant slot, read once per admitted job.
    pub slot: Arc<VariantSlot>,
    /// Where telemetry goes (never blocks; drops are counted by the ring).
    pub telemetry: Arc<TelemetryRing>,
}

/// Starts the engine thread. It exits once every handle is dropped and its
/// work is done.
pub fn spawn(
    parts: EngineParts,
    cap: Capacity,
    metrics: Arc<Metrics>,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::channel();
    let max_queue = cap.limits.max_queue;
    let handle = SchedulerHandle { tx, slots: Arc::new(Semaphore::new(max_queue)), max_queue };
    let graphs = DecodeGraphs::for_device(parts.kv.device());
    let sched = Scheduler {
        graphs,
        parts,
        cap,
        metrics,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        preempted: VecDeque::new(),
        next_seq: 0,
        tickets: 0,
        steps: 0,
    };
    let thread = std::thread::Builder::new().name("arqon-engine".into()).spawn(move || sched.run())?;
    Ok((handle, thread))
}

/// One running sequence.
struct Running {
    state: SequenceState,
    choice: usize,
    /// Tokens of [`Running::context`] already in the cache.
    prefilled: usize,
    /// After a preemption: the prompt and every generated token but the
    /// last, to compute again before it decodes on from its last token.
    refill: Option<Vec<u32>>,
    /// Its prefix-cache namespace, when it takes part in prefix caching.
    namespace: Option<u64>,
    tx: mpsc::UnboundedSender<Event>,
    logprobs: Option<usize>,
    /// The first choice of its prompt (itself for that one): the choices of
    /// one prompt are a fork group.
    group: SeqId,
    /// Waiting to fork from its group's first choice, which prefills.
    forking: bool,
    arrived: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// The variant the job was admitted on: it runs there to the end.
    variant: VariantPin,
    /// Control or canary share.
    cohort: Cohort,
    /// The client is gone or the sequence finished: free it at the next boundary.
    done: bool,
    /// The sequence ended in an error.
    failed: bool,
}

impl Running {
    /// What it computes before decoding: its prompt, or after a preemption
    /// the prompt and its generated tokens but the last.
    fn context(&self) -> &[u32] {
        self.refill.as_deref().unwrap_or(&self.state.request().prompt_ids)
    }

    /// Whether every token of its context is in the cache: it decodes.
    fn decoding(&self) -> bool {
        self.prefilled == self.context().len()
    }

    /// Blocks it still needs to compute its context (a choice waiting to
    /// fork: its copy of the prompt's partial block), beyond `held`.
    fn prefill_blocks(&self, held: usize) -> usize {
        if self.forking {
            return KvShape::fork_copies(self.state.request().prompt_ids.len());
        }
        KvShape::blocks_for(self.context().len()).saturating_sub(held)
    }
}

/// A planned chunk of a step: (running index, chunk start, chunk length).
type Chunk = (usize, usize, usize);

struct Scheduler {
    parts: EngineParts,
    /// Decode steps on fixed buffers, as CUDA graphs on a GPU.
    graphs: DecodeGraphs,
    cap: Capacity,
    metrics: Arc<Metrics>,
    rx: std_mpsc::Receiver<Job>,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    /// Preempted sequences, oldest first, each with the choices of its
    /// prompt still waiting to fork from it: they resume before any new job.
    preempted: VecDeque<Vec<Running>>,
    next_seq: u64,
    /// Admissions so far (the canary split hashes it).
    tickets: u64,
    /// Steps run so far (an injected fault counts them: [`crate::faults`]).
    steps: u64,
}

impl Scheduler {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() && self.preempted.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.reap();
            self.admit();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            let outbox = self.step();
            self.reap();
            self.publish();
            // Sent after the boundary's bookkeeping, so a client that hears its
            // request finished already sees its KV cache freed in /metrics.
            // A failed send means the client left: `reap` notices next time.
            for (tx, ev) in outbox {
                let _ = tx.send(ev);
            }
        }
    }

    /// Frees finished and cancelled sequences (reporting each to telemetry),
    /// and drops abandoned queued jobs and preempted sequences.
    fn reap(&mut self) {
        for r in self.running.iter_mut().chain(self.preempted.iter_mut().flatten()) {
            if r.tx.is_closed() && !r.done {
                r.done = true;
                self.metrics.cancelled.inc();
            }
        }
        self.settle_fork_groups();
        let kv = &mut self.parts.kv;
        let ring = &self.parts.telemetry;
        let mut end = |r: &Running| {
            kv.remove(r.state.seq);
            VariantStats::sub(&r.variant.stats.running, 1);
            let _ = ring.try_push(Telemetry::Request(request_event(r)));
        };
        self.running.retain(|r| {
            if r.done {
                end(r);
            }
            !r.done
        });
        // A unit's members share their job's channel: they leave together.
        self.preempted.retain(|unit| {
            let gone = unit.iter().all(|r| r.done);
            if gone {
                unit.iter().for_each(&mut end);
            }
            !gone
        });
        self.waiting.retain(|j| !j.tx.is_closed());
    }

    /// A choice still waiting to fork whose first choice ended without
    /// prefilling (it failed) fails too. (Preemption moves a first choice
    /// and the choices waiting on it together, so they never part.)
    fn settle_fork_groups(&mut self) {
        for i in 0..self.running.len() {
            let r = &self.running[i];
            if r.forking && !r.done && !self.running.iter().any(|m| m.state.seq == r.group && !m.done) {
                let r = &mut self.running[i];
                let _ = r.tx.send(Event::Failed(ApiError::Internal("the choice's prompt failed".into())));
                (r.done, r.failed) = (true, true);
            }
        }
    }

    /// Blocks the running sequences still need to compute their prompts
    /// (admitted, not yet prefilled): free blocks already promised.
    fn promised(&self) -> usize {
        let kv = &self.parts.kv;
        let held = |r: &Running| kv.block_table(r.state.seq).map_or(0, <[u32]>::len);
        self.running.iter().filter(|r| !r.done && !r.decoding()).map(|r| r.prefill_blocks(held(r))).sum()
    }

    /// Whether `need` more blocks fit now beside what is promised, keeping
    /// a watermark of 1% of the pool free for the running sequences to grow
    /// into (vLLM's), unless nothing runs.
    fn room_for(&self, need: usize) -> bool {
        let watermark = if self.running.is_empty() { 0 } else { self.cap.kv_blocks.div_ceil(100) };
        need + watermark + self.promised() <= self.parts.kv.blocks_free()
    }

    fn admit(&mut self) {
        let max_batch = self.cap.limits.max_batch;
        // Preempted sequences first, oldest first; new jobs wait behind them.
        while let Some(unit) = self.preempted.front() {
            let need: usize = unit.iter().map(|r| r.prefill_blocks(0)).sum();
            if self.running.len() + unit.len() > max_batch || !self.room_for(need) {
                if self.running.is_empty() {
                    // Cannot happen (it ran before, and alone it fits); never
                    // spin on it: it fails, and the next `reap` drops it.
                    for r in self.preempted.front_mut().expect("front exists") {
                        let _ =
                            r.tx.send(Event::Failed(ApiError::Internal("a preempted sequence cannot resume".into())));
                        (r.done, r.failed) = (true, true);
                    }
                }
                return;
            }
            let unit = self.preempted.pop_front().expect("front exists");
            self.resume(unit);
        }
        while let Some(job) = self.waiting.front() {
            let fits_batch = self.running.len() + job.spec.choices() <= max_batch;
            if !(fits_batch && self.room_for(job.spec.prompt_blocks())) {
                if self.running.is_empty() {
                    // Cannot happen for a checked JobSpec; never spin on it.
                    let job = self.waiting.pop_front().expect("front exists");
                    let _ = job.tx.send(Event::Failed(ApiError::Internal("job can never be admitted".into())));
                    continue;
                }
                break;
            }
            let job = self.waiting.pop_front().expect("front exists");
            self.start(job);
        }
    }

    /// Puts a preempted unit back to work: each sequence starts again on an
    /// empty cache entry (or on what the prefix cache still holds of its
    /// context) and computes its context before it decodes on.
    fn resume(&mut self, unit: Vec<Running>) {
        for mut r in unit {
            let seq = r.state.seq;
            let kv = &mut self.parts.kv;
            let cached = kv.add(seq).and_then(|()| match r.namespace {
                Some(ns) if !r.forking => kv.attach_prefix(seq, ns, r.context()),
                _ => Ok(0),
            });
            match cached {
                Ok(c) => r.prefilled = c,
                Err(e) => {
                    kv.remove(seq);
                    let _ = r.tx.send(Event::Failed(e.into()));
                    (r.done, r.failed) = (true, true);
                }
            }
            self.running.push(r);
        }
    }

    /// Preempts the latest admitted sequence (with the choices waiting to
    /// fork from it): frees its blocks and queues it to compute its context
    /// again. False when nothing runs.
    fn preempt(&mut self) -> bool {
        let Some(i) = (0..self.running.len())
            .filter(|&i| !self.running[i].done && !self.running[i].forking)
            .max_by_key(|&i| self.running[i].state.seq.0)
        else {
            return false;
        };
        let mut unit = vec![self.running.remove(i)];
        let seq = unit[0].state.seq;
        while let Some(j) = self.running.iter().position(|f| f.forking && f.group == seq) {
            unit.push(self.running.remove(j));
        }
        for r in &mut unit {
            self.parts.kv.remove(r.state.seq);
            r.prefilled = 0;
            let (prompt, generated) = (&r.state.request().prompt_ids, &r.state.token_ids);
            r.refill = generated.split_last().map(|(_, before)| [&prompt[..], before].concat());
        }
        self.metrics.preemptions.inc();
        let at = self.preempted.iter().position(|u| u[0].state.seq.0 > seq.0).unwrap_or(self.preempted.len());
        self.preempted.insert(at, unit);
        true
    }

    fn start(&mut self, job: Job) {
        let ctx = self.cap.context;
        // One read of the slot per job: every choice runs on this variant.
        let (variant, cohort) = self.parts.slot.load().pick(self.tickets);
        self.tickets += 1;
        VariantStats::add(&variant.stats.requests, 1);
        let mut started: Vec<Running> = Vec::with_capacity(job.spec.seqs.len());
        for (choice, (req, forks)) in job.spec.seqs.into_iter().zip(job.spec.forks).enumerate() {
            let prompt_len = req.prompt_ids.len();
            let seq = SeqId(self.next_seq);
            self.next_seq += 1;
            let group = match started.last() {
                Some(prev) if forks => prev.group,
                _ => seq,
            };
            let kv = &mut self.parts.kv;
            // A prefix computed before on this variant's weights is reused
            // (requests with a run-time adapter neither reuse nor publish);
            // a fork gets its prompt from its group's first choice.
            let namespace = (self.cap.limits.prefix_caching && req.adapter.is_none() && !forks)
                .then(|| KvCache::namespace((&variant.name, variant.vid.0, &variant.source, &variant.quantization)));
            let prompt = req.prompt_ids.clone();
            let state = kv.add(seq).and_then(|()| {
                let cached = match namespace {
                    Some(ns) => kv.attach_prefix(seq, ns, &prompt),
                    None => Ok(0),
                };
                let state = cached.and_then(|c| SequenceState::new(seq, req, ctx).map(|s| (s, c)));
                if state.is_err() {
                    kv.remove(seq);
                }
                state
            });
            match state {
                Ok((state, cached)) => {
                    if !forks {
                        // Once per prompt, as `usage` counts it: its forks do not compute it.
                        self.metrics.prompt_tokens.add(prompt_len as u64);
                    }
                    if namespace.is_some() {
                        self.metrics.prefix_queried_tokens.add(prompt_len as u64);
                        self.metrics.prefix_hit_tokens.add(cached as u64);
                    }
                    started.push(Running {
                        state,
                        choice,
                        prefilled: cached,
                        refill: None,
                        namespace,
                        tx: job.tx.clone(),
                        logprobs: job.spec.logprobs,
                        group,
                        forking: forks,
                        arrived: job.arrived,
                        first_token_at: None,
                        last_token_at: None,
                        variant: variant.clone(),
                        cohort,
                        done: false,
                        failed: false,
                    });
                }
                Err(e) => {
                    for r in &started {
                        self.parts.kv.remove(r.state.seq);
                    }
                    let _ = job.tx.send(Event::Failed(e.into()));
                    return;
                }
            }
        }
        VariantStats::add(&variant.stats.running, started.len() as u64);
        self.running.extend(started);
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.set(self.running.len() as u64);
        m.preempted.set(self.preempted.iter().map(Vec::len).sum::<usize>() as u64);
        let kv = &self.parts.kv;
        let held = kv.blocks_total() - kv.blocks_free();
        m.kv_bytes.set(kv.bytes());
        m.kv_reserved_bytes.set((held + self.promised()) as u64 * self.cap.kv.block_bytes());
        m.kv_blocks_used.set(held as u64);
        m.kv_blocks_cached.set(kv.blocks_cached() as u64);
        m.kv_sequences.set(kv.num_sequences() as u64);
    }

    /// Plans and runs one step and samples; returns the events to send.
    fn step(&mut self) -> Vec<(mpsc::UnboundedSender<Event>, Event)> {
        // Preempt until the step's blocks are free (so it cannot fail for
        // want of one); with nothing left to preempt the plan is empty.
        let (plan, last) = loop {
            let (plan, last) = self.plan();
            let need = self.blocks_needed(&plan, last.len());
            if need <= self.parts.kv.blocks_free() || !self.preempt() {
                debug_assert!(need <= self.parts.kv.blocks_free() || plan.is_empty());
                break (plan, last);
            }
        };
        self.steps += 1;
        let injected = crate::faults::device_lost_at(self.steps);
        let decodes = last.len();
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .enumerate()
            .map(|(k, &(i, start, len))| {
                let r = &self.running[i];
                let tokens = if k < decodes { &last[k][..] } else { &r.context()[start..start + len] };
                SeqChunk { seq: r.state.seq, tokens, adapter: r.state.request().adapter.as_deref() }
            })
            .collect();
        // One forward per variant: a step batches the sequences of each
        // variant together (a variant's weights serve only its own pins), at
        // that variant's depth; a resumed sequence's generated tokens run in
        // a forward of their own, row by row.
        let per_row: Vec<bool> = plan.iter().enumerate().map(|(k, &e)| k >= decodes && self.refills(e)).collect();
        let groups = self.variant_groups(&plan, &per_row);
        // First choices whose forks wait to draw from their prompt's logits.
        let leaders: Vec<SeqId> = self.running.iter().filter(|r| r.forking).map(|r| r.group).collect();
        let mut outputs: Vec<Option<StepOut>> = vec![None; plan.len()];
        let mut outbox = Vec::with_capacity(plan.len() + 1);
        let mut failed = Vec::new();
        for members in &groups {
            let variant = self.running[plan[members[0]].0].variant.clone();
            let t0 = Instant::now();
            // On a self-speculative variant, plain greedy decodes speculate;
            // everything else (prefill, sampled, logprobs, adapters) runs a
            // normal full-depth step.
            let (spec, normal): (Vec<usize>, Vec<usize>) = match variant.depth {
                DepthProfile::SelfSpeculative { .. } => {
                    members.iter().partition(|&&k| k < decodes && speculable(&self.running[plan[k].0]))
                }
                _ => (Vec::new(), members.clone()),
            };
            if let DepthProfile::SelfSpeculative { draft_layers, draft_tokens } = variant.depth {
                if !spec.is_empty() {
                    let inputs: Vec<SpecInput> = spec
                        .iter()
                        .map(|&k| {
                            let r = &self.running[plan[k].0];
                            let max_new = r.state.request().max_tokens - r.state.token_ids.len();
                            SpecInput { seq: r.state.seq, last: last[k][0], max_new }
                        })
                        .collect();
                    let result = match &injected {
                        Some(why) => Err(crate::faults::step_error(self.parts.kv.device(), why)),
                        None => {
                            speculative_step(&variant.model, &mut self.parts.kv, &inputs, draft_layers, draft_tokens)
                        }
                    };
                    match result {
                        Ok(results) => {
                            for (&k, res) in spec.iter().zip(results) {
                                self.metrics.spec_drafted.add(res.drafted as u64);
                                self.metrics.spec_accepted.add(res.accepted as u64);
                                outputs[k] = Some(StepOut::Tokens(res.tokens));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, variant = %variant.name, "speculative step failed");
                            failed.push((spec.clone(), ApiError::from(e)));
                        }
                    }
                }
            }
            if !normal.is_empty() {
                let group_chunks: Vec<SeqChunk<'_>> = normal.iter().map(|&k| chunks[k]).collect();
                let mut step_plan = StepPlan::for_profile(variant.depth);
                if per_row[members[0]] {
                    step_plan.attention = Attention::PerRow;
                }
                let on_device = sample_op::enabled_on(variant.model.device());
                let vocab = variant.model.config().vocab_size;
                let needs: Vec<RowNeed> = normal
                    .iter()
                    .map(|&k| self.row_need(plan[k], k >= decodes, &leaders, (on_device, vocab)))
                    .collect();
                for n in &needs {
                    self.metrics.rows_taken[n.index()].add(1);
                }
                let result = match &injected {
                    Some(why) => Err(crate::faults::step_error(self.parts.kv.device(), why)),
                    None => self.graphs.forward(
                        &variant.model,
                        &group_chunks,
                        &mut self.parts.kv,
                        LogitsFor::LastOfEachChunk,
                        step_plan,
                    ),
                };
                let result = result.and_then(|(o, path)| {
                    self.metrics.engine_steps[path.index()].add(1);
                    step_outs(&o.logits, &needs)
                });
                match result {
                    Ok(outs) => {
                        for (&k, out) in normal.iter().zip(outs) {
                            outputs[k] = Some(out);
                        }
                    }
                    Err(e) => {
                        // The cache is unchanged on error; fail this variant's
                        // sequences of the step, keep serving the others.
                        tracing::error!(error = %e, variant = %variant.name, "engine step failed");
                        failed.push((normal.clone(), ApiError::from(e)));
                    }
                }
            }
            let tokens: usize = members.iter().map(|&k| chunks[k].tokens.len()).sum();
            let _ = self.parts.telemetry.try_push(Telemetry::Step(StepEvent {
                at: now_tick(),
                variant: variant.vid,
                cohort: self.running[plan[members[0]].0].cohort,
                batch_size: members.len() as u32,
                tokens: tokens as u32,
                step_time: Micros(t0.elapsed().as_micros() as u64),
            }));
        }
        drop(chunks);
        if !failed.is_empty() && self.metrics.device_lost.get().is_none() {
            if let Some(why) = injected.or_else(|| crate::device::lost(self.parts.kv.device())) {
                tracing::error!(error = %why, "the device is lost: the server drains and exits");
                let _ = self.metrics.device_lost.set(why);
            }
        }
        for (members, err) in failed {
            for k in members {
                let r = &mut self.running[plan[k].0];
                outbox.push((r.tx.clone(), Event::Failed(err.clone())));
                r.done = true;
                r.failed = true;
            }
        }
        let tok = &self.parts.tokenizer;
        let now = Instant::now();
        for (k, &(i, _, len)) in plan.iter().enumerate() {
            let Some(out) = outputs[k].as_mut() else { continue };
            let r = &mut self.running[i];
            if k >= decodes {
                r.prefilled += len;
                if r.prefilled < r.context().len() {
                    continue; // mid-prompt chunk: its logits are not a prediction
                }
                if r.refill.take().is_some() {
                    // Resumed: its last token was sampled before; it decodes on from it.
                    r.prefilled = r.state.request().prompt_ids.len();
                    continue;
                }
                if let StepOut::Logits(row) = out {
                    // The prompt is cached: its group's other choices fork
                    // from it and draw their first token from the same logits.
                    let seq = r.state.seq;
                    for f in self.running.iter_mut().filter(|f| f.forking && f.group == seq && !f.done) {
                        f.forking = false;
                        match self.parts.kv.fork(seq, f.state.seq) {
                            Ok(()) => {
                                f.prefilled = f.state.request().prompt_ids.len();
                                sample_one(f, &mut row.clone(), tok, &self.metrics, now, &mut outbox);
                            }
                            Err(e) => {
                                outbox.push((f.tx.clone(), Event::Failed(e.into())));
                                (f.done, f.failed) = (true, true);
                            }
                        }
                    }
                }
            }
            let r = &mut self.running[i];
            match out {
                StepOut::Logits(row) => sample_one(r, row, tok, &self.metrics, now, &mut outbox),
                StepOut::Chunked { row, weights } => {
                    let vocab = row.dim(0).unwrap_or(0);
                    let mut chunk = |c: usize| {
                        let start = (c * CHUNK).min(vocab);
                        host_row(&row.narrow(0, start, CHUNK.min(vocab - start))?)
                    };
                    let text = r.state.accept_chunked(weights, &mut chunk, tok);
                    took(r, text, &self.metrics, now, &mut outbox);
                }
                StepOut::Nucleus { row, weights, candidates } => {
                    let text = r.state.accept_nucleus((weights, candidates, MAX_TOP_K), &mut || host_row(row), tok);
                    took(r, text, &self.metrics, now, &mut outbox);
                }
                StepOut::Candidates(c) => {
                    let text = r.state.accept_candidates(c, tok);
                    took(r, text, &self.metrics, now, &mut outbox);
                }
                StepOut::Tokens(ids) => {
                    for &id in ids.iter() {
                        take_one(r, id, tok, &self.metrics, now, &mut outbox);
                        if r.done {
                            break; // a stop among the accepted tokens: the rest are dropped
                        }
                    }
                }
            }
        }
        outbox
    }

    /// What the host needs of plan entry `(i, start, len)`'s logits (rows of
    /// `vocab`): nothing but a token for a chunk in the middle of a prompt
    /// (dropped); with sampling on the device (`on_device`), a plain greedy
    /// row's argmax, a top-k row's best candidates, a row drawn at a
    /// temperature (and min-p) alone its weights and one chunk; the whole
    /// row otherwise: logprobs, penalties, top-p, forks of it waiting to draw
    /// from it (`leaders`).
    fn row_need(
        &self,
        (i, start, len): Chunk,
        prefill: bool,
        leaders: &[SeqId],
        (on_device, vocab): (bool, usize),
    ) -> RowNeed {
        let r = &self.running[i];
        if !on_device {
            return RowNeed::Logits;
        }
        if prefill && (start + len < r.context().len() || r.refill.is_some()) {
            return RowNeed::Argmax;
        }
        if r.logprobs.is_some() || leaders.contains(&r.state.seq) {
            return RowNeed::Logits;
        }
        if r.state.takes_argmax() {
            return RowNeed::Argmax;
        }
        if let Some(k) = r.state.takes_candidates(MAX_TOP_K) {
            return RowNeed::Candidates(k);
        }
        if r.state.takes_chunked(vocab) {
            let (t, min_p) = r.state.temperature_and_min_p();
            return RowNeed::Chunked(t, min_p);
        }
        if r.state.takes_nucleus(vocab) {
            let (t, min_p) = r.state.temperature_and_min_p();
            return RowNeed::Nucleus(t, min_p);
        }
        RowNeed::Logits
    }

    /// The step's plan, `(running index, chunk start, chunk length)` per
    /// chunk (decode first, then prefill), and the decode chunks' tokens.
    fn plan(&self) -> (Vec<Chunk>, Vec<[u32; 1]>) {
        let mut plan: Vec<Chunk> = Vec::new();
        let mut last = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.decoding() {
                plan.push((i, 0, 1));
                last.push([*r.state.token_ids.last().expect("prefilled sequences have sampled")]);
            }
        }
        let step_tokens = self.cap.limits.step_tokens.get();
        let mut budget = step_tokens.saturating_sub(plan.len());
        for (i, r) in self.running.iter().enumerate() {
            let (left, prompt) = (r.context().len() - r.prefilled, r.state.request().prompt_ids.len());
            if left > 0 && budget > 0 && !r.forking {
                // A prompt that fits in one step's budget is prefilled whole (the
                // step may overshoot the budget by less than one budget): how a
                // prompt is split changes attention's float summation order, so
                // only prompts longer than a whole budget are chunked. That keeps
                // greedy output independent of the batch for such prompts. A
                // resumed sequence computes its prompt so too, then its
                // generated tokens row by row, where any split is exact.
                let take = match prompt.checked_sub(r.prefilled).filter(|&p| p > 0) {
                    Some(p) if p <= step_tokens => p,
                    Some(p) => p.min(budget),
                    None => left.min(budget),
                };
                plan.push((i, r.prefilled, take));
                budget = budget.saturating_sub(take);
            }
        }
        (plan, last)
    }

    /// Whether plan entry `(i, start, _)`, a prefill chunk, is a resumed
    /// sequence's generated tokens, computed again row by row.
    fn refills(&self, (i, start, _): Chunk) -> bool {
        let r = &self.running[i];
        r.refill.is_some() && start >= r.state.request().prompt_ids.len()
    }

    /// New blocks the step of `plan` takes (its first `decodes` entries
    /// decode): each chunk's growth, a self-speculative step's drafts
    /// included, and the partial-block copies of the choices that fork from
    /// a prompt finishing in it.
    fn blocks_needed(&self, plan: &[Chunk], decodes: usize) -> usize {
        let kv = &self.parts.kv;
        let mut need = 0;
        for (k, &(i, _, len)) in plan.iter().enumerate() {
            let r = &self.running[i];
            let (cur, held) = (kv.len(r.state.seq).unwrap_or(0), kv.block_table(r.state.seq).map_or(0, <[u32]>::len));
            let grow = match r.variant.depth {
                DepthProfile::SelfSpeculative { draft_tokens, .. } if k < decodes && speculable(r) => {
                    // `speculative_step`'s peak: the last token and every draft.
                    1 + drafts_for(draft_tokens, r.state.request().max_tokens - r.state.token_ids.len())
                }
                _ => len,
            };
            need += KvShape::blocks_for(cur + grow).saturating_sub(held);
            if k >= decodes && r.refill.is_none() && r.prefilled + len == r.context().len() {
                let forks = self.running.iter().filter(|f| f.forking && f.group == r.state.seq);
                need += forks.map(|f| f.prefill_blocks(0)).sum::<usize>();
            }
        }
        need
    }

    /// Plan entries grouped by the variant their sequence is pinned to, and
    /// by whether they run row by row (`per_row`), in first-appearance order.
    fn variant_groups(&self, plan: &[Chunk], per_row: &[bool]) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (k, &(i, _, _)) in plan.iter().enumerate() {
            let v = &self.running[i].variant;
            let same = |g: &Vec<usize>| {
                per_row[g[0]] == per_row[k] && VariantPin::same(&self.running[plan[g[0]].0].variant, v)
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.push(k),
                None => groups.push(vec![k]),
            }
        }
        groups
    }
}

/// The telemetry record of a sequence that has ended (or failed, or whose
/// client left).
fn request_event(r: &Running) -> RequestEvent {
    let micros = |d: std::time::Duration| Micros(d.as_micros() as u64);
    let n = r.state.token_ids.len();
    let (ttft, itl) = match (r.first_token_at, r.last_token_at) {
        (Some(first), Some(last)) => (
            micros(first.duration_since(r.arrived)),
            if n > 1 { micros(last.duration_since(first) / (n as u32 - 1)) } else { Micros(0) },
        ),
        _ => (micros(r.arrived.elapsed()), Micros(0)),
    };
    // Context bucket: log2 of the prompt length (0..=15).
    let prompt = r.state.request().prompt_ids.len().max(1);
    RequestEvent {
        at: now_tick(),
        variant: r.variant.vid,
        cohort: r.cohort,
        context: ContextBucket((usize::BITS - 1 - prompt.leading_zeros()).min(15) as u16),
        ttft,
        itl,
        tokens: n as u32,
        error: r.failed,
    }
}

/// What one step produced for one sequence.
#[derive(Debug, Clone)]
enum StepOut {
    /// Logits to sample from.
    Logits(Vec<f32>),
    /// Tokens already chosen (a self-speculative step's accepted greedy ids).
    Tokens(Vec<u32>),
    /// A sampled row's best `(id, logit)` pairs, all its draw needs.
    Candidates(Vec<(u32, f32)>),
    /// A sampled row's weights, and the row where it is, for the one chunk
    /// its draw reads.
    Chunked {
        /// The row (`[vocab]`, where the step's logits are).
        row: Tensor,
        /// Its weights.
        weights: RowWeights,
    },
    /// A top-p row's weights and best [`MAX_TOP_K`] pairs, and the row where
    /// it is, read whole only if its nucleus may reach past them.
    Nucleus {
        /// The row (`[vocab]`, where the step's logits are).
        row: Tensor,
        /// Its weights.
        weights: RowWeights,
        /// Its best pairs.
        candidates: Vec<(u32, f32)>,
    },
}

/// A weighed row: the row where it is, its weights (`None`: nothing finite
/// to weigh) and, for a nucleus, its best candidates.
type Weighed = (Tensor, Option<RowWeights>, Vec<(u32, f32)>);

/// What the host takes of one row of a step's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowNeed {
    /// The whole row.
    Logits,
    /// Its greedy token.
    Argmax,
    /// Its best `k` (id, logit) pairs.
    Candidates(usize),
    /// Its weights at this `(temperature, min_p)`, then one chunk.
    Chunked(f32, f32),
    /// Its weights at this `(temperature, min_p)` and its best
    /// [`MAX_TOP_K`], which hold a top-p nucleus that is not too wide.
    Nucleus(f32, f32),
}

impl RowNeed {
    /// Its index in [`Metrics::rows_taken`].
    fn index(self) -> usize {
        match self {
            RowNeed::Logits => 0,
            RowNeed::Argmax => 1,
            RowNeed::Candidates(_) => 2,
            RowNeed::Chunked(..) => 3,
            RowNeed::Nucleus(..) => 4,
        }
    }
}

/// A step's outputs from its `[rows, vocab]` logits, each row as `needs`
/// says: the whole row, or only what its token is drawn from, picked where
/// the logits are ([`sample_op`]), so on a GPU only ids (and a sampled
/// row's candidates) cross to the host.
fn step_outs(logits: &Tensor, needs: &[RowNeed]) -> crate::error::Result<Vec<StepOut>> {
    if needs.iter().all(|n| *n == RowNeed::Logits) {
        return Ok(rows(logits)?.into_iter().map(StepOut::Logits).collect());
    }
    let kind = |n: &RowNeed| std::mem::discriminant(n);
    let some = |like: RowNeed| -> crate::error::Result<Option<Tensor>> {
        let idx: Vec<u32> = (0..needs.len() as u32).filter(|&i| kind(&needs[i as usize]) == kind(&like)).collect();
        Ok(match idx.len() {
            0 => None,
            n if n == needs.len() => Some(logits.clone()),
            n => Some(logits.index_select(&Tensor::from_vec(idx, n, logits.device())?, 0)?),
        })
    };
    let mut ids = match some(RowNeed::Argmax)? {
        Some(t) => sample_op::greedy_ids(&t)?,
        None => Vec::new(),
    }
    .into_iter();
    let ks: Vec<usize> =
        needs.iter().filter_map(|n| if let RowNeed::Candidates(k) = n { Some(*k) } else { None }).collect();
    let mut cands = match some(RowNeed::Candidates(1))? {
        Some(t) => sample_op::top_candidates(&t, &ks)?,
        None => Vec::new(),
    }
    .into_iter();
    // The rows of one weighed kind, each with its weights (and, for a
    // nucleus, its best candidates).
    let weighed = |like: RowNeed| -> crate::error::Result<Vec<Weighed>> {
        let Some(t) = some(like)? else { return Ok(Vec::new()) };
        let params: Vec<(f32, f32)> = needs
            .iter()
            .filter(|n| kind(n) == kind(&like))
            .filter_map(|n| match n {
                RowNeed::Chunked(t, m) | RowNeed::Nucleus(t, m) => Some((*t, *m)),
                _ => None,
            })
            .collect();
        let weights = sample_op::row_weights(&t, &params)?;
        let mut cands = match like {
            RowNeed::Nucleus(..) => sample_op::top_candidates(&t, &vec![MAX_TOP_K; params.len()])?,
            _ => Vec::new(),
        }
        .into_iter();
        weights.into_iter().enumerate().map(|(j, w)| Ok((t.get(j)?, w, cands.next().unwrap_or_default()))).collect()
    };
    let mut chunked = weighed(RowNeed::Chunked(1.0, 0.0))?.into_iter();
    let mut nuclei = weighed(RowNeed::Nucleus(1.0, 0.0))?.into_iter();
    let mut full = match some(RowNeed::Logits)? {
        Some(t) => rows(&t)?,
        None => Vec::new(),
    }
    .into_iter();
    needs
        .iter()
        .map(|need| -> crate::error::Result<StepOut> {
            Ok(match need {
                RowNeed::Logits => StepOut::Logits(full.next().expect("a row per host row")),
                RowNeed::Argmax => StepOut::Tokens(vec![ids.next().expect("an id per greedy row")]),
                RowNeed::Candidates(_) => StepOut::Candidates(cands.next().expect("candidates per sampled row")),
                RowNeed::Chunked(..) => match chunked.next().expect("weights per sampled row") {
                    (row, Some(weights), _) => StepOut::Chunked { row, weights },
                    // Nothing finite to weigh: the host takes the row whole.
                    (row, None, _) => StepOut::Logits(host_row(&row)?),
                },
                RowNeed::Nucleus(..) => match nuclei.next().expect("weights per sampled row") {
                    (row, Some(weights), candidates) => StepOut::Nucleus { row, weights, candidates },
                    (row, None, _) => StepOut::Logits(host_row(&row)?),
                },
            })
        })
        .collect()
}

/// Whether a decoding sequence may take self-speculative steps: plain greedy
/// (speculation picks argmax ids itself), no logprobs, no run-time adapter.
fn speculable(r: &Running) -> bool {
    let req = r.state.request();
    r.state.takes_argmax() && r.logprobs.is_none() && req.adapter.is_none()
}

/// Samples one token for `r` from `row` and queues its events in `outbox`.
fn sample_one(
    r: &mut Running,
    row: &mut [f32],
    tok: &Tokenizer,
    m: &Metrics,
    now: Instant,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
) {
    let lp_top = r.logprobs;
    let raw = lp_top.map(|_| row.to_vec());
    let text = r.state.accept(row, tok);
    let Some(text) = ok_or_fail(r, text, outbox) else { return };
    let id = *r.state.token_ids.last().expect("accept pushed a token");
    let logprobs = raw.map(|raw| logprobs(&raw, id, lp_top.unwrap_or(0), tok));
    emit(r, text, logprobs, m, now, outbox);
}

/// Takes an already chosen token for `r` and queues its events.
fn take_one(
    r: &mut Running,
    id: u32,
    tok: &Tokenizer,
    m: &Metrics,
    now: Instant,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
) {
    let text = r.state.accept_token(id, tok);
    took(r, text, m, now, outbox);
}

/// Queues the events of a token `r` took, whose `text` came back (or the
/// failure, when it did not).
fn took(
    r: &mut Running,
    text: crate::error::Result<String>,
    m: &Metrics,
    now: Instant,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
) {
    let Some(text) = ok_or_fail(r, text, outbox) else { return };
    emit(r, text, None, m, now, outbox);
}

/// One row of logits (or part of one), where they are, copied to the host.
fn host_row(row: &Tensor) -> crate::error::Result<Vec<f32>> {
    Ok(row.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
}

/// The text of an accepted token, or (on error) the failure queued and `None`.
fn ok_or_fail(
    r: &mut Running,
    text: crate::error::Result<String>,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
) -> Option<String> {
    match text {
        Ok(t) => Some(t),
        Err(e) => {
            outbox.push((r.tx.clone(), Event::Failed(e.into())));
            r.done = true;
            r.failed = true;
            None
        }
    }
}

/// Counts a new token of `r` and queues its text (and, when finished, its end).
fn emit(
    r: &mut Running,
    text: String,
    logprobs: Option<Logprobs>,
    m: &Metrics,
    now: Instant,
    outbox: &mut Vec<(mpsc::UnboundedSender<Event>, Event)>,
) {
    m.generation_tokens.inc();
    VariantStats::add(&r.variant.stats.tokens, 1);
    if r.first_token_at.is_none() {
        r.first_token_at = Some(now);
    }
    match r.last_token_at {
        None => m.ttft.observe(now.duration_since(r.arrived)),
        Some(t) => m.itl.observe(now.duration_since(t)),
    }
    r.last_token_at = Some(now);
    if !text.is_empty() || logprobs.is_some() {
        outbox.push((r.tx.clone(), Event::Token { choice: r.choice, text, logprobs }));
    }
    if let Some(finish) = r.state.finish {
        m.e2e.observe(now.duration_since(r.arrived));
        let done = Event::Done { choice: r.choice, finish, completion_tokens: r.state.token_ids.len() };
        outbox.push((r.tx.clone(), done));
        r.done = true;
    }
}

/// Log-softmax of `row` at `chosen`, and the `top` most likely tokens.
pub fn logprobs(row: &[f32], chosen: u32, top: usize, tok: &Tokenizer) -> Logprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln() as f32;
    let info = |id: u32| TokenLogprob {
        id,
        // One token of a generation: its text as it continues the text before it.
        text: tok.decode_continuation(&[id], false).unwrap_or_default(),
        logprob: row.get(id as usize).map_or(f32::NEG_INFINITY, |&x| x - lse),
    };
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, by);
    }
    ids.truncate(top);
    ids.sort_unstable_by(by);
    Logprobs { chosen: info(chosen), top: ids.into_iter().map(info).collect() }
}
