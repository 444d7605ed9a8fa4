//! The paged KV cache layout and the decode-attention reference
//! (`cuda/paged_attention.cu`).
//!
//! Layout: `k_cache` and `v_cache` are each `[num_blocks, kv_heads,
//! block_size, head_dim]`, row-major (vLLM's, without its x-packing of keys).
//! A sequence's `block_tables` row lists its blocks in token order: token `t`
//! lives in block `table[t / block_size]` at offset `t % block_size`. A slot
//! (what RoPE + KV write takes) is `block * block_size + offset`.

use crate::{Elem, KernelError, KernelId};

/// Largest head dimension the CUDA kernels take (and the multiple they need).
pub const MAX_HEAD_DIM: usize = 256;

/// Geometry of one layer's paged K (or V) cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvShape {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Tokens per block (16 in vLLM and here).
    pub block_size: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl PagedKvShape {
    /// Elements in the cache.
    pub fn len(&self) -> usize {
        self.num_blocks * self.kv_heads * self.block_size * self.head_dim
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot as an index, if it is inside the cache.
    pub fn slot(&self, slot: i32) -> Option<usize> {
        usize::try_from(slot).ok().filter(|s| *s < self.num_blocks * self.block_size)
    }

    /// Offset of element 0 of `head` for the token at `slot` (`< num_blocks * block_size`).
    pub fn offset(&self, slot: usize, head: usize) -> usize {
        let (blk, off) = (slot / self.block_size, slot % self.block_size);
        ((blk * self.kv_heads + head) * self.block_size + off) * self.head_dim
    }
}

/// Shape of one decode-attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedAttentionShape {
    /// Sequences (one query token each).
    pub num_seqs: usize,
    /// Query heads; a multiple of `cache.kv_heads` (GQA).
    pub q_heads: usize,
    /// The caches read.
    pub cache: PagedKvShape,
    /// Width of a `block_tables` row.
    pub max_blocks_per_seq: usize,
}

/// The inputs of decode attention (layouts in the module docs).
#[derive(Debug, Clone, Copy)]
pub struct PagedAttentionInputs<'a, T> {
    /// Queries `[num_seqs, q_heads, head_dim]`.
    pub q: &'a [T],
    /// Keys, paged.
    pub k_cache: &'a [T],
    /// Values, paged.
    pub v_cache: &'a [T],
    /// `[num_seqs, max_blocks_per_seq]` block ids.
    pub block_tables: &'a [i32],
    /// Tokens each sequence attends to.
    pub context_lens: &'a [i32],
    /// Score scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

fn shape_err(message: String) -> KernelError {
    KernelError::Shape { kernel: KernelId::PagedAttention, message }
}

/// Buffer lengths (in elements) of one decode-attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedAttentionLens {
    /// `q`.
    pub q: usize,
    /// `k_cache`.
    pub k_cache: usize,
    /// `v_cache`.
    pub v_cache: usize,
    /// `block_tables`.
    pub block_tables: usize,
    /// `context_lens`.
    pub context_lens: usize,
    /// `out`.
    pub out: usize,
}

impl PagedAttentionShape {
    /// Checks the geometry the CUDA kernels support and that the buffers fit it
    /// (what a launch can check without reading device memory).
    pub fn check_lens(&self, lens: &PagedAttentionLens) -> Result<(), KernelError> {
        let c = &self.cache;
        let d = c.head_dim;
        if d == 0 || !d.is_multiple_of(32) || d > MAX_HEAD_DIM {
            return Err(shape_err(format!("head_dim {d}: want a multiple of 32 up to {MAX_HEAD_DIM}")));
        }
        if c.kv_heads == 0 || self.q_heads == 0 || !self.q_heads.is_multiple_of(c.kv_heads) || c.block_size == 0 {
            return Err(shape_err(format!(
                "{} query heads over {} kv heads, block {}",
                self.q_heads, c.kv_heads, c.block_size
            )));
        }
        let q = self.num_seqs * self.q_heads * d;
        let want = PagedAttentionLens {
            q,
            k_cache: c.len(),
            v_cache: c.len(),
            block_tables: self.num_seqs * self.max_blocks_per_seq,
            context_lens: self.num_seqs,
            out: q,
        };
        if *lens == want {
            Ok(())
        } else {
            Err(shape_err(format!("{lens:?} do not fit {self:?} (want {want:?})")))
        }
    }
}

