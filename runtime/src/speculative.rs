//! Lossless self-speculative decoding (LayerSkip-style), greedy only.
//!
//! One [`speculative_step`] advances several sequences at once:
//!
//! 1. **Draft**: `d` tokens, one step at a time, with the first
//!    `draft_layers` layers ([`Depth::Static`]), batched over the sequences.
//!    These steps write only the draft layers' KV.
//! 2. **Verify**: truncate each sequence back to where it was and run
//!    `[last, d1..dd]` through the full model in one multi-token step with
//!    [`Attention::PerRow`], so every position is computed exactly as a
//!    one-token decode step would (projections and the MLP are per row in the
//!    CPU kernels; attention is made per row). This rewrites all layers' KV.
//! 3. **Accept** the longest prefix of drafts equal to the full model's argmax
//!    at the position before, plus the full model's next token, and truncate
//!    the KV to the accepted tokens.
//!
//! Invariant (what makes it lossless): on return, each sequence's KV holds
//! exactly what plain full-depth greedy decoding would hold after emitting
//! the same tokens — every token but the last generated one — and the tokens
//! are the ones plain greedy decoding would emit. `tests/early_exit.rs`
//! checks both bitwise.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{argmax, rows, Attention, Depth, KvCache, Llama, LogitsFor, SeqChunk, SeqId, StepPlan};

/// One sequence's input to a speculative step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecInput {
    /// The sequence; its KV holds every token but `last`.
    pub seq: SeqId,
    /// The last token generated (not yet in the KV cache).
    pub last: u32,
    /// Most tokens to return (`>= 1`): drafts are capped at `max_new - 1`, so
    /// a step never emits, nor writes KV for, tokens past `max_tokens` or the context.
    pub max_new: usize,
}

/// What one speculative step produced for one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecResult {
    /// New tokens, in order: the accepted drafts, then the full model's next token.
    pub tokens: Vec<u32>,
    /// Tokens drafted this step.
    pub drafted: usize,
    /// Drafts accepted (`tokens.len() - 1`).
    pub accepted: usize,
}

/// Runs one self-speculative step for every sequence in `seqs` (see the
/// module docs). On error every sequence's KV is truncated back to its
/// length on entry.
pub fn speculative_step(
    model: &Llama,
    kv: &mut KvCache,
    seqs: &[SpecInput],
    draft_layers: usize,
    draft_tokens: usize,
) -> Result<Vec<SpecResult>> {
    let layers = model.config().num_layers;
    if draft_layers == 0 || draft_layers >= layers {
        return Err(Error::InvalidRequest(format!("draft_layers {draft_layers}: must be 1..{layers}")));
    }
    if draft_tokens == 0 || draft_tokens > arqon_variants::depth::MAX_DRAFT_TOKENS {
        return Err(Error::InvalidRequest(format!(
            "draft_tokens {draft_tokens}: must be 1..={}",
            arqon_variants::depth::MAX_DRAFT_TOKENS
        )));
    }
    if seqs.is_empty() {
        return Err(Error::InvalidRequest("empty batch".into()));
    }
    if let Some(s) = seqs.iter().find(|s| s.max_new == 0) {
        return Err(Error::InvalidRequest(format!("sequence {}: max_new must be at least 1", s.seq.0)));
    }
    let starts: Vec<usize> = seqs.iter().map(|s| kv.len(s.seq)).collect::<Result<_>>()?;
    let result = run(model, kv, seqs, &starts, draft_layers, draft_tokens);
    if result.is_err() {
        for (s, start) in seqs.iter().zip(&starts) {
            kv.truncate(s.seq, *start)?;
        }
    }
    result
}

/// Drafts a step proposes for a sequence that may still take `max_new`
/// tokens (at least 1): `draft_tokens`, less what would pass `max_new` (the
/// verified token is one more). A step's cache then holds at most this plus
/// one token more than before it.
pub fn drafts_for(draft_tokens: usize, max_new: usize) -> usize {
    draft_tokens.min(max_new.saturating_sub(1))
}

fn run(
    model: &Llama,
    kv: &mut KvCache,
    seqs: &[SpecInput],
    starts: &[usize],
    draft_layers: usize,
    draft_tokens: usize,
) -> Result<Vec<SpecResult>> {
    let want: Vec<usize> = seqs.iter().map(|s| drafts_for(draft_tokens, s.max_new)).collect();
    let mut drafts: Vec<Vec<u32>> = want.iter().map(|d| Vec::with_capacity(*d)).collect();
    let plan = StepPlan::at(Depth::Static { layers: draft_layers });
    for _ in 0..want.iter().copied().max().unwrap_or(0) {
        let live: Vec<usize> = (0..seqs.len()).filter(|i| drafts[*i].len() < want[*i]).collect();
        let inputs: Vec<[u32; 1]> =
            live.iter().map(|i| [drafts[*i].last().copied().unwrap_or(seqs[*i].last)]).collect();
        let chunks: Vec<SeqChunk<'_>> =
            live.iter().zip(&inputs).map(|(i, t)| SeqChunk { seq: seqs[*i].seq, tokens: t, adapter: None }).collect();
        let out = model.forward_with(&chunks, kv, LogitsFor::LastOfEachChunk, plan)?;
        for (row, i) in rows(&out.logits)?.iter().zip(&live) {
            drafts[*i].push(argmax(row));
        }
    }
    for (s, start) in seqs.iter().zip(starts) {
        kv.truncate(s.seq, *start)?;
    }
    let verify: Vec<Vec<u32>> =
        seqs.iter().zip(&drafts).map(|(s, d)| std::iter::once(s.last).chain(d.iter().copied()).collect()).collect();
    let chunks: Vec<SeqChunk<'_>> =
        seqs.iter().zip(&verify).map(|(s, t)| SeqChunk { seq: s.seq, tokens: t, adapter: None }).collect();
    let plan = StepPlan { depth: Depth::Full, attention: Attention::PerRow };
    let out = model.forward_with(&chunks, kv, LogitsFor::AllPositions, plan)?;
    let all = rows(&out.logits)?;
    let mut off = 0;
    let mut results = Vec::with_capacity(seqs.len());
    for ((s, start), d) in seqs.iter().zip(starts).zip(&drafts) {
        let full: Vec<u32> = all[off..off + d.len() + 1].iter().map(|r| argmax(r)).collect();
        off += d.len() + 1;
        let accepted = d.iter().zip(&full).take_while(|(a, b)| a == b).count();
        let mut tokens = d[..accepted].to_vec();
        tokens.push(full[accepted]);
        // KV keeps `last` and the accepted drafts; the new last token is not in it.
        kv.truncate(s.seq, start + accepted + 1)?;
        results.push(SpecResult { tokens, drafted: d.len(), accepted });
    }
    Ok(results)
}
