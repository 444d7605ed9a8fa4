//! The KV cache, owned by the engine and lent to the model for each step.
//!
//! Each sequence has, per layer, a key and a value buffer of shape
//! `[kv_heads, capacity, head_dim]`, written in place (`slice_set`) and read as
//! a narrowed view: appending a token copies one row, not the whole history.
//! Capacity grows by doubling, so a sequence of `n` tokens is copied O(log n)
//! times in total. (The paged, block-table layout arrives with the GPU work.)
//!
//! Invariant: a sequence's `len` only advances once a whole step has written
//! every layer, so a step that fails part-way leaves the cache as it was.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Identifies one sequence in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug)]
struct SeqKv {
    len: usize,
    cap: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Shape of the per-layer buffers.
#[derive(Debug, Clone, Copy)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest sequence allowed.
    pub max_len: usize,
}

/// Keys and values of every live sequence.
#[derive(Debug)]
pub struct KvCache {
    shape: KvShape,
    device: Device,
    seqs: HashMap<SeqId, SeqKv>,
}

const INITIAL_CAPACITY: usize = 64;

impl KvCache {
    /// An empty cache for a model of this shape.
    pub fn new(shape: KvShape, device: Device) -> Self {
        KvCache { shape, device, seqs: HashMap::new() }
    }

    /// Registers a new, empty sequence.
    pub fn add(&mut self, seq: SeqId) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::InvalidRequest(format!("sequence {} already exists", seq.0)));
        }
        self.seqs.insert(seq, SeqKv { len: 0, cap: 0, k: Vec::new(), v: Vec::new() });
        Ok(())
    }

    /// Drops a sequence and frees its buffers. Unknown ids are ignored.
    pub fn remove(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    /// Whether the cache holds `seq`.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Tokens cached for `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.seqs.get(&seq).map(|s| s.len).ok_or(Error::UnknownSequence(seq.0))
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Bytes held by every buffer (capacity, not just the used part).
    pub fn bytes(&self) -> usize {
        let per_token = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * 4;
        self.seqs.values().map(|s| s.cap * per_token).sum()
    }

    /// Makes room for `extra` more tokens of `seq`.
    pub(crate) fn reserve(&mut self, seq: SeqId, extra: usize) -> Result<()> {
        let shape = self.shape;
        let device = self.device.clone();
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let need = s.len + extra;
        if need > shape.max_len {
            return Err(Error::ContextOverflow { prompt_tokens: s.len, max_tokens: extra, context: shape.max_len });
        }
        if need <= s.cap {
            return Ok(());
        }
        let mut cap = s.cap.max(INITIAL_CAPACITY);
        while cap < need {
            cap *= 2;
        }
        let cap = cap.min(shape.max_len);
        let grow = |old: &Tensor| -> Result<Tensor> {
            let t = Tensor::zeros((shape.kv_heads, cap, shape.head_dim), DType::F32, &device)?;
            if s.len > 0 {
                t.slice_set(&old.narrow(1, 0, s.len)?.contiguous()?, 1, 0)?;
            }
            Ok(t)
        };
        if s.cap == 0 {
            let z = || Tensor::zeros((shape.kv_heads, cap, shape.head_dim), DType::F32, &device);
            s.k = (0..shape.layers).map(|_| z()).collect::<candle_core::Result<_>>()?;
            s.v = (0..shape.layers).map(|_| z()).collect::<candle_core::Result<_>>()?;
        } else {
            s.k = s.k.iter().map(grow).collect::<Result<_>>()?;
            s.v = s.v.iter().map(grow).collect::<Result<_>>()?;
        }
        s.cap = cap;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) at the sequence's end for
    /// `layer` and returns the whole history including them, `[kv_heads, len+n, hd]`.
    /// The sequence's length is not advanced: see [`KvCache::advance`].
    pub(crate) fn append(&mut self, seq: SeqId, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let n = k.dim(1)?;
        debug_assert!(s.len + n <= s.cap, "reserve() before append()");
        s.k[layer].slice_set(k, 1, s.len)?;
        s.v[layer].slice_set(v, 1, s.len)?;
        Ok((s.k[layer].narrow(1, 0, s.len + n)?, s.v[layer].narrow(1, 0, s.len + n)?))
    }

    /// The whole key and value buffers of `seq` at `layer`,
    /// `[kv_heads, capacity, head_dim]` (tokens past the length are stale).
    pub(crate) fn buffers(&self, seq: SeqId, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        Ok((&s.k[layer], &s.v[layer]))
    }

    /// Commits `n` appended tokens of `seq`.
    pub(crate) fn advance(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        s.len += n;
        Ok(())
    }

    /// Forgets the last tokens of `seq` so it holds `len` (used to undo a
    /// speculative step). Buffers are kept.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        s.len = s.len.min(len);
        Ok(())
    }
}