/// Checks what the CUDA kernel assumes, tables included (the kernel clamps
/// and skips instead of faulting, but only this domain has a defined result).
pub fn check<T>(
    shape: &PagedAttentionShape,
    inputs: &PagedAttentionInputs<'_, T>,
    out: &[T],
) -> Result<(), KernelError> {
    let c = &shape.cache;
    shape.check_lens(&PagedAttentionLens {
        q: inputs.q.len(),
        k_cache: inputs.k_cache.len(),
        v_cache: inputs.v_cache.len(),
        block_tables: inputs.block_tables.len(),
        context_lens: inputs.context_lens.len(),
        out: out.len(),
    })?;
    for (s, len) in inputs.context_lens.iter().enumerate() {
        let len = usize::try_from(*len).map_err(|_| shape_err(format!("sequence {s}: negative context")))?;
        if len > shape.max_blocks_per_seq * c.block_size {
            return Err(shape_err(format!("sequence {s}: {len} tokens do not fit its table")));
        }
        let used = len.div_ceil(c.block_size);
        let row = &inputs.block_tables[s * shape.max_blocks_per_seq..][..used];
        if let Some(b) = row.iter().find(|b| usize::try_from(**b).map_or(true, |b| b >= c.num_blocks)) {
            return Err(shape_err(format!("sequence {s}: block {b} outside the pool")));
        }
    }
    Ok(())
}

/// Gathers token `t` of sequence `s` for kv head `h`: (key row, value row) offsets.
fn token_offset(shape: &PagedAttentionShape, tables: &[i32], s: usize, t: usize, h: usize) -> usize {
    let c = &shape.cache;
    let blk = tables[s * shape.max_blocks_per_seq + t / c.block_size] as usize;
    shape.cache.offset(blk * c.block_size + t % c.block_size, h)
}

/// `out = softmax(scale * q Kᵀ) V` for each sequence and query head, query
/// head `h` reading kv head `h / (q_heads / kv_heads)`, in f64 with one
/// rounding to `T`. An empty context gives zeros.
pub fn paged_decode_attention<T: Elem>(
    shape: &PagedAttentionShape,
    inputs: &PagedAttentionInputs<'_, T>,
    out: &mut [T],
) -> Result<(), KernelError> {
    check(shape, inputs, out)?;
    let d = shape.cache.head_dim;
    let group = shape.q_heads / shape.cache.kv_heads;
    for s in 0..shape.num_seqs {
        let ctx = inputs.context_lens[s] as usize;
        for h in 0..shape.q_heads {
            let q = &inputs.q[(s * shape.q_heads + h) * d..][..d];
            let scores: Vec<f64> = (0..ctx)
                .map(|t| {
                    let k = &inputs.k_cache[token_offset(shape, inputs.block_tables, s, t, h / group)..][..d];
                    inputs.scale as f64
                        * q.iter().zip(k).map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64).sum::<f64>()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = p.iter().sum();
            let o = &mut out[(s * shape.q_heads + h) * d..][..d];
            for (e, oe) in o.iter_mut().enumerate() {
                let acc: f64 = (0..ctx)
                    .map(|t| {
                        p[t] * inputs.v_cache[token_offset(shape, inputs.block_tables, s, t, h / group) + e].to_f32()
                            as f64
                    })
                    .sum();
                *oe = T::from_f32(if ctx == 0 { 0.0 } else { (acc / z) as f32 });
            }
        }
    }
    Ok(())
}

/// The split-K (flash-decoding) formulation in f32: each partition of
/// `partition` tokens keeps a running max `m`, sum `l` and unnormalised
/// accumulator (an online softmax), and the partitions are merged by rescaling
/// to the global max. Mathematically equal to [`paged_decode_attention`]; it
/// is here so the merge the CUDA `split` + `reduce` kernels do is tested on CPU.
pub fn paged_decode_attention_split<T: Elem>(
    shape: &PagedAttentionShape,
    inputs: &PagedAttentionInputs<'_, T>,
    partition: usize,
    out: &mut [T],
) -> Result<(), KernelError> {
    check(shape, inputs, out)?;
    if partition == 0 {
        return Err(shape_err("empty partition".into()));
    }
    let d = shape.cache.head_dim;
    let group = shape.q_heads / shape.cache.kv_heads;
    for s in 0..shape.num_seqs {
        let ctx = inputs.context_lens[s] as usize;
        for h in 0..shape.q_heads {
            let q = &inputs.q[(s * shape.q_heads + h) * d..][..d];
            let mut parts: Vec<(f32, f32, Vec<f32>)> = Vec::new();
            for t0 in (0..ctx).step_by(partition) {
                let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0.0f32, vec![0.0f32; d]);
                for t in t0..(t0 + partition).min(ctx) {
                    let off = token_offset(shape, inputs.block_tables, s, t, h / group);
                    let dot: f32 =
                        q.iter().zip(&inputs.k_cache[off..off + d]).map(|(a, b)| a.to_f32() * b.to_f32()).sum();
                    let sc = dot * inputs.scale;
                    let m_new = m.max(sc);
                    let (corr, e) = ((m - m_new).exp(), (sc - m_new).exp());
                    l = l * corr + e;
                    for (a, v) in acc.iter_mut().zip(&inputs.v_cache[off..off + d]) {
                        *a = *a * corr + e * v.to_f32();
                    }
                    m = m_new;
                }
                parts.push((m, l, acc));
            }
            let mm = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
            let ll: f32 = parts.iter().map(|p| p.1 * (p.0 - mm).exp()).sum();
            let o = &mut out[(s * shape.q_heads + h) * d..][..d];
            for (e, oe) in o.iter_mut().enumerate() {
                let a: f32 = parts.iter().map(|p| p.2[e] * (p.0 - mm).exp()).sum();
                *oe = T::from_f32(if ll > 0.0 { a / ll } else { 0.0 });
            }
        }
    }
    Ok(())
}

