//! Turning logits into the next token: greedy, temperature, top-k, top-p,
//! min-p, repetition / frequency / presence penalties, and a seed that makes
//! sampled output reproducible.
//!
//! Order of operations (as llama.cpp and vLLM apply them): the logit bias and
//! the penalties on raw logits, then greedy if `temperature == 0`, else
//! top-k (on raw logits), temperature, softmax, top-p, min-p, and a draw
//! from the renormalised distribution. A row's `top_k` best are all a top-k
//! draw needs, so a device may pick them ([`Sampler::sample_candidates`]);
//! a row without top-k is drawn without sorting it.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to pick tokens. Build with [`SamplingParams::default`] (greedy) and set
/// fields; [`SamplingParams::validate`] checks ranges once, at the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Multiplicative penalty on tokens already in prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence in the output (OpenAI's, -2..2).
    pub frequency_penalty: f32,
    /// Subtracted once if present in the output (OpenAI's, -2..2).
    pub presence_penalty: f32,
    /// Seed for the draw; `None` picks one from the OS.
    pub seed: Option<u64>,
    /// Added to these tokens' logits before anything else (OpenAI's
    /// `logit_bias`, -100..100: -100 bans a token, 100 all but forces it).
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks every field's range; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad(format!("temperature must be between 0 and 100, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be positive, got {}", self.repetition_penalty));
        }
        for (name, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(format!("logit_bias of token {id} must be between -100 and 100, got {b}"));
        }
        Ok(())
    }

    /// Whether this picks the argmax (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether no penalty or logit bias moves any logit: then a row's token
    /// depends only on the row (and the top-k, top-p and min-p cuts).
    pub fn unpenalised(&self) -> bool {
        self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.logit_bias.is_empty()
    }

    /// A sampled, unpenalised draw over a whole row of `vocab` logits (no
    /// top-k cut): what the chunked and nucleus draws need.
    fn whole_row_draw(&self, vocab: usize) -> bool {
        !self.is_greedy() && self.unpenalised() && (self.top_k == 0 || self.top_k >= vocab)
    }
}

/// Per-sequence sampling state: the RNG and the token counts penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token in the output so far.
    output_counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
    scratch: Vec<(u32, f32)>,
    /// A row's weights ([`Sampler::draw_whole_row`]).
    weights: Vec<f32>,
}

