//! Early exit: what a step's depth is, and the bookkeeping of sequences that
//! leave the layer stack early.
//!
//! [`Llama::forward_with`](super::Llama::forward_with) takes a [`StepPlan`]:
//!
//! - [`Depth::Full`] runs every layer (what [`Llama::forward`](super::Llama::forward) does).
//! - [`Depth::Static`] runs layers `0..k`, then the final norm and the shared
//!   LM head. Layers `k..` are neither run nor written: their KV slots for the
//!   step's positions hold whatever was there (zeros, or stale rows after a
//!   truncate). Invariant: a sequence decoded at static depth `k` is only ever
//!   read at depth `<= k` until those positions are rewritten (self-speculative
//!   verification truncates and rewrites them at full depth).
//! - [`Depth::Dynamic`] (CALM): every chunk runs at least `min_layers`; after
//!   that, a *decode* chunk (one token, on a sequence that already has KV) leaves
//!   once its confidence reaches `threshold`. Prompt chunks and multi-token
//!   chunks run every layer.
//!
//! **Confidence** is CALM's hidden-state saturation: the cosine between the
//! residual stream before and after the layer just run, clamped to `[0, 1]`.
//! It costs two dot products of `hidden` floats per row, against ~8 layers'
//! worth of compute for a softmax over the 49152-token LM head (rejected: the
//! check would cost more than the layers it saves at this model size). So
//! threshold 0 exits every decode token at `min_layers` (equal to
//! `Static { layers: min_layers }` for those tokens), and a threshold above 1
//! never exits (equal to `Full`).
//!
//! **Skipped layers' KV** is filled by CALM's state propagation: for every
//! layer `l` a token skipped, its exit hidden state `x` is projected as if it
//! were layer `l`'s input, `K = RoPE(W_k · rmsnorm_l(x))`, `V = W_v · rmsnorm_l(x)`,
//! and written at the token's position. Later tokens attending to it at
//! layer `l` therefore see a value, of the same kind full depth would write.
//! The cost is two `[kv_heads·head_dim, hidden]` projections per skipped layer
//! and token (~1/12 of a layer here).
//!
//! Rows that exit leave the sub-batch (`index_select`), so the remaining
//! layers run on fewer rows; the final norm and LM head run once, on every
//! row, in the batch's original order.

use candle_core::{Device, Tensor};

use arqon_variants::DepthProfile;

use crate::error::{Error, Result};

/// How deep one step runs (the per-step part of a
/// [`DepthProfile`](arqon_variants::DepthProfile)).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Depth {
    /// Every layer.
    #[default]
    Full,
    /// The first `layers` layers, then the final norm and LM head.
    Static {
        /// Layers run, `1..=num_layers`.
        layers: usize,
    },
    /// CALM dynamic exit for decode tokens (see the module docs).
    Dynamic {
        /// Layers every token runs, `1..=num_layers`.
        min_layers: usize,
        /// Cosine saturation needed to exit, `>= 0`; above 1 never exits.
        threshold: f32,
    },
}

impl Depth {
    /// Layers a chunk runs at most, after checking the depth fits `num_layers`.
    pub fn max_layers(&self, num_layers: usize) -> Result<usize> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        match *self {
            Depth::Full => Ok(num_layers),
            Depth::Static { layers } if layers == 0 || layers > num_layers => {
                bad(format!("static exit after {layers} layers: must be 1..={num_layers}"))
            }
            Depth::Static { layers } => Ok(layers),
            Depth::Dynamic { min_layers, .. } if min_layers == 0 || min_layers > num_layers => {
                bad(format!("dynamic exit min_layers {min_layers}: must be 1..={num_layers}"))
            }
            Depth::Dynamic { threshold, .. } if !threshold.is_finite() || threshold < 0.0 => {
                bad(format!("dynamic exit threshold {threshold}: must be finite and >= 0"))
            }
            Depth::Dynamic { .. } => Ok(num_layers),
        }
    }
}

/// How a step sums attention for multi-token chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attention {
    /// One masked `[n, len]` score matrix per chunk (prefill; fastest).
    #[default]
    Batched,
    /// Each query row against exactly its own prefix of keys, as a one-token
    /// decode step computes it. With the per-row projection kernels this makes
    /// a chunk's logits bit-identical to decoding its tokens one by one, which
    /// self-speculative verification needs to be lossless.
    PerRow,
}

/// Everything a step needs to know besides its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepPlan {
    /// How deep to run.
    pub depth: Depth,
    /// How to sum attention.
    pub attention: Attention,
}

impl StepPlan {
    /// Full depth, batched attention: what [`Llama::forward`](super::Llama::forward) runs.
    pub const FULL: StepPlan = StepPlan { depth: Depth::Full, attention: Attention::Batched };

