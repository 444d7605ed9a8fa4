//! Decode attention on the CPU: one query token per sequence against that
//! sequence's cached keys and values, read in place from the paged KV
//! cache's blocks (through the sequence's block table, [`CacheView`]).
//!
//! A decode step's attention is tiny (for SmolLM2-135M, 9 heads × 64 dims
//! against a few hundred cached tokens), so a general matmul costs more in
//! packing, copies of the narrowed cache view and thread hand-offs than in
//! arithmetic. This is the plain loop, written so the compiler vectorizes
//! the dot products and the value accumulation (compiled for AVX2 when the
//! CPU has it, with the same results), on one thread; each KV head's keys
//! and values are read once for all the query heads that share them.
//!
//! Grouped-query attention: query head `h` reads KV head `h / (heads /
//! kv_heads)`. Numerics: scores are `(q · k) * scale`, softmax subtracts the
//! row maximum, and the output is `Σ p_t v_t / Σ p_t`, all in f32.

use crate::{KernelError, KernelId};

/// Where one sequence's cached keys (or values) lie in a buffer, paged as
/// the KV cache keeps them. Token `t` of KV head `g` starts at
///
/// ```text
/// offset + blocks[t / block_size] * block_stride + g * head_stride + (t % block_size) * head_dim
/// ```
///
/// The runtime's pool is `[num_blocks, kv_heads, block_size, head_dim]`
/// ([`CacheView::paged`]); a contiguous
/// `[kv_heads, capacity, head_dim]` buffer is one block of `capacity` tokens
/// ([`CacheView::contiguous`]).
#[derive(Debug, Clone, Copy)]
pub struct CacheView<'a> {
    /// Index of block 0's head 0, token 0.
    pub offset: usize,
    /// The sequence's blocks in token order (its block table).
    pub blocks: &'a [u32],
    /// Tokens per block.
    pub block_size: usize,
    /// Elements from one block to the next.
    pub block_stride: usize,
    /// Elements from one KV head to the next within a block.
    pub head_stride: usize,
}

impl<'a> CacheView<'a> {
    /// A sequence's view of a `[num_blocks, kv_heads, block_size, head_dim]` pool.
    pub fn paged(blocks: &'a [u32], kv_heads: usize, block_size: usize, head_dim: usize) -> Self {
        let head_stride = block_size * head_dim;
        CacheView { offset: 0, blocks, block_size, block_stride: kv_heads * head_stride, head_stride }
    }

    /// The per-block slices of KV head `g`'s first `len` tokens, in token
    /// order (the last one partial). Panics if they do not lie in `buf`
    /// (the kernels check the view first).
    pub fn runs<'b>(
        &self,
        buf: &'b [f32],
        g: usize,
        len: usize,
        hd: usize,
    ) -> impl Iterator<Item = &'b [f32]> + use<'b, '_> {
        let bs = self.block_size;
        self.blocks.iter().take(len.div_ceil(bs)).enumerate().map(move |(i, &b)| {
            let run = bs.min(len - i * bs);
            &buf[self.offset + b as usize * self.block_stride + g * self.head_stride..][..run * hd]
        })
    }

    /// Whether `len` tokens of `kv_heads` heads lie inside `buf`.
    fn fits(&self, buf: &[f32], kv_heads: usize, len: usize, hd: usize) -> bool {
        let bs = self.block_size;
        bs > 0
            && self.blocks.len() * bs >= len
            && self.blocks.iter().take(len.div_ceil(bs)).enumerate().all(|(i, &b)| {
                let run = bs.min(len - i * bs);
                self.offset + b as usize * self.block_stride + (kv_heads - 1) * self.head_stride + run * hd <= buf.len()
            })
    }
}

impl CacheView<'static> {
    /// A `[kv_heads, capacity, head_dim]` buffer from element `offset` on.
    pub fn contiguous(offset: usize, capacity: usize, head_dim: usize) -> Self {
        const ONE_BLOCK: &[u32] = &[0];
        CacheView { offset, blocks: ONE_BLOCK, block_size: capacity, block_stride: 0, head_stride: capacity * head_dim }
    }
}