/// Test data: a random pool, random block tables and lengths, and the same
/// keys and values laid out densely per sequence.
#[derive(Debug, Clone)]
pub struct RandomPagedCase {
    /// The shape.
    pub shape: PagedAttentionShape,
    /// Queries.
    pub q: Vec<f32>,
    /// Paged keys.
    pub k_cache: Vec<f32>,
    /// Paged values.
    pub v_cache: Vec<f32>,
    /// Block tables (unused entries are -1).
    pub block_tables: Vec<i32>,
    /// Context lengths.
    pub context_lens: Vec<i32>,
    /// Per sequence, keys `[ctx, kv_heads, head_dim]`.
    pub dense_k: Vec<Vec<f32>>,
    /// Per sequence, values `[ctx, kv_heads, head_dim]`.
    pub dense_v: Vec<Vec<f32>>,
}

impl RandomPagedCase {
    /// Draws a case: each sequence gets a random length in `0..=max_ctx` and
    /// distinct blocks drawn at random from a shuffled pool (with spare blocks
    /// left over, filled with noise that must never be read).
    pub fn draw(
        rng: &mut super::rng::TestRng,
        num_seqs: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        max_ctx: usize,
    ) -> Self {
        let block_size = 16;
        let max_blocks_per_seq = max_ctx.div_ceil(block_size).max(1);
        let lens: Vec<usize> = (0..num_seqs).map(|_| rng.below(max_ctx + 1)).collect();
        let needed: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum();
        let num_blocks = needed + 3;
        let cache = PagedKvShape { num_blocks, kv_heads, block_size, head_dim };
        let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
        rng.shuffle(&mut pool);
        let mut k_cache = rng.vec(cache.len(), -1.0, 1.0);
        let mut v_cache = rng.vec(cache.len(), -1.0, 1.0);
        let mut block_tables = vec![-1i32; num_seqs * max_blocks_per_seq];
        let (mut dense_k, mut dense_v) = (Vec::new(), Vec::new());
        let mut next = 0;
        for (s, len) in lens.iter().enumerate() {
            for b in 0..len.div_ceil(block_size) {
                block_tables[s * max_blocks_per_seq + b] = pool[next];
                next += 1;
            }
            let dk = rng.vec(len * kv_heads * head_dim, -1.0, 1.0);
            let dv = rng.vec(len * kv_heads * head_dim, -1.0, 1.0);
            for t in 0..*len {
                let blk = block_tables[s * max_blocks_per_seq + t / block_size] as usize;
                for h in 0..kv_heads {
                    let at = cache.offset(blk * block_size + t % block_size, h);
                    let src = (t * kv_heads + h) * head_dim;
                    k_cache[at..at + head_dim].copy_from_slice(&dk[src..src + head_dim]);
                    v_cache[at..at + head_dim].copy_from_slice(&dv[src..src + head_dim]);
                }
            }
            dense_k.push(dk);
            dense_v.push(dv);
        }
        let shape = PagedAttentionShape { num_seqs, q_heads, cache, max_blocks_per_seq };
        RandomPagedCase {
            q: rng.vec(num_seqs * q_heads * head_dim, -1.0, 1.0),
            shape,
            k_cache,
            v_cache,
            block_tables,
            context_lens: lens.iter().map(|l| *l as i32).collect(),
            dense_k,
            dense_v,
        }
    }