    /// A plan at `depth` with batched attention.
    pub fn at(depth: Depth) -> Self {
        StepPlan { depth, attention: Attention::Batched }
    }

    /// The per-step plan of a variant's depth profile. Self-speculative
    /// profiles run their ordinary steps (prefill, verification, sampled
    /// requests) at full depth; dynamic exit applies to one-token decode
    /// chunks only, so the same plan serves a step that mixes prefill in.
    pub fn for_profile(profile: DepthProfile) -> Self {
        match profile {
            DepthProfile::Full | DepthProfile::SelfSpeculative { .. } => StepPlan::FULL,
            DepthProfile::Static { layers } => StepPlan::at(Depth::Static { layers }),
            DepthProfile::Dynamic { min_layers, threshold } => StepPlan::at(Depth::Dynamic { min_layers, threshold }),
        }
    }
}

/// Logits of a step and how deep each chunk ran.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// As [`Llama::forward`](super::Llama::forward) returns them.
    pub logits: Tensor,
    /// Layers each chunk ran, in batch order. Only one-token decode chunks
    /// can exit, so every token of a chunk runs the same number of layers.
    pub layers_run: Vec<usize>,
}

impl StepOutput {
    /// Mean of [`StepOutput::layers_run`].
    pub fn mean_layers(&self) -> f64 {
        if self.layers_run.is_empty() {
            return 0.0;
        }
        self.layers_run.iter().sum::<usize>() as f64 / self.layers_run.len() as f64
    }
}

/// Which chunks are still in the layer stack, and the exit states of those
/// that left. Rows are token rows of the flattened batch.
#[derive(Debug)]
pub(super) struct ExitState {
    /// Chunk indices still running, in batch order.
    pub active: Vec<usize>,
    /// Flat row indices of the active chunks' tokens, in order (the rows of `x`).
    pub active_rows: Vec<u32>,
    /// Chunk indices that left, in exit order.
    pub exited: Vec<usize>,
    /// Flat row indices of the exited chunks (one each: only decode chunks exit).
    pub exited_rows: Vec<u32>,
    /// Their hidden states at exit, `[exited, hidden]`.
    pub exited_x: Option<Tensor>,
    /// Layers each chunk has run so far.
    pub layers_run: Vec<usize>,
    /// Flat row range of each chunk.
    offsets: Vec<(usize, usize)>,
    /// Whether each chunk may exit early.
    may_exit: Vec<bool>,
}

impl ExitState {
    /// Every chunk active. `lens[i]` is chunk `i`'s token count and
    /// `starts[i]` its cached length before the step.
    pub fn new(lens: &[usize], starts: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut off = 0;
        for n in lens {
            offsets.push((off, *n));
            off += n;
        }
        ExitState {
            active: (0..lens.len()).collect(),
            active_rows: (0..off as u32).collect(),
            exited: Vec::new(),
            exited_rows: Vec::new(),
            exited_x: None,
            layers_run: vec![0; lens.len()],
            offsets,
            may_exit: lens.iter().zip(starts).map(|(n, s)| *n == 1 && *s > 0).collect(),
        }
    }

    /// Whether any chunk has left.
    pub fn any_exited(&self) -> bool {
        !self.exited.is_empty()
    }

    /// Counts one more layer for every active chunk.
    pub fn ran_layer(&mut self) {
        for c in &self.active {
            self.layers_run[*c] += 1;
        }
    }

    /// Moves the active decode chunks whose confidence (cosine of `before`
    /// and `after`, clamped to `[0, 1]`) reaches `threshold` out of the
    /// sub-batch. Returns the hidden state of the chunks still running.
    pub fn exit_confident(&mut self, before: &Tensor, after: &Tensor, threshold: f32) -> Result<Tensor> {
        if !self.active.iter().any(|c| self.may_exit[*c]) {
            return Ok(after.clone());
        }
        let conf = saturation(before, after)?;
        let mut keep_local = Vec::new();
        let mut leave_local = Vec::new();
        let (mut active, mut rows) = (Vec::new(), Vec::new());
        let mut local = 0u32;
        for c in std::mem::take(&mut self.active) {
            let n = self.offsets[c].1;
            let leaves = self.may_exit[c] && conf[local as usize] >= threshold;
            if leaves {
                leave_local.push(local);
                self.exited.push(c);
                self.exited_rows.push(self.offsets[c].0 as u32);
            } else {
                keep_local.extend(local..local + n as u32);
                active.push(c);
                rows.extend((self.offsets[c].0..self.offsets[c].0 + n).map(|r| r as u32));
            }
            local += n as u32;
        }
        self.active = active;
        self.active_rows = rows;
        if leave_local.is_empty() {
            return Ok(after.clone());
        }
        let dev = after.device();
        let leaving = select(after, &leave_local, dev)?;
        self.exited_x = Some(match self.exited_x.take() {
            None => leaving,
            Some(prev) => Tensor::cat(&[prev, leaving], 0)?,
        });
        if keep_local.is_empty() {
            // Nothing left to run; an empty tensor keeps shapes honest.
            return Ok(after.narrow(0, 0, 0)?);
        }
        select(after, &keep_local, dev)
    }