/// Shape of a decode attention call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Cached tokens to attend over (the query's own included).
    pub len: usize,
}

/// One query row of a [`decode_gqa_rows`] call.
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    /// The query, `heads * head_dim`, head-major.
    pub q: &'a [f32],
    /// The sequence's key buffer and where its keys lie.
    pub k: (&'a [f32], CacheView<'a>),
    /// The sequence's value buffer and where its values lie.
    pub v: (&'a [f32], CacheView<'a>),
    /// Cached tokens to attend over (the query's own included).
    pub len: usize,
}

/// Attention of one query row `q` (`heads * head_dim`, head-major) over `len`
/// cached tokens of `k` and `v`; writes `out` (`heads * head_dim`), on the
/// calling thread.
pub fn decode_gqa(
    q: &[f32],
    k: (&[f32], CacheView<'_>),
    v: (&[f32], CacheView<'_>),
    shape: DecodeShape,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let row = DecodeRow { q, k, v, len: shape.len };
    check(&row, shape, out.len())?;
    let width = shape.heads / shape.kv_heads * shape.head_dim;
    for (g, o) in out.chunks_exact_mut(width).enumerate() {
        head_group(&row, shape, g, scale, o);
    }
    Ok(())
}

/// [`decode_gqa`] for many rows (a decode step's sequences, or a chunk
/// verified row by row), every (row, KV head) pair a task on the current
/// rayon pool: a decode step's attention is bound by reading the cache,
/// and this reads it on every core. `shape.len` is ignored (each row has
/// its own); `out` holds the rows in order. Each row's result equals
/// [`decode_gqa`]'s bit for bit.
pub fn decode_gqa_rows(
    rows: &[DecodeRow<'_>],
    shape: DecodeShape,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    use rayon::prelude::*;
    let width = shape.heads * shape.head_dim;
    if out.len() != rows.len() * width {
        return Err(shape_err(format!("out {} for {} rows of {width}", out.len(), rows.len())));
    }
    for r in rows {
        check(r, DecodeShape { len: r.len, ..shape }, width)?;
    }
    let group_width = shape.heads / shape.kv_heads * shape.head_dim;
    out.par_chunks_mut(group_width).enumerate().for_each(|(i, o)| {
        let r = &rows[i / shape.kv_heads];
        head_group(r, DecodeShape { len: r.len, ..shape }, i % shape.kv_heads, scale, o);
    });
    Ok(())
}

fn shape_err(message: String) -> KernelError {
    KernelError::Shape { kernel: KernelId::PagedAttention, message }
}

/// Checks that `row` fits `shape` and an output of `out_len`.
fn check(row: &DecodeRow<'_>, shape: DecodeShape, out_len: usize) -> Result<(), KernelError> {
    let DecodeShape { heads, kv_heads, head_dim: hd, len } = shape;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || row.q.len() != heads * hd || out_len != heads * hd {
        return Err(shape_err(format!(
            "q {} / out {out_len} for {heads} heads of {hd} over {kv_heads} KV heads",
            row.q.len()
        )));
    }
    let fits = |(b, view): (&[f32], CacheView<'_>)| view.fits(b, kv_heads, len, hd);
    if len == 0 || !fits(row.k) || !fits(row.v) {
        return Err(shape_err(format!("{len} tokens do not fit the cache buffers")));
    }
    Ok(())
}

/// KV head `g` of a checked row: the outputs of its query heads, `out`
/// (`heads / kv_heads * head_dim`), on the fastest build this CPU runs.
fn head_group(row: &DecodeRow<'_>, shape: DecodeShape, g: usize, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features `group_avx2` enables were just detected.
        unsafe { group_avx2(row, shape, g, scale, out) };
        return;
    }
    group(row, shape, g, scale, out, dot);
}

/// [`group`] compiled for AVX2: the same code and operation order (Rust
/// never contracts `a * b + c` into an FMA), so it is bit-identical to the
/// portable build, only in wider vectors.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2(row: &DecodeRow<'_>, shape: DecodeShape, g: usize, scale: f32, out: &mut [f32]) {
    // SAFETY: this function's features are the ones `dot_avx2` uses.
    group(row, shape, g, scale, out, |a, b| unsafe { dot_avx2(a, b) })
}

/// The body of [`head_group`]: each cached key and value of KV head `g` is
/// read once for all the query heads that share it.
#[inline(always)]
fn group(
    row: &DecodeRow<'_>,
    shape: DecodeShape,
    g: usize,
    scale: f32,
    og: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let DecodeShape { heads, kv_heads, head_dim: hd, len } = shape;
    let ((k, kv), (v, vv)) = (row.k, row.v);
    let group = heads / kv_heads;
    let width = group * hd;
    let mut scores = vec![0f32; group * len];
    let qg = &row.q[g * width..(g + 1) * width];
    for (t, key) in kv.runs(k, g, len, hd).flat_map(|r| r.chunks_exact(hd)).enumerate() {
        for (j, qh) in qg.chunks_exact(hd).enumerate() {
            scores[j * len + t] = dot(qh, key) * scale;
        }
    }
    let mut inv = [0f32; MAX_GROUP];
    let inv = if group <= MAX_GROUP { &mut inv[..group] } else { &mut vec![0f32; group][..] };
    for (row, inv) in scores.chunks_exact_mut(len).zip(inv.iter_mut()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, s| a.max(*s));
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        *inv = 1.0 / sum;
    }
    og.fill(0.0);
    for (t, val) in vv.runs(v, g, len, hd).flat_map(|r| r.chunks_exact(hd)).enumerate() {
        for (j, o) in og.chunks_exact_mut(hd).enumerate() {
            let p = scores[j * len + t];
            for (o, x) in o.iter_mut().zip(val) {
                *o += p * x;
            }
        }
    }
    for (o, inv) in og.chunks_exact_mut(hd).zip(inv.iter()) {
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
}

/// Query heads per KV head whose softmax sums live on the stack.
const MAX_GROUP: usize = 16;

/// A dot product in 16 independent lanes (so it vectorizes without one long
/// dependency chain), summed as a tree (halves added to halves, so the
/// reduction is a few shuffles, not sixteen dependent adds).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (al, bl) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = al.remainder().iter().zip(bl.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in al.zip(bl) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// [`dot`] in AVX2 registers, operation for operation: lanes 0–7 and 8–15
/// in two vectors, products rounded then added (no FMA), and the same tree.
///
/// # Safety
/// Only to be inlined into a function compiled with AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (al, bl) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = al.remainder().iter().zip(bl.remainder()).map(|(x, y)| x * y).sum();
    // SAFETY: every load reads 8 of a 16-value chunk's f32.
    unsafe {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (x, y) in al.zip(bl) {
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(y.as_ptr())));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8)), _mm256_loadu_ps(y.as_ptr().add(8))),
            );
        }
        let s8 = _mm256_add_ps(lo, hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) + tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The textbook formula in f64, on a dense `[kv_heads, len, hd]` copy.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: DecodeShape, scale: f64) -> Vec<f64> {
        let group = s.heads / s.kv_heads;
        let mut out = vec![0f64; s.heads * s.head_dim];
        for h in 0..s.heads {
            let g = h / group;
            let at = |b: &[f32], t: usize, d: usize| b[(g * s.len + t) * s.head_dim + d] as f64;
            let sc: Vec<f64> = (0..s.len)
                .map(|t| (0..s.head_dim).map(|d| q[h * s.head_dim + d] as f64 * at(k, t, d)).sum::<f64>() * scale)
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..s.head_dim {
                out[h * s.head_dim + d] = (0..s.len).map(|t| e[t] * at(v, t, d)).sum::<f64>() / z;
            }
        }
        out
    }

    #[test]
    fn equals_naive_attention_on_a_strided_cache() {
        let mut seed = 3;
        for (heads, kv_heads, hd, len, cap) in
            [(9, 3, 64, 1, 4), (9, 3, 64, 37, 64), (4, 4, 12, 5, 9), (8, 2, 20, 130, 130)]
        {
            let s = DecodeShape { heads, kv_heads, head_dim: hd, len };
            let q: Vec<f32> = (0..heads * hd).map(|_| lcg(&mut seed) * 2.0).collect();
            // A cache buffer with spare capacity and a leading offset.
            let off = 7;
            let mut kb = vec![f32::NAN; off + kv_heads * cap * hd];
            let mut vb = kb.clone();
            let (mut kd, mut vd) = (Vec::new(), Vec::new());
            for g in 0..kv_heads {
                for t in 0..len {
                    for d in 0..hd {
                        let (x, y) = (lcg(&mut seed), lcg(&mut seed));
                        kb[off + g * cap * hd + t * hd + d] = x;
                        vb[off + g * cap * hd + t * hd + d] = y;
                        kd.push(x);
                        vd.push(y);
                    }
                }
            }
            let view = CacheView::contiguous(off, cap, hd);
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![0f32; heads * hd];
            decode_gqa(&q, (&kb, view), (&vb, view), s, scale, &mut out).unwrap();
            let want = naive(&q, &kd, &vd, s, scale as f64);
            for (o, w) in out.iter().zip(&want) {
                assert!((*o as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "{o} vs {w} for {s:?}");
            }
        }
    }

    #[test]
    fn the_avx2_build_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let mut seed = 11;
            for (heads, kv_heads, hd, len, cap) in [(9, 3, 64, 77, 80), (4, 2, 40, 5, 9)] {
                let s = DecodeShape { heads, kv_heads, head_dim: hd, len };
                let q: Vec<f32> = (0..heads * hd).map(|_| lcg(&mut seed)).collect();
                let k: Vec<f32> = (0..kv_heads * cap * hd).map(|_| lcg(&mut seed)).collect();
                let v: Vec<f32> = (0..kv_heads * cap * hd).map(|_| lcg(&mut seed)).collect();
                let view = CacheView::contiguous(0, cap, hd);
                let (mut a, mut b) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
                let row = DecodeRow { q: &q, k: (&k, view), v: (&v, view), len };
                let width = heads / kv_heads * hd;
                for (g, (a, b)) in a.chunks_exact_mut(width).zip(b.chunks_exact_mut(width)).enumerate() {
                    group(&row, s, g, 0.125, a, dot);
                    // SAFETY: the features were just detected.
                    unsafe { group_avx2(&row, s, g, 0.125, b) };
                }
                assert_eq!(
                    a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn many_rows_at_once_equal_each_row_alone() {
        let mut seed = 13;
        let (heads, kv_heads, hd, cap) = (6, 2, 32, 40);
        let shape = DecodeShape { heads, kv_heads, head_dim: hd, len: 0 };
        let bufs: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
            .map(|_| {
                let mut b = || (0..kv_heads * cap * hd).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
                (b(), b())
            })
            .collect();
        let view = CacheView::contiguous(0, cap, hd);
        let qs: Vec<Vec<f32>> = (0..4).map(|_| (0..heads * hd).map(|_| lcg(&mut seed)).collect()).collect();
        // Rows of three sequences, two rows sharing one (as a verified chunk).
        let rows: Vec<DecodeRow<'_>> = [(0, 7), (1, 1), (2, 39), (2, 40)]
            .iter()
            .zip(&qs)
            .map(|(&(b, len), q)| DecodeRow { q, k: (&bufs[b].0, view), v: (&bufs[b].1, view), len })
            .collect();
        let mut many = vec![0f32; rows.len() * heads * hd];
        decode_gqa_rows(&rows, shape, 0.2, &mut many).unwrap();
        for (r, got) in rows.iter().zip(many.chunks_exact(heads * hd)) {
            let mut alone = vec![0f32; heads * hd];
            decode_gqa(r.q, r.k, r.v, DecodeShape { len: r.len, ..shape }, 0.2, &mut alone).unwrap();
            assert_eq!(got, &alone[..]);
        }
        let too_long = [DecodeRow { len: cap + 1, ..rows[0] }];
        assert!(decode_gqa_rows(&too_long, shape, 0.2, &mut many[..heads * hd]).is_err());
        assert!(decode_gqa_rows(&rows, shape, 0.2, &mut many[1..]).is_err());
    }

    /// A paged pool with a scrambled block table gives the contiguous
    /// buffer's bits: the blocks change where tokens lie, not the order
    /// they are summed in.
    #[test]
    fn a_paged_cache_gives_the_contiguous_bits() {
        let mut seed = 17;
        let (heads, kv_heads, hd, bs) = (9, 3, 64, 16);
        for len in [1, 15, 16, 17, 70] {
            let s = DecodeShape { heads, kv_heads, head_dim: hd, len };
            let q: Vec<f32> = (0..heads * hd).map(|_| lcg(&mut seed)).collect();
            let dense_k: Vec<f32> = (0..kv_heads * len * hd).map(|_| lcg(&mut seed)).collect();
            let dense_v: Vec<f32> = (0..kv_heads * len * hd).map(|_| lcg(&mut seed)).collect();
            // Blocks in a pool of 9, in scrambled order; the rest NaN.
            let used = len.div_ceil(bs);
            let table: Vec<u32> = [7, 2, 5, 0, 8, 1, 3][..used].to_vec();
            let mut pk = vec![f32::NAN; 9 * kv_heads * bs * hd];
            let mut pv = pk.clone();
            let view = CacheView::paged(&table, kv_heads, bs, hd);
            for g in 0..kv_heads {
                for t in 0..len {
                    let at = table[t / bs] as usize * view.block_stride + g * view.head_stride + (t % bs) * hd;
                    pk[at..at + hd].copy_from_slice(&dense_k[(g * len + t) * hd..][..hd]);
                    pv[at..at + hd].copy_from_slice(&dense_v[(g * len + t) * hd..][..hd]);
                }
            }
            let (mut paged, mut dense) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
            decode_gqa(&q, (&pk, view), (&pv, view), s, 0.125, &mut paged).unwrap();
            let flat = CacheView::contiguous(0, len, hd);
            decode_gqa(&q, (&dense_k, flat), (&dense_v, flat), s, 0.125, &mut dense).unwrap();
            assert_eq!(
                paged.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                dense.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "len {len}"
            );
            // A table one block short, or a block past the pool, is refused.
            let short = CacheView::paged(&table[..used - 1], kv_heads, bs, hd);
            assert!(decode_gqa(&q, (&pk, short), (&pv, view), s, 0.125, &mut paged).is_err());
            let mut outside = table.clone();
            outside[used - 1] = 9;
            let outside = CacheView::paged(&outside, kv_heads, bs, hd);
            assert!(decode_gqa(&q, (&pk, view), (&pv, outside), s, 0.125, &mut paged).is_err());
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_typed_errors() {
        let view = CacheView::contiguous(0, 2, 4);
        let s = DecodeShape { heads: 2, kv_heads: 1, head_dim: 4, len: 2 };
        let mut out = [0f32; 8];
        assert!(decode_gqa(&[0.0; 8], (&[0.0; 8], view), (&[0.0; 8], view), s, 1.0, &mut out).is_ok());
        let long = DecodeShape { len: 3, ..s };
        assert!(decode_gqa(&[0.0; 8], (&[0.0; 8], view), (&[0.0; 8], view), long, 1.0, &mut out).is_err());
        let odd = DecodeShape { kv_heads: 3, ..s };
        assert!(decode_gqa(&[0.0; 8], (&[0.0; 8], view), (&[0.0; 8], view), odd, 1.0, &mut out).is_err());
        let empty = DecodeShape { len: 0, ..s };
        assert!(decode_gqa(&[0.0; 8], (&[0.0; 8], view), (&[0.0; 8], view), empty, 1.0, &mut out).is_err());
    }
}
