//! References for the fused CUDA kernels that touch rows and the KV cache:
//! residual add + RMSNorm (`cuda/rms_norm.cu`), RoPE + paged KV write
//! (`cuda/rope_kv.cu`) and the MLP's SiLU-and-multiply (`cuda/silu_mul.cu`).
//! Same layouts, same storage type `T`, same rounding points as the kernels.
//! RoPE and SiLU-and-multiply compute in `T`'s arithmetic, as candle's
//! unfused kernels do (each operation rounded to `T`), so that a step that
//! fuses them gives the unfused step's numbers; the norm rounds once, and its
//! reduction here uses f64, so the kernel differs only by f32 reassociation.

use super::paged::PagedKvShape;
use super::RopePairs;
use crate::{Elem, KernelError, KernelId};

fn shape_err(kernel: KernelId, message: String) -> KernelError {
    KernelError::Shape { kernel, message }
}

/// Fused residual add + RMSNorm, row by row (`weight.len()` is the row width):
/// `h = T(x + residual)`, `residual = h`, `out = T(h * rsqrt(mean(h²) + eps) * w)`.
/// The mean is over the rounded `h`, as in the kernel.
pub fn fused_add_rms_norm<T: Elem>(
    x: &[T],
    residual: &mut [T],
    weight: &[T],
    eps: f32,
    out: &mut [T],
) -> Result<(), KernelError> {
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) || residual.len() != x.len() || out.len() != x.len() {
        return Err(shape_err(
            KernelId::RmsNorm,
            format!("x {} / residual {} / out {} not rows of {dim}", x.len(), residual.len(), out.len()),
        ));
    }
    for ((xr, rr), or) in x.chunks(dim).zip(residual.chunks_mut(dim)).zip(out.chunks_mut(dim)) {
        let mut ss = 0.0f64;
        for (r, v) in rr.iter_mut().zip(xr) {
            *r = T::from_f32(v.to_f32() + r.to_f32());
            ss += (r.to_f32() as f64).powi(2);
        }
        let inv = (1.0 / (ss / dim as f64 + eps as f64).sqrt()) as f32;
        for ((o, r), w) in or.iter_mut().zip(rr.iter()).zip(weight) {
            *o = T::from_f32(r.to_f32() * inv * w.to_f32());
        }
    }
    Ok(())
}

/// The MLP's activation from the stacked gate/up product (vLLM's
/// `silu_and_mul`): for `gate_up` rows `[gate (inter) | up (inter)]`,
/// `out[r, i] = silu(gate[r, i]) * up[r, i]` with `silu(g) = g / (1 +
/// exp(-g))`, in `T`'s arithmetic as candle's SiLU and multiply compute it
/// (the exponential, the sum, the quotient and the product each rounded to
/// `T`; in f32 the plain formula). `out` holds the rows' `inter` results each.
pub fn silu_mul<T: Elem>(gate_up: &[T], inter: usize, out: &mut [T]) -> Result<(), KernelError> {
    check_silu_mul(gate_up.len(), inter, out.len())?;
    let t = |v: f32| T::from_f32(v).to_f32();
    for (row, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
            let g = g.to_f32();
            let silu = t(g / t(1.0 + t((-g).exp())));
            *o = T::from_f32(silu * u.to_f32());
        }
    }
    Ok(())
}

/// Checks [`silu_mul`]'s lengths: `gate_up` rows of `2 * inter`, `out` the
/// same rows of `inter`.
pub fn check_silu_mul(gate_up: usize, inter: usize, out: usize) -> Result<(), KernelError> {
    if inter == 0 || !out.is_multiple_of(inter) || gate_up != 2 * out {
        return Err(shape_err(
            KernelId::SiluMul,
            format!("gate_up {gate_up} and out {out} are not rows of 2 × {inter} and {inter}"),
        ));
    }
    Ok(())
}

/// The cos/sin table the RoPE kernel reads: `[max_pos, head_dim]` f32, cos of
/// pair `i` at `[p, i]` and its sin at `[p, head_dim / 2 + i]`, with
/// `inv_freq[i]` the angular frequency of pair `i` (`head_dim / 2` of them).
pub fn cos_sin_cache(inv_freq: &[f32], max_pos: usize) -> Vec<f32> {
    let half = inv_freq.len();
    let mut t = vec![0.0f32; max_pos * 2 * half];
    for p in 0..max_pos {
        for (i, f) in inv_freq.iter().enumerate() {
            let (s, c) = (p as f64 * *f as f64).sin_cos();
            t[p * 2 * half + i] = c as f32;
            t[p * 2 * half + half + i] = s as f32;
        }
    }
    t
}