impl Sampler {
    /// A sampler for one sequence with this prompt.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut prompt = prompt.to_vec();
        prompt.sort_unstable();
        prompt.dedup();
        Ok(Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            output_counts: HashMap::new(),
            prompt,
            scratch: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place by penalties) and
    /// records it as output.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let id = if self.params.is_greedy() { crate::model::argmax(logits) } else { self.draw_row(logits) };
        *self.output_counts.entry(id).or_insert(0) += 1;
        id
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().copied().chain(self.output_counts.keys().copied());
            let mut done = std::collections::HashSet::new();
            for id in seen {
                if done.insert(id) {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&id, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    /// How many of a row's best logits this sampler's next draw needs, when
    /// it needs no others: with `top_k` in `1..=max` and no penalty or logit
    /// bias (those move logits outside the best ones), the draw from the
    /// `top_k` best (id, logit) pairs, [`Sampler::sample_candidates`], is the
    /// draw from the whole row, token for token. `None` for greedy rows and
    /// every other case (the whole row is needed).
    pub fn candidates_needed(&self, max: usize) -> Option<usize> {
        let p = &self.params;
        (!p.is_greedy() && p.unpenalised() && (1..=max).contains(&p.top_k)).then_some(p.top_k)
    }

    /// Picks the next token from the row's best `(id, logit)` pairs (raw
    /// logits, at least [`Sampler::candidates_needed`] of them, or all the
    /// row has; any order) and records it as output. The same token
    /// [`Sampler::sample`] picks from the whole row.
    pub fn sample_candidates(&mut self, candidates: &[(u32, f32)]) -> u32 {
        debug_assert!(self.candidates_needed(usize::MAX).is_some(), "candidates drawn without their conditions");
        let id = if candidates.is_empty() { 0 } else { self.draw(candidates.iter().copied()) };
        *self.output_counts.entry(id).or_insert(0) += 1;
        id
    }

    /// Whether the next draw, from a row of `vocab` logits, needs of it only
    /// its [`RowWeights`] and then the logits of one chunk (rarely two):
    /// sampled, no top-k cut, top-p off, no penalty or logit bias (a
    /// temperature and min-p only: what an OpenAI client sends by default).
    /// Then a device may reduce the row where it is and hand over one chunk
    /// ([`Sampler::sample_chunked`]).
    pub fn chunked_draw(&self, vocab: usize) -> bool {
        self.params.whole_row_draw(vocab) && self.params.top_p >= 1.0
    }

    /// The draw of [`Sampler::chunked_draw`] from the row's `weights` and
    /// `chunk(c)`, its logits of chunk `c`, and records it as output: the
    /// token [`Sampler::sample`] draws from the whole row when `weights` are
    /// the row's own ([`weigh`]'s).
    pub fn sample_chunked(
        &mut self,
        weights: &RowWeights,
        chunk: &mut dyn FnMut(usize) -> Result<Vec<f32>>,
    ) -> Result<u32> {
        let id = self.draw_chunked(weights, chunk)?;
        *self.output_counts.entry(id).or_insert(0) += 1;
        Ok(id)
    }

    /// Walks the chunks' kept sums to the chunk holding the draw, then its
    /// weights (recomputed from its logits, as [`weigh`] computes them).
    fn draw_chunked(&mut self, w: &RowWeights, chunk: &mut dyn FnMut(usize) -> Result<Vec<f32>>) -> Result<u32> {
        let (t, min_p) = (self.params.temperature, self.params.min_p);
        let total: f64 = w.parts.iter().map(|c| c.1).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for (c, part) in w.parts.iter().enumerate() {
            if r > part.1 {
                r -= part.1;
                continue;
            }
            for (i, l) in chunk(c)?.iter().enumerate() {
                let v = l / t;
                let x = if v.is_nan() { 0.0 } else { (v - w.max).exp() };
                if kept(x, min_p) {
                    r -= x as f64;
                    if r <= 0.0 {
                        return Ok((c * CHUNK + i) as u32);
                    }
                }
            }
            // One by one the weights fell short of the chunk's sum by a
            // rounding: the draw goes on into the next chunk.
        }
        // Past the end by a rounding (sums made where the logits are may
        // differ from these weights in their last bits): the last kept token.
        for c in (0..w.parts.len()).rev().filter(|c| w.parts[*c].1 > 0.0) {
            let logits = chunk(c)?;
            let last = logits.iter().rposition(|l| {
                let v = l / t;
                !v.is_nan() && kept((v - w.max).exp(), min_p)
            });
            if let Some(i) = last {
                return Ok((c * CHUNK + i) as u32);
            }
        }
        Err(Error::Candle(candle_core::Error::Msg("sampling: the row's weights hold no token to draw".into())))
    }

    /// Whether the next draw, from a row of `vocab` logits, is a top-p draw
    /// over the whole row (no top-k cut, no penalty or logit bias), whose
    /// nucleus usually lies among the row's best few: then a device may
    /// hand over the row's [`RowWeights`] and best candidates instead of the
    /// row ([`Sampler::sample_nucleus`]).
    pub fn nucleus_draw(&self, vocab: usize) -> bool {
        self.params.whole_row_draw(vocab) && self.params.top_p < 1.0
    }

    /// The draw of [`Sampler::nucleus_draw`] from the row's `weights` and
    /// its best `candidates` (raw logits, any order; all the row has when it
    /// has fewer than `of_best`, else its `of_best` best), recorded as
    /// output: the token [`Sampler::sample`] draws from the whole row when
    /// `weights` are the row's own. `None`, with nothing drawn, when the
    /// nucleus may reach past the candidates: the row is needed whole.
    pub fn sample_nucleus(&mut self, weights: &RowWeights, candidates: &[(u32, f32)], of_best: usize) -> Option<u32> {
        let p = &self.params;
        let sum: f64 = weights.parts.iter().map(|c| c.0).sum();
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(candidates.iter().map(|&(i, l)| {
            let v = l / p.temperature;
            (i, if v.is_nan() { 0.0 } else { (v - weights.max).exp() })
        }));
        // The order of the whole-row draw's nucleus: weight, then id.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut acc = 0.0f64;
        let i = cand.iter().position(|c| {
            acc += c.1 as f64 / sum;
            acc >= p.top_p as f64
        })?;
        // Every token left out weighs at most the last candidate: strictly
        // less than the nucleus's last, or it could sort before it.
        if candidates.len() >= of_best && cand[cand.len() - 1].1 >= cand[i].1 {
            return None;
        }
        let mut keep = i + 1;
        if p.min_p > 0.0 {
            keep = keep.min(cand.iter().take_while(|c| c.1 >= p.min_p).count().max(1));
        }
        let total: f64 = cand[..keep].iter().map(|c| c.1 as f64).sum();
        let mut r = self.rng.gen::<f64>() * total;
        let mut id = cand[keep - 1].0;
        for c in &cand[..keep] {
            r -= c.1 as f64;
            if r <= 0.0 {
                id = c.0;
                break;
            }
        }
        *self.output_counts.entry(id).or_insert(0) += 1;
        Some(id)
    }

    /// The draw from a whole row: with a `top_k` smaller than the row, from
    /// its `top_k` best ([`Sampler::draw`], so the candidates' draw is the
    /// same); without, [`Sampler::draw_whole_row`].
    fn draw_row(&mut self, logits: &[f32]) -> u32 {
        if self.params.top_k > 0 && self.params.top_k < logits.len() {
            self.draw(logits.iter().enumerate().map(|(i, l)| (i as u32, *l)))
        } else {
            self.draw_whole_row(logits)
        }
    }

    /// The draw over a whole row without sorting it (sorting 49,152 logits
    /// costs a millisecond a row): weights `exp(l / T - max)` in id order
    /// and their sum; top-p's nucleus (the smallest prefix, in the order of
    /// [`Sampler::draw`], whose mass reaches `top_p`) found among the
    /// weights above a threshold, lowered until they hold it, and sorted
    /// alone; min-p a threshold on the weights. With top-p the draw walks
    /// the nucleus best first, without it the kept tokens in id order. The
    /// same distribution as sorting the row first; NaN logits have weight 0.
    fn draw_whole_row(&mut self, logits: &[f32]) -> u32 {
        let (t, min_p) = (self.params.temperature, self.params.min_p);
        let Some((parts, max)) = weigh_row(logits, t, min_p, &mut self.weights) else {
            // Nothing finite to weigh (all -inf, or an inf): greedy's pick.
            return crate::model::argmax(logits);
        };
        if self.params.top_p >= 1.0 {
            let weights = RowWeights { max, parts };
            let id = self.draw_chunked(&weights, &mut |c| Ok(chunk_of(logits, c).to_vec()));
            return id.unwrap_or_else(|_| crate::model::argmax(logits));
        }
        let (p, w) = (&self.params, &self.weights);
        let sum: f64 = parts.iter().map(|c| c.0).sum();
        let u = self.rng.gen::<f64>();
        // The nucleus lies among the weights at or above `tau` once their
        // sorted prefix reaches `top_p` (every weight left out is smaller).
        let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let cand = &mut self.scratch;
        let mut tau = 1.0f32 / 64.0;
        let keep = loop {
            cand.clear();
            cand.extend(w.iter().enumerate().filter(|(_, x)| **x >= tau).map(|(i, x)| (i as u32, *x)));
            cand.sort_unstable_by(by_weight);
            let mut acc = 0.0f64;
            let reached = cand.iter().position(|c| {
                acc += c.1 as f64 / sum;
                acc >= p.top_p as f64
            });
            match reached {
                Some(i) => break i + 1,
                None if tau == 0.0 => break cand.len(),
                None => tau = if tau < 1e-30 { 0.0 } else { tau / 64.0 },
            }
        };
        let mut keep = keep.max(1);
        if p.min_p > 0.0 {
            keep = keep.min(cand.iter().take_while(|c| c.1 >= p.min_p).count().max(1));
        }
        let total: f64 = cand[..keep].iter().map(|c| c.1 as f64).sum();
        let mut r = u * total;
        for c in &cand[..keep] {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[keep - 1].0
    }

    /// The draw from `(id, raw logit)` candidates (the whole row, or at
    /// least its `top_k` best).
    fn draw(&mut self, candidates: impl Iterator<Item = (u32, f32)>) -> u32 {
        let p = &self.params;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(candidates);
        // Largest logit first, lowest id on ties: a deterministic order. The
        // top k are chosen on raw logits (what a device picks them by) and
        // scaled after, so a row's top k are the same wherever chosen.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        for c in cand.iter_mut() {
            c.1 /= p.temperature;
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0f64;
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64 / sum;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // cand[0] has probability weight 1 (exp(0)) relative to itself.
            keep = keep.min(cand.iter().take_while(|c| c.1 >= p.min_p).count().max(1));
        }
        let total: f64 = cand[..keep].iter().map(|c| c.1 as f64).sum();
        let mut r = self.rng.gen::<f64>() * total;
        for c in &cand[..keep] {
            r -= c.1 as f64;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[keep - 1].0
    }
}

/// Logits per chunk in a whole-row draw's passes ([`weigh`]): fixed, so the
/// sums (per chunk, then over the chunks in order) are the same bits however
/// many threads run them.
pub const CHUNK: usize = 4096;

/// Whether a weight is among those drawn from when top-p is off: positive
/// and at least `min_p` (weights are relative to the largest, 1).
fn kept(w: f32, min_p: f32) -> bool {
    w > 0.0 && w >= min_p
}

/// A row's weights `exp(l / temperature - max)` into `w` (NaN logits weigh
/// 0), and per [`CHUNK`] of the row the sum of all its weights and of those
/// [`kept`]; chunks in parallel on the current rayon pool when `parallel`,
/// with the same results. `None` when no logit is finite below +inf.
pub(crate) fn weigh(
    logits: &[f32],
    temperature: f32,
    min_p: f32,
    w: &mut Vec<f32>,
    parallel: bool,
) -> Option<(Vec<(f64, f64)>, f32)> {
    use rayon::prelude::*;
    let chunk_max =
        |c: &[f32]| c.iter().map(|l| l / temperature).filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    let max = if parallel {
        logits.par_chunks(CHUNK).map(chunk_max).reduce(|| f32::NEG_INFINITY, f32::max)
    } else {
        logits.chunks(CHUNK).map(chunk_max).fold(f32::NEG_INFINITY, f32::max)
    };
    if !max.is_finite() {
        return None;
    }
    w.clear();
    w.resize(logits.len(), 0.0);
    let fill = |(wc, lc): (&mut [f32], &[f32])| {
        let (mut all, mut kept_sum) = (0.0f64, 0.0f64);
        for (w, l) in wc.iter_mut().zip(lc) {
            let v = l / temperature;
            *w = if v.is_nan() { 0.0 } else { (v - max).exp() };
            all += *w as f64;
            if kept(*w, min_p) {
                kept_sum += *w as f64;
            }
        }
        (all, kept_sum)
    };
    let parts = if parallel {
        w.par_chunks_mut(CHUNK).zip(logits.par_chunks(CHUNK)).map(fill).collect()
    } else {
        w.chunks_mut(CHUNK).zip(logits.chunks(CHUNK)).map(fill).collect()
    };
    Some((parts, max))
}

/// [`weigh`] of one row: a model's on the CPU pool, a small one here (the
/// same chunks, so the same bits, either way).
pub(crate) fn weigh_row(
    logits: &[f32],
    temperature: f32,
    min_p: f32,
    w: &mut Vec<f32>,
) -> Option<(Vec<(f64, f64)>, f32)> {
    if logits.len() >= 4 * CHUNK {
        arqon_kernels::threads::install(|| weigh(logits, temperature, min_p, w, true))
    } else {
        weigh(logits, temperature, min_p, w, false)
    }
}

/// Chunk `c` of a row ([`CHUNK`] logits, fewer at the end).
fn chunk_of(row: &[f32], c: usize) -> &[f32] {
    &row[(c * CHUNK).min(row.len())..((c + 1) * CHUNK).min(row.len())]
}

/// What a whole-row draw without top-p needs of a row before it reads any
/// of its logits: the largest `l / T` and, per [`CHUNK`], the sum of the
/// weights `exp(l / T - max)` and of those [`kept`] ([`weigh`], or a
/// device's reduction over the logits where they are).
#[derive(Debug, Clone, PartialEq)]
pub struct RowWeights {
    /// The largest scaled logit.
    pub max: f32,
    /// Per chunk, (all weights, kept weights).
    pub parts: Vec<(f64, f64)>,
}

/// Finds stop strings in streamed text, holding back any tail that could
/// still become one so no stop text is ever emitted.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopStrings::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Text safe to emit now.
    Continue(String),
    /// A stop string matched: the text before it, to emit, and then stop.
    Stopped(String),
}

impl StopStrings {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopStrings { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopScan {
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopScan::Stopped(out);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.pending.len() + 1)).rev() {
                if self.pending.is_char_boundary(self.pending.len() - k) && self.pending.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan::Continue(out)
    }

    /// Text held back at the end of generation (no stop string followed).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p, &[]).unwrap()
    }

    #[test]
    fn greedy_takes_argmax_lowest_on_ties() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let p = SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |p: SamplingParams| {
            let mut s = sampler(p);
            (0..40).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(p.clone()), run(p.clone()));
        assert_ne!(run(p.clone()), run(SamplingParams { seed: Some(8), ..p }));
    }