    /// The case as kernel inputs (f32).
    pub fn inputs(&self) -> PagedAttentionInputs<'_, f32> {
        PagedAttentionInputs {
            q: &self.q,
            k_cache: &self.k_cache,
            v_cache: &self.v_cache,
            block_tables: &self.block_tables,
            context_lens: &self.context_lens,
            scale: 1.0 / (self.shape.cache.head_dim as f32).sqrt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::reference::rng::TestRng;

    /// Attention written the textbook way on the dense copy: no paging, no online softmax.
    fn dense_attention(case: &RandomPagedCase) -> Vec<f32> {
        let sh = &case.shape;
        let (d, kvh) = (sh.cache.head_dim, sh.cache.kv_heads);
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0f32; case.q.len()];
        for s in 0..sh.num_seqs {
            let ctx = case.context_lens[s] as usize;
            for h in 0..sh.q_heads {
                let kh = h * kvh / sh.q_heads;
                let q = &case.q[(s * sh.q_heads + h) * d..][..d];
                let w: Vec<f64> = (0..ctx)
                    .map(|t| {
                        let k = &case.dense_k[s][(t * kvh + kh) * d..][..d];
                        (scale * q.iter().zip(k).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>()).exp()
                    })
                    .collect();
                let z: f64 = w.iter().sum();
                for e in 0..d {
                    let num: f64 = (0..ctx).map(|t| w[t] * case.dense_v[s][(t * kvh + kh) * d + e] as f64).sum();
                    out[(s * sh.q_heads + h) * d + e] = if ctx == 0 { 0.0 } else { (num / z) as f32 };
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn paged_equals_dense(seed in any::<u64>(), seqs in 1usize..5, group in 1usize..5, kvh in 1usize..3, dim_32 in 1usize..5, max_ctx in 0usize..200, part_log in 0u32..4) {
            let mut rng = TestRng::new(seed);
            let case = RandomPagedCase::draw(&mut rng, seqs, group * kvh, kvh, 32 * dim_32, max_ctx);
            let want = dense_attention(&case);
            let mut got = vec![0.0f32; want.len()];
            paged_decode_attention(&case.shape, &case.inputs(), &mut got).unwrap();
            for (a, b) in got.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-5, "{} vs {}", a, b);
            }
            let mut split = vec![0.0f32; want.len()];
            paged_decode_attention_split(&case.shape, &case.inputs(), 16 << part_log, &mut split).unwrap();
            for (a, b) in split.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-4, "split {} vs {}", a, b);
            }
        }
    }

    #[test]
    fn bad_tables_and_shapes_are_typed_errors() {
        let mut rng = TestRng::new(3);
        let case = RandomPagedCase::draw(&mut rng, 2, 4, 2, 64, 40);
        let mut out = vec![0.0f32; case.q.len()];
        let mut tables = case.block_tables.clone();
        let lens = vec![33, 0];
        tables[0] = case.shape.cache.num_blocks as i32;
        let bad = PagedAttentionInputs { block_tables: &tables, context_lens: &lens, ..case.inputs() };
        assert!(paged_decode_attention(&case.shape, &bad, &mut out).is_err());
        let too_long = vec![(case.shape.max_blocks_per_seq * 16 + 1) as i32, 0];
        let bad = PagedAttentionInputs { context_lens: &too_long, ..case.inputs() };
        assert!(paged_decode_attention(&case.shape, &bad, &mut out).is_err());
        let mut odd = case.shape;
        odd.q_heads = 3;
        assert!(paged_decode_attention(&odd, &case.inputs(), &mut out).is_err());
    }

    #[test]
    fn empty_context_gives_zeros() {
        let mut rng = TestRng::new(4);
        let mut case = RandomPagedCase::draw(&mut rng, 1, 2, 1, 32, 30);
        case.context_lens[0] = 0;
        let mut out = vec![1.0f32; case.q.len()];
        paged_decode_attention(&case.shape, &case.inputs(), &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 0.0));
        paged_decode_attention_split(&case.shape, &case.inputs(), 64, &mut out).unwrap();
        assert!(out.iter().all(|x| *x == 0.0));
    }
}