    /// Hidden states of every row of the batch, in original order, from the
    /// active rows' `x` and the exited rows' exit states; only the rows in `want`.
    pub fn gather(&self, x: &Tensor, want: &[u32], device: &Device) -> Result<Tensor> {
        if !self.any_exited() {
            return select(x, want, device);
        }
        let mut pos = vec![u32::MAX; self.offsets.last().map(|(o, n)| o + n).unwrap_or(0)];
        for (i, r) in self.active_rows.iter().enumerate() {
            pos[*r as usize] = i as u32;
        }
        let base = self.active_rows.len() as u32;
        for (i, r) in self.exited_rows.iter().enumerate() {
            pos[*r as usize] = base + i as u32;
        }
        let idx: Vec<u32> = want.iter().map(|r| pos[*r as usize]).collect();
        let all = match &self.exited_x {
            Some(e) if base > 0 => Tensor::cat(&[x, e], 0)?,
            Some(e) => e.clone(),
            None => x.clone(),
        };
        select(&all, &idx, device)
    }
}

/// Rows `idx` of `t`.
pub(super) fn select(t: &Tensor, idx: &[u32], device: &Device) -> Result<Tensor> {
    Ok(t.index_select(&Tensor::from_vec(idx.to_vec(), idx.len(), device)?, 0)?)
}

/// Per-row cosine of `a` and `b` (`[rows, hidden]`), clamped to `[0, 1]`.
fn saturation(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let dot = (a * b)?.sum(1)?.to_vec1::<f32>()?;
    let na = a.sqr()?.sum(1)?.to_vec1::<f32>()?;
    let nb = b.sqr()?.sum(1)?.to_vec1::<f32>()?;
    Ok(dot
        .iter()
        .zip(na.iter().zip(&nb))
        .map(|(d, (x, y))| {
            let c = d / (x.sqrt() * y.sqrt()).max(f32::MIN_POSITIVE);
            if c.is_finite() {
                c.clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_bounds() {
        assert_eq!(Depth::Full.max_layers(30).unwrap(), 30);
        assert_eq!(Depth::Static { layers: 12 }.max_layers(30).unwrap(), 12);
        assert!(Depth::Static { layers: 0 }.max_layers(30).is_err());
        assert!(Depth::Static { layers: 31 }.max_layers(30).is_err());
        assert!(Depth::Dynamic { min_layers: 4, threshold: f32::NAN }.max_layers(30).is_err());
        assert!(Depth::Dynamic { min_layers: 4, threshold: -0.1 }.max_layers(30).is_err());
        assert_eq!(Depth::Dynamic { min_layers: 4, threshold: 0.9 }.max_layers(30).unwrap(), 30);
    }

    #[test]
    fn saturation_is_clamped_cosine() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [1.0, 1.0]], &d).unwrap();
        let b = Tensor::new(&[[2f32, 0.0], [-1.0, 0.0], [1.0, 0.0]], &d).unwrap();
        let s = saturation(&a, &b).unwrap();
        assert!((s[0] - 1.0).abs() < 1e-6);
        assert_eq!(s[1], 0.0);
        assert!((s[2] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }

    #[test]
    fn exiting_rows_leave_and_gather_restores_order() {
        let d = Device::Cpu;
        // Chunks: a prompt of 2 tokens (cannot exit), two decode tokens.
        let mut st = ExitState::new(&[2, 1, 1], &[0, 5, 7]);
        let before = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], &d).unwrap();
        let after = Tensor::new(&[[1f32, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 4.0]], &d).unwrap();
        let x = st.exit_confident(&before, &after, 0.5).unwrap();
        assert_eq!(st.active, vec![0, 2]);
        assert_eq!(st.exited, vec![1]);
        assert_eq!(x.to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0], vec![2.0, 0.0], vec![0.0, 4.0]]);
        let all = st.gather(&x, &[0, 1, 2, 3], &d).unwrap();
        assert_eq!(all.to_vec2::<f32>().unwrap(), after.to_vec2::<f32>().unwrap());
    }
}