/// Shape of one RoPE + KV-write call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeKvShape {
    /// Tokens in the batch.
    pub tokens: usize,
    /// Query heads (a multiple of the cache's kv heads).
    pub q_heads: usize,
    /// The paged cache written to (its `head_dim` is the heads').
    pub cache: PagedKvShape,
    /// Rows of the cos/sin table.
    pub max_pos: usize,
    /// How rotary pairs are formed.
    pub pairs: RopePairs,
}

/// Buffer lengths (in elements) of one RoPE + KV-write call, as both the
/// reference and the CUDA wrapper check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeKvLens {
    /// `src`.
    pub src: usize,
    /// `q_out`.
    pub q_out: usize,
    /// `cos_sin`.
    pub cos_sin: usize,
    /// `positions`.
    pub positions: usize,
    /// `slots`.
    pub slots: usize,
    /// `k_cache`.
    pub k_cache: usize,
    /// `v_cache`.
    pub v_cache: usize,
}

impl RopeKvShape {
    /// Elements of one token's row of the stacked projection `src`: its
    /// query heads, then its key heads, then its value heads.
    pub fn src_width(&self) -> usize {
        (self.q_heads + 2 * self.cache.kv_heads) * self.cache.head_dim
    }

    /// Checks the geometry and that the buffers fit it.
    pub fn check_lens(&self, lens: &RopeKvLens) -> Result<(), KernelError> {
        let c = &self.cache;
        let d = c.head_dim;
        let want = RopeKvLens {
            src: self.tokens * self.src_width(),
            q_out: self.tokens * self.q_heads * d,
            cos_sin: self.max_pos * d,
            positions: self.tokens,
            slots: self.tokens,
            k_cache: c.len(),
            v_cache: c.len(),
        };
        if d > 0 && d.is_multiple_of(2) && c.block_size > 0 && *lens == want {
            Ok(())
        } else {
            Err(shape_err(KernelId::RopeKvWrite, format!("{lens:?} do not fit {self:?} (want {want:?})")))
        }
    }
}

/// The read-only inputs of [`rope_kv_write`] (layouts in `cuda/rope_kv.cu`).
#[derive(Debug, Clone, Copy)]
pub struct RopeKvInputs<'a, T> {
    /// The stacked q/k/v projection, `[tokens, q_heads + 2 * kv_heads,
    /// head_dim]` (see [`pack_qkv`]): queries and keys rotated on their way
    /// out, values copied.
    pub src: &'a [T],
    /// [`cos_sin_cache`] output.
    pub cos_sin: &'a [f32],
    /// Position of each token.
    pub positions: &'a [i32],
    /// Cache slot of each token (`block * block_size + offset`; `-1` for padding).
    pub slots: &'a [i32],
}

/// `q`, `k` and `v` (`[tokens, heads, head_dim]` each) as one stacked
/// projection, `[tokens, q_heads + 2 * kv_heads, head_dim]`: what a fused
/// q/k/v matmul yields and [`RopeKvInputs::src`] reads.
pub fn pack_qkv<T: Copy>(shape: &RopeKvShape, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let d = shape.cache.head_dim;
    let (qw, kw) = (shape.q_heads * d, shape.cache.kv_heads * d);
    let mut out = Vec::with_capacity(shape.tokens * shape.src_width());
    for t in 0..shape.tokens {
        out.extend_from_slice(&q[t * qw..][..qw]);
        out.extend_from_slice(&k[t * kw..][..kw]);
        out.extend_from_slice(&v[t * kw..][..kw]);
    }
    out
}