    /// The best `k` (id, logit) pairs of a row, in a scrambled order, as a
    /// device hands them over.
    fn best(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut c: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, l)| (i as u32, *l)).collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        c.truncate(k);
        c.reverse();
        c.rotate_left(k / 3);
        c
    }

    #[test]
    fn drawing_from_the_best_candidates_is_drawing_from_the_row() {
        // Logits with ties (quantised to 1/8) and a spread, several settings.
        let logits: Vec<f32> = (0..500u32).map(|i| ((i * 7919) % 97) as f32 / 8.0 - 6.0).collect();
        let settings = [
            SamplingParams { temperature: 1.0, top_k: 40, ..Default::default() },
            SamplingParams { temperature: 0.7, top_k: 128, top_p: 0.9, ..Default::default() },
            SamplingParams { temperature: 1.3, top_k: 5, min_p: 0.2, ..Default::default() },
            SamplingParams { temperature: 0.3, top_k: 1, ..Default::default() },
        ];
        for (n, p) in settings.into_iter().enumerate() {
            let p = SamplingParams { seed: Some(n as u64 + 11), ..p };
            let (mut row, mut cands) = (sampler(p.clone()), sampler(p.clone()));
            assert_eq!(cands.candidates_needed(128), Some(p.top_k));
            let a: Vec<u32> = (0..200).map(|_| row.sample(&mut logits.clone())).collect();
            let b: Vec<u32> = (0..200).map(|_| cands.sample_candidates(&best(&logits, p.top_k))).collect();
            assert_eq!(a, b, "{p:?}");
            assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1 || p.top_k == 1, "{p:?} drew one id");
        }
    }

    #[test]
    fn candidates_suffice_only_without_penalties_and_with_a_small_top_k() {
        let base = SamplingParams { temperature: 1.0, top_k: 50, ..Default::default() };
        assert_eq!(sampler(base.clone()).candidates_needed(128), Some(50));
        assert_eq!(sampler(base.clone()).candidates_needed(49), None);
        for p in [
            SamplingParams { temperature: 0.0, ..base.clone() },
            SamplingParams { top_k: 0, top_p: 0.9, ..base.clone() },
            SamplingParams { repetition_penalty: 1.1, ..base.clone() },
            SamplingParams { frequency_penalty: 0.5, ..base.clone() },
            SamplingParams { presence_penalty: -0.5, ..base.clone() },
            SamplingParams { logit_bias: vec![(3, 5.0)], ..base.clone() },
        ] {
            assert_eq!(sampler(p.clone()).candidates_needed(128), None, "{p:?}");
        }
    }

    /// The probabilities sampling gives each token, by the definition:
    /// softmax of `l / T`, sorted (largest first, lowest id on ties), cut
    /// to the smallest prefix reaching `top_p`, then to the weights `>=
    /// min_p` times the largest, renormalised.
    fn oracle(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let v: Vec<f64> = logits.iter().map(|l| (*l / p.temperature) as f64).collect();
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = v.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|a, b| w[*b].total_cmp(&w[*a]).then(a.cmp(b)));
        let (mut acc, mut keep) = (0.0, order.len());
        for (i, t) in order.iter().enumerate() {
            acc += w[*t] / sum;
            if p.top_p < 1.0 && acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let kept: Vec<usize> = order[..keep].iter().copied().filter(|t| w[*t] >= p.min_p as f64).collect();
        let total: f64 = kept.iter().map(|t| w[*t]).sum();
        let mut out = vec![0.0; w.len()];
        for t in kept {
            out[t] = w[t] / total;
        }
        out
    }

    /// Draw frequencies of `n` samples.
    fn frequencies(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<f64> {
        let mut s = sampler(p.clone());
        let mut f = vec![0.0; logits.len()];
        for _ in 0..n {
            f[s.sample(&mut logits.to_vec()) as usize] += 1.0 / n as f64;
        }
        f
    }

    #[test]
    fn a_whole_row_is_drawn_by_its_probabilities() {
        // Small rows: every token's frequency next to its probability
        // (20,000 draws: a standard error under 0.4%).
        let logits = [2.0f32, 1.5, 1.5, 0.0, -1.0, 3.0, -20.0];
        for p in [
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 0.7, top_p: 0.8, ..Default::default() },
            SamplingParams { temperature: 1.3, min_p: 0.2, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.9, min_p: 0.3, ..Default::default() },
        ] {
            let p = SamplingParams { seed: Some(21), ..p };
            let (want, got) = (oracle(&logits, &p), frequencies(&logits, &p, 20_000));
            for (t, (w, g)) in want.iter().zip(&got).enumerate() {
                assert!((w - g).abs() < 0.015, "{p:?} token {t}: probability {w:.4}, drawn {g:.4}");
                assert!(*w > 0.0 || *g == 0.0, "{p:?} token {t} is outside the kept set but was drawn");
            }
        }
        // A nucleus beyond the first threshold: one likely token over a
        // tail of 10,000 whose weights (e^-6) are each below 1/64, with
        // 4% of the mass at the top; top_p 0.5 takes half the tail.
        let mut logits = vec![-6.0f32; 10_001];
        logits[7] = 0.0;
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(5), ..Default::default() };
        let (want, got) = (oracle(&logits, &p), frequencies(&logits, &p, 5_000));
        let kept = want.iter().filter(|w| **w > 0.0).count();
        assert!((4000..6000).contains(&kept), "the nucleus holds half the tail: {kept}");
        assert!((want[7] - got[7]).abs() < 0.015, "the top token: {} against {}", want[7], got[7]);
        assert!(got.iter().zip(&want).all(|(g, w)| *w > 0.0 || *g == 0.0), "a token outside the nucleus was drawn");
        assert!(got.iter().filter(|g| **g > 0.0).count() > 1500, "the tail is drawn");
    }

    #[test]
    fn whole_row_draws_stay_in_the_nucleus_of_a_model_sized_row() {
        // 49,152 logits like a model's: the drawn tokens are all in the
        // nucleus the definition gives, and many distinct ones are drawn.
        let mut x = 12345u64;
        let logits: Vec<f32> = (0..49_152)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32).powi(8) * 30.0 - 10.0
            })
            .collect();
        for p in [
            SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() },
            SamplingParams { temperature: 1.0, min_p: 0.05, ..Default::default() },
        ] {
            let want = oracle(&logits, &p);
            let mut s = sampler(SamplingParams { seed: Some(9), ..p.clone() });
            let drawn: std::collections::HashSet<u32> = (0..300).map(|_| s.sample(&mut logits.clone())).collect();
            assert!(drawn.iter().all(|t| want[*t as usize] > 0.0), "{p:?}: a token outside the kept set");
            assert!(drawn.len() > 20, "{p:?}: only {} distinct tokens", drawn.len());
        }
        // Non-finite rows: all -inf but one NaN, and all -inf, take greedy's pick.
        let mut s = sampler(SamplingParams { temperature: 1.0, seed: Some(1), ..Default::default() });
        let mut row = vec![f32::NEG_INFINITY; 10];
        assert_eq!(s.sample(&mut row.clone()), 0);
        row[4] = f32::NAN;
        row[6] = 1.0;
        assert_eq!(s.sample(&mut row), 6, "NaN has no weight");
    }

    #[test]
    fn weighing_in_parallel_gives_the_same_bits() {
        let logits: Vec<f32> = (0..5 * CHUNK + 123).map(|i| ((i * 7919) % 1009) as f32 / 50.0 - 10.0).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (seq, max) = weigh(&logits, 0.7, 0.01, &mut a, false).unwrap();
        let (par, par_max) = arqon_kernels::threads::install(|| weigh(&logits, 0.7, 0.01, &mut b, true)).unwrap();
        assert_eq!(max.to_bits(), par_max.to_bits());
        assert_eq!(seq.len(), 6);
        assert!(seq.iter().zip(&par).all(|(x, y)| x.0.to_bits() == y.0.to_bits() && x.1.to_bits() == y.1.to_bits()));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(seq.iter().all(|c| c.1 > 0.0 && c.1 <= c.0));
        assert!(weigh(&[f32::NEG_INFINITY, f32::NAN], 1.0, 0.0, &mut a, false).is_none());
    }

    #[test]
    fn a_chunked_draw_from_the_rows_weights_is_the_rows_draw() {
        let logits: Vec<f32> = (0..3 * CHUNK + 7).map(|i| ((i * 7919) % 3001) as f32 / 150.0 - 10.0).collect();
        for p in [
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 0.6, min_p: 0.02, ..Default::default() },
        ] {
            let p = SamplingParams { seed: Some(17), ..p };
            let (mut row, mut chunked) = (sampler(p.clone()), sampler(p.clone()));
            assert!(chunked.chunked_draw(logits.len()));
            let (parts, max) = weigh(&logits, p.temperature, p.min_p, &mut Vec::new(), false).unwrap();
            let weights = RowWeights { max, parts };
            let mut read = Vec::new();
            for _ in 0..50 {
                let want = row.sample(&mut logits.clone());
                let got = chunked
                    .sample_chunked(&weights, &mut |c| {
                        read.push(c);
                        Ok(chunk_of(&logits, c).to_vec())
                    })
                    .unwrap();
                assert_eq!(got, want, "{p:?}");
            }
            assert!(read.len() <= 60 && read.iter().collect::<std::collections::HashSet<_>>().len() > 1, "{read:?}");
        }
        // Sums made elsewhere, larger than these weights by more than a
        // rounding: every draw still lands on a kept token.
        let (parts, max) = weigh(&logits, 1.0, 0.0, &mut Vec::new(), false).unwrap();
        let inflated = RowWeights { max, parts: parts.iter().map(|(a, k)| (a * 1.1, k * 1.1)).collect() };
        let mut s = sampler(SamplingParams { temperature: 1.0, seed: Some(2), ..Default::default() });
        for _ in 0..200 {
            let id = s.sample_chunked(&inflated, &mut |c| Ok(chunk_of(&logits, c).to_vec())).unwrap();
            assert!((id as usize) < logits.len());
        }
        let no = |p: SamplingParams| !sampler(SamplingParams { temperature: 1.0, ..p }).chunked_draw(100);
        assert!(no(SamplingParams { top_p: 0.9, ..Default::default() }));
        assert!(no(SamplingParams { top_k: 50, ..Default::default() }));
        assert!(no(SamplingParams { presence_penalty: 0.1, ..Default::default() }));
        assert!(!sampler(SamplingParams::default()).chunked_draw(100), "greedy");
        assert!(sampler(SamplingParams { temperature: 1.0, top_k: 100, ..Default::default() }).chunked_draw(100));
    }

    #[test]
    fn a_nucleus_drawn_from_the_best_candidates_is_the_rows_draw() {
        use crate::model::sample_op::best_of_row;
        let logits: Vec<f32> = (0..2 * CHUNK + 9).map(|i| ((i * 7919) % 3001) as f32 / 100.0 - 20.0).collect();
        for p in [
            SamplingParams { temperature: 0.1, top_p: 0.9, ..Default::default() },
            SamplingParams { temperature: 0.2, top_p: 0.5, min_p: 0.3, ..Default::default() },
        ] {
            let p = SamplingParams { seed: Some(23), ..p };
            let (mut row, mut nucleus) = (sampler(p.clone()), sampler(p.clone()));
            assert!(nucleus.nucleus_draw(logits.len()) && !nucleus.chunked_draw(logits.len()));
            let (parts, max) = weigh(&logits, p.temperature, p.min_p, &mut Vec::new(), false).unwrap();
            let weights = RowWeights { max, parts };
            let mut best = Vec::new();
            best_of_row(&logits, 128, &mut best);
            for _ in 0..100 {
                let want = row.sample(&mut logits.clone());
                assert_eq!(nucleus.sample_nucleus(&weights, &best, 128), Some(want), "{p:?}");
            }
        }
        // A flat row: the nucleus reaches past any 128, so the row is needed
        // and nothing is drawn (the next draw is the row's).
        let flat = vec![0.0f32; 1000];
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(4), ..Default::default() };
        let (parts, max) = weigh(&flat, 1.0, 0.0, &mut Vec::new(), false).unwrap();
        let mut best = Vec::new();
        best_of_row(&flat, 128, &mut best);
        let (mut a, mut b) = (sampler(p.clone()), sampler(p));
        assert_eq!(a.sample_nucleus(&RowWeights { max, parts }, &best, 128), None);
        assert_eq!(a.sample(&mut flat.clone()), b.sample(&mut flat.clone()), "the failed try drew nothing");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = sampler(SamplingParams { temperature: 5.0, top_k: 1, seed: Some(1), ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.4]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = sampler(SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(3), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&mut logits.clone()) == 0));
        let mut s = sampler(SamplingParams { temperature: 1.0, min_p: 0.5, seed: Some(3), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&mut logits.clone()) == 0));
        let mut s = sampler(SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() });
        assert!((0..200).any(|_| s.sample(&mut logits.clone()) != 0));
    }

    #[test]
    fn penalties_push_away_from_repeats() {
        let mut s = sampler(SamplingParams { presence_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 0.5]), 0);
        assert_eq!(s.sample(&mut [1.0, 0.5]), 1, "presence penalty 2 makes token 0 lose");
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..Default::default() }, &[0]).unwrap();
        assert_eq!(s.sample(&mut [1.0, 0.5]), 1, "prompt token 0 divided by 4");
        let mut s = sampler(SamplingParams { frequency_penalty: 0.3, ..Default::default() });
        let picks: Vec<u32> = (0..3).map(|_| s.sample(&mut [1.0, 0.5])).collect();
        assert_eq!(picks, vec![0, 0, 1]);
    }

    #[test]
    fn invalid_params_are_rejected_by_name() {
        for (p, name) in [
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 3.0, ..Default::default() }, "presence_penalty"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
        ] {
            let e = Sampler::new(p, &[]).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn stop_strings_hold_back_partial_matches() {
        let mut s = StopStrings::new(&["END".to_string()]);
        assert_eq!(s.push("abc E"), StopScan::Continue("abc ".into()));
        assert_eq!(s.push("N"), StopScan::Continue("".into()));
        assert_eq!(s.push("x"), StopScan::Continue("ENx".into()));
        assert_eq!(s.push("yy EN"), StopScan::Continue("yy ".into()));
        assert_eq!(s.push("Dzz"), StopScan::Stopped("".into()));
        let mut s = StopStrings::new(&["\n\n".to_string(), ".".to_string()]);
        assert_eq!(s.push("Paris. Yes"), StopScan::Stopped("Paris".into()));
        let mut s = StopStrings::new(&["é!".to_string()]);
        assert_eq!(s.push("café"), StopScan::Continue("caf".into()));
        assert_eq!(s.flush(), "é");
    }
}