/// Writes each token's rotated queries to `q_out` (`[tokens, q_heads,
/// head_dim]`) and its rotated keys and plain values into the paged caches
/// at its slot. A token with a position outside `[0, max_pos)` is left
/// untouched (its `q_out` rows too); one with a slot outside the cache gets
/// its queries rotated and writes nothing else (the kernel's behaviour).
/// The rotations are in `T`'s arithmetic: the table rounded to `T`, each
/// product and each sum rounded to `T` (in f32, the plain formula).
pub fn rope_kv_write<T: Elem>(
    shape: &RopeKvShape,
    inputs: &RopeKvInputs<'_, T>,
    q_out: &mut [T],
    k_cache: &mut [T],
    v_cache: &mut [T],
) -> Result<(), KernelError> {
    shape.check_lens(&RopeKvLens {
        src: inputs.src.len(),
        q_out: q_out.len(),
        cos_sin: inputs.cos_sin.len(),
        positions: inputs.positions.len(),
        slots: inputs.slots.len(),
        k_cache: k_cache.len(),
        v_cache: v_cache.len(),
    })?;
    let c = &shape.cache;
    let (d, half) = (c.head_dim, c.head_dim / 2);
    // In `T`'s arithmetic, as the kernel (and candle's RoPE) computes.
    let t = |v: f32| T::from_f32(v).to_f32();
    let rotate = |src: &[T], dst: &mut [T], pos: usize| {
        for i in 0..half {
            let (a, b) = shape.pairs.indices(i, d);
            let (cs, sn) = (t(inputs.cos_sin[pos * d + i]), t(inputs.cos_sin[pos * d + half + i]));
            let (xa, xb) = (src[a].to_f32(), src[b].to_f32());
            dst[a] = T::from_f32(t(xa * cs) - t(xb * sn));
            dst[b] = T::from_f32(t(xa * sn) + t(xb * cs));
        }
    };
    for t in 0..shape.tokens {
        let pos = inputs.positions[t];
        if pos < 0 || pos as usize >= shape.max_pos {
            continue;
        }
        let pos = pos as usize;
        let row = &inputs.src[t * shape.src_width()..][..shape.src_width()];
        for h in 0..shape.q_heads {
            rotate(&row[h * d..][..d], &mut q_out[(t * shape.q_heads + h) * d..][..d], pos);
        }
        let Some(slot) = c.slot(inputs.slots[t]) else { continue };
        for h in 0..c.kv_heads {
            let (k, v) = ((shape.q_heads + h) * d, (shape.q_heads + c.kv_heads + h) * d);
            let dst = c.offset(slot, h);
            rotate(&row[k..k + d], &mut k_cache[dst..dst + d], pos);
            v_cache[dst..dst + d].copy_from_slice(&row[v..v + d]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::dtype::{from_f32_slice, to_f32_vec};
    use crate::reference::{rms_norm, rng::TestRng, rope};

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn fused_rms_norm_equals_add_then_norm() {
        let mut rng = TestRng::new(1);
        for (rows, dim) in [(1, 8), (3, 64), (5, 4096), (2, 100)] {
            let x = rng.vec(rows * dim, -2.0, 2.0);
            let r0 = rng.vec(rows * dim, -2.0, 2.0);
            let w = rng.vec(dim, 0.5, 1.5);
            // Unfused, f32: the existing reference (add, then norm).
            let (mut r_unfused, mut out_unfused) = (r0.clone(), vec![0.0; rows * dim]);
            rms_norm(&x, Some(&mut r_unfused), &w, 1e-5, &mut out_unfused).unwrap();
            let (mut r_fused, mut out_fused) = (r0.clone(), vec![0.0; rows * dim]);
            fused_add_rms_norm(&x, &mut r_fused, &w, 1e-5, &mut out_fused).unwrap();
            assert_eq!(r_fused, r_unfused);
            for (a, b) in out_fused.iter().zip(&out_unfused) {
                assert!(close(*a, *b, 1e-5), "{a} vs {b}");
            }
            // bf16: the same composition, with the kernel's two rounding points.
            let (xb, wb) = (from_f32_slice::<bf16>(&x), from_f32_slice::<bf16>(&w));
            let mut rb = from_f32_slice::<bf16>(&r0);
            let mut ob = vec![bf16::ZERO; rows * dim];
            fused_add_rms_norm(&xb, &mut rb, &wb, 1e-5, &mut ob).unwrap();
            let sum: Vec<f32> = xb
                .iter()
                .zip(from_f32_slice::<bf16>(&r0))
                .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()).to_f32())
                .collect();
            assert_eq!(to_f32_vec(&rb), sum);
            let mut expect = vec![0.0; rows * dim];
            rms_norm(&sum, None, &to_f32_vec(&wb), 1e-5, &mut expect).unwrap();
            for (a, b) in to_f32_vec(&ob).iter().zip(&expect) {
                assert!(close(*a, *b, 1.0 / 128.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn silu_mul_is_silu_of_the_gate_times_up() {
        let mut rng = TestRng::new(3);
        let (rows, inter) = (3, 40);
        let gate_up = rng.vec(rows * 2 * inter, -6.0, 6.0);
        let mut out = vec![0.0f32; rows * inter];
        silu_mul(&gate_up, inter, &mut out).unwrap();
        for r in 0..rows {
            for i in 0..inter {
                let (g, u) = (gate_up[r * 2 * inter + i] as f64, gate_up[r * 2 * inter + inter + i] as f64);
                // silu(g) = g * sigmoid(g), formed independently.
                let want = g * (0.5 * (1.0 + (g / 2.0).tanh())) * u;
                assert!(close(out[r * inter + i], want as f32, 1e-5), "{} vs {want}", out[r * inter + i]);
            }
        }
        assert!(silu_mul(&gate_up, inter, &mut out[1..]).is_err());
        assert!(silu_mul(&gate_up, 0, &mut out).is_err());
    }

    fn inv_freq(d: usize) -> Vec<f32> {
        (0..d / 2).map(|i| 10000f32.powf(-(2.0 * i as f32) / d as f32)).collect()
    }

    #[test]
    fn rope_kv_write_puts_each_token_in_its_slot() {
        let mut rng = TestRng::new(2);
        for pairs in [RopePairs::Interleaved, RopePairs::HalfSplit] {
            let cache = PagedKvShape { num_blocks: 7, kv_heads: 2, block_size: 16, head_dim: 64 };
            let shape = RopeKvShape { tokens: 40, q_heads: 4, cache, max_pos: 300, pairs };
            let d = cache.head_dim;
            let freqs = inv_freq(d);
            let cos_sin = cos_sin_cache(&freqs, shape.max_pos);
            let q0 = rng.vec(shape.tokens * shape.q_heads * d, -1.0, 1.0);
            let k = rng.vec(shape.tokens * cache.kv_heads * d, -1.0, 1.0);
            let v = rng.vec(k.len(), -1.0, 1.0);
            let positions: Vec<i32> = (0..shape.tokens).map(|_| rng.below(shape.max_pos) as i32).collect();
            let mut all_slots: Vec<i32> = (0..(cache.num_blocks * cache.block_size) as i32).collect();
            rng.shuffle(&mut all_slots);
            let mut slots = all_slots[..shape.tokens].to_vec();
            slots[3] = -1; // padding: q rotated, nothing written
            let sentinel = 1234.5f32;
            let (mut kc, mut vc) = (vec![sentinel; cache.len()], vec![sentinel; cache.len()]);
            let mut q = vec![sentinel; q0.len()];
            let src = pack_qkv(&shape, &q0, &k, &v);
            let inputs = RopeKvInputs { src: &src, cos_sin: &cos_sin, positions: &positions, slots: &slots };
            rope_kv_write(&shape, &inputs, &mut q, &mut kc, &mut vc).unwrap();
            let mut written = vec![false; cache.len()];
            for t in 0..shape.tokens {
                let pos = positions[t] as usize;
                for h in 0..shape.q_heads {
                    let mut want = q0[(t * shape.q_heads + h) * d..][..d].to_vec();
                    rope(&mut want, pos, &freqs, pairs).unwrap();
                    for (a, b) in q[(t * shape.q_heads + h) * d..][..d].iter().zip(&want) {
                        assert!(close(*a, *b, 1e-5));
                    }
                }
                if slots[t] < 0 {
                    continue;
                }
                let (blk, off) = (slots[t] as usize / cache.block_size, slots[t] as usize % cache.block_size);
                for h in 0..cache.kv_heads {
                    // The documented layout, spelled out independently of `offset`.
                    let at = ((blk * cache.kv_heads + h) * cache.block_size + off) * d;
                    let mut want = k[(t * cache.kv_heads + h) * d..][..d].to_vec();
                    rope(&mut want, pos, &freqs, pairs).unwrap();
                    for e in 0..d {
                        assert!(close(kc[at + e], want[e], 1e-5));
                        assert_eq!(vc[at + e], v[(t * cache.kv_heads + h) * d + e]);
                        written[at + e] = true;
                    }
                }
            }
            for (i, w) in written.iter().enumerate() {
                if !w {
                    assert_eq!((kc[i], vc[i]), (sentinel, sentinel), "stray write at {i}");
                }
            }
        }
    }

    #[test]
    fn out_of_range_position_leaves_everything_untouched() {
        let cache = PagedKvShape { num_blocks: 1, kv_heads: 1, block_size: 16, head_dim: 4 };
        let shape = RopeKvShape { tokens: 1, q_heads: 1, cache, max_pos: 2, pairs: RopePairs::HalfSplit };
        let cos_sin = cos_sin_cache(&inv_freq(4), 2);
        let src = pack_qkv(&shape, &[3.0f32; 4], &[1.0; 4], &[2.0; 4]);
        let mut q = [5.0f32; 4];
        let (mut kc, mut vc) = (vec![0.0; cache.len()], vec![0.0; cache.len()]);
        let inputs = RopeKvInputs { src: &src, cos_sin: &cos_sin, positions: &[2], slots: &[0] };
        rope_kv_write(&shape, &inputs, &mut q, &mut kc, &mut vc).unwrap();
        assert_eq!(q, [5.0; 4]);
        assert!(kc.iter().chain(&vc).all(|x| *x == 0.0));
        let bad = RopeKvInputs { slots: &[], ..inputs };
        assert!(rope_kv_write(&shape, &bad, &mut q, &mut kc, &mut vc).is_err());
    }
}
