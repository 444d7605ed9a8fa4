//! The dense GEMV reference (`cuda/dense_gemv.cu`): `y[m, n] = x[m, k] ·
//! W[n, k]^T` for 1-32 rows ([`DENSE_MAX_ROWS`]), with the matrix `W` in f32, bf16 or f16 and the
//! activations `x` and the output `y` each in f32 or the matrix's own type
//! (the kernels' combinations: a bf16 matrix takes the f32 residual stream's
//! rows and gives f32 back, with no conversions around it). Products in f32,
//! the sum here in f64 (the kernel's is f32, so they differ by
//! reassociation), one rounding to `y`'s type. [`dense_gemv_silu`] is the
//! down product with the MLP's activation fused in front, [`dense_gemv_norm`]
//! a product with the residual add and RMSNorm fused in front.

use rayon::prelude::*;

use super::fused::{fused_add_rms_norm, silu_mul};
use super::ggml::GemvShape;
use crate::{DType, Elem, KernelError, KernelId};

/// The most rows the dense GEMV and its fused forms take: the kernels run
/// them in tiles of [`DENSE_ROW_TILE`], one tile per row of the grid.
pub const DENSE_MAX_ROWS: usize = 32;

/// The rows one block of the dense GEMV multiplies (its accumulators per
/// lane): `MAX_M` in `cuda/dense_gemv.cu`, which must equal it.
pub const DENSE_ROW_TILE: usize = 8;

/// The most multiply-adds a product of more than [`DENSE_ROW_TILE`] rows may
/// take for our kernel to be chosen over cuBLAS ([`GemvShape::suits_dense_kernel`]).
pub const DENSE_TALL_MAX_FMAS: usize = 1 << 26;

impl GemvShape {
    /// Whether our dense kernels are the ones for this product, where the
    /// plan names them. Up to [`DENSE_ROW_TILE`] rows always: the weights'
    /// bytes bound the time, and the kernel reads them once. Up to
    /// [`DENSE_MAX_ROWS`] while `m·n·k` stays within [`DENSE_TALL_MAX_FMAS`]
    /// (2^26, about 2 µs of an H100's CUDA cores, under a launch's cost): a
    /// batch of 32 on SmolLM2's per-layer matrices (at most 57 M, the gate/up
    /// stack), where a launch saved (the norm or the activation fused in) is
    /// worth more than tensor cores; not its LM head at 32 rows (0.9 G), which
    /// cuBLAS's tensor cores run several times faster. The bound is an
    /// estimate until a GPU run times the 32-row cases of `arqon bench
    /// kernels` (`m32 gate_up …`, the biggest under it, against cuBLAS).
    pub fn suits_dense_kernel(&self) -> bool {
        let fmas = self.m.saturating_mul(self.n).saturating_mul(self.k);
        self.m >= 1 && (self.m <= DENSE_ROW_TILE || (self.m <= DENSE_MAX_ROWS && fmas <= DENSE_TALL_MAX_FMAS))
    }

    /// Checks a dense GEMV's shape, its buffer lengths and its element types
    /// (`x` and `y` each f32 or `w`'s type).
    pub fn check_dense(&self, types: (DType, DType, DType), w: usize, x: usize, y: usize) -> Result<(), KernelError> {
        let (wt, xt, yt) = types;
        let ok_type = |t: DType| t == DType::F32 || t == wt;
        if !ok_type(xt) || !ok_type(yt) {
            return Err(KernelError::Shape {
                kernel: KernelId::DenseGemv,
                message: format!(
                    "{xt:?} activations and {yt:?} output with a {wt:?} matrix: each must be f32 or {wt:?}"
                ),
            });
        }
        let ok = (1..=DENSE_MAX_ROWS).contains(&self.m)
            && self.k > 0
            && Some(w) == self.n.checked_mul(self.k)
            && Some(x) == self.m.checked_mul(self.k)
            && Some(y) == self.m.checked_mul(self.n);
        if ok {
            Ok(())
        } else {
            Err(KernelError::Shape {
                kernel: KernelId::DenseGemv,
                message: format!("{self:?}: w {w}, x {x}, y {y} (want n·k, m·k, m·n with 1 <= m <= {DENSE_MAX_ROWS})"),
            })
        }
    }
}

impl GemvShape {
    /// The rows' length [`GemvShape::check_dense`] takes for `len` gate/up
    /// values (the fused form's input, `[m, 2k]`): half of it, once it is `2 m k`.
    pub fn gate_up_rows(&self, len: usize) -> Result<usize, KernelError> {
        if Some(len) != self.m.checked_mul(self.k).and_then(|v| v.checked_mul(2)) {
            return Err(KernelError::Shape {
                kernel: KernelId::DenseGemv,
                message: format!("{self:?}: {len} gate/up values, want m · 2k"),
            });
        }
        Ok(len / 2)
    }
}

impl GemvShape {
    /// Checks the lengths and types of [`dense_gemv_norm`]: the residual rows
    /// `x`, the rows added `d` and the sums `sum` `m·k` each of one type `X`,
    /// the norm's weight `g` `k` of it, the product `y` in `X` too.
    #[allow(clippy::too_many_arguments)]
    pub fn check_norm(
        &self,
        (wt, xt): (DType, DType),
        w: usize,
        x: usize,
        d: usize,
        g: usize,
        y: usize,
        sum: usize,
    ) -> Result<(), KernelError> {
        self.check_dense((wt, xt, xt), w, x, y)?;
        if d != x || sum != x || g != self.k {
            return Err(KernelError::Shape {
                kernel: KernelId::DenseGemv,
                message: format!("{self:?}: rows added {d}, sums {sum}, norm weight {g} (want m·k, m·k, k)"),
            });
        }
        Ok(())
    }
}

/// The dense GEMV as the kernels compute it, the matrix's rows in parallel,
/// each read once for all rows of `x` (as the kernel's warps do).
pub fn dense_gemv<W: Elem, X: Elem, Y: Elem>(
    w: &[W],
    x: &[X],
    shape: GemvShape,
    y: &mut [Y],
) -> Result<(), KernelError> {
    shape.check_dense((W::DTYPE, X::DTYPE, Y::DTYPE), w.len(), x.len(), y.len())?;
    let GemvShape { m, n, k } = shape;
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    // Column o of y (its m outputs) at t[o * m..]: one weight row's products.
    let mut t = vec![Y::from_f32(0.0); m * n];
    t.par_chunks_exact_mut(m).zip(w.par_chunks_exact(k)).for_each(|(col, wr)| {
        let wf: Vec<f32> = wr.iter().map(|v| v.to_f32()).collect();
        for (o, xr) in col.iter_mut().zip(xf.chunks_exact(k)) {
            let s: f64 = wf.iter().zip(xr).map(|(a, b)| (a * b) as f64).sum();
            *o = Y::from_f32(s as f32);
        }
    });
    for (r, yr) in y.chunks_exact_mut(n).enumerate() {
        for (o, v) in yr.iter_mut().enumerate() {
            *v = t[o * m + r];
        }
    }
    Ok(())
}

/// [`dense_gemv`] with the MLP's activation fused in front (the down
/// product): `gate_up` is `[m, 2k]` rows of the stacked gate/up product, and
/// the rows multiplied are [`silu_mul`]'s, in `X`'s arithmetic. Exactly the
/// composition, as the kernel computes it.
pub fn dense_gemv_silu<W: Elem, X: Elem, Y: Elem>(
    w: &[W],
    gate_up: &[X],
    shape: GemvShape,
    y: &mut [Y],
) -> Result<(), KernelError> {
    let mut x = vec![X::from_f32(0.0); shape.gate_up_rows(gate_up.len())?];
    silu_mul(gate_up, shape.k, &mut x)?;
    dense_gemv(w, &x, shape, y)
}

/// [`dense_gemv`] with the residual add and RMSNorm fused in front, into
/// the rows' type: `sum = x + d` (the next residual stream) and `y =
/// rmsnorm(sum) * g · wᵀ`, the norm as [`fused_add_rms_norm`] computes it (its
/// rows rounded to `X`). Exactly the composition, as the kernel computes it.
#[allow(clippy::too_many_arguments)]
pub fn dense_gemv_norm<W: Elem, X: Elem>(
    w: &[W],
    x: &[X],
    d: &[X],
    g: &[X],
    eps: f32,
    shape: GemvShape,
    y: &mut [X],
    sum: &mut [X],
) -> Result<(), KernelError> {
    shape.check_norm((W::DTYPE, X::DTYPE), w.len(), x.len(), d.len(), g.len(), y.len(), sum.len())?;
    sum.copy_from_slice(x);
    let mut normed = vec![X::from_f32(0.0); x.len()];
    fused_add_rms_norm(d, sum, g, eps, &mut normed)?;
    dense_gemv(w, &normed, shape, y)
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::dtype::{from_f32_slice, to_f32_vec};
    use crate::reference::rng::TestRng;

    /// Few rows always; 9-32 rows of a small product; never more, or none.
    #[test]
    fn the_dense_kernels_take_few_rows_and_tall_small_products() {
        let s = |m, n, k| GemvShape { m, n, k };
        // SmolLM2 (hidden 576, intermediate 1536, vocabulary 49,152) and the 8B shape (4096, 14,336).
        assert!(s(8, 49_152, 576).suits_dense_kernel(), "the LM head at 8 rows");
        assert!(s(8, 6144, 4096).suits_dense_kernel(), "the 8B q/k/v stack at 8 rows");
        assert!(s(32, 3072, 576).suits_dense_kernel(), "SmolLM2's gate/up stack at 32 rows");
        assert!(s(32, 576, 1536).suits_dense_kernel(), "its down product at 32 rows");
        assert!(!s(32, 49_152, 576).suits_dense_kernel(), "its LM head at 32 rows is cuBLAS's");
        assert!(!s(9, 6144, 4096).suits_dense_kernel(), "the 8B q/k/v stack past 8 rows");
        assert!(!s(33, 8, 8).suits_dense_kernel() && !s(0, 8, 8).suits_dense_kernel());
        assert!(!s(32, usize::MAX, 2).suits_dense_kernel(), "no overflow");
    }

    /// Against the plain triple loop in f64 over the same (rounded) values.
    #[test]
    fn dense_gemv_is_the_product_rounded_once() {
        let mut rng = TestRng::new(21);
        for (m, n, k) in [(1, 1, 1), (3, 17, 100), (8, 40, 577), (32, 9, 64)] {
            let w: Vec<bf16> = from_f32_slice(&rng.vec(n * k, -1.0, 1.0));
            let x = rng.vec(m * k, -1.0, 1.0);
            let shape = GemvShape { m, n, k };
            let mut y = vec![0.0f32; m * n];
            dense_gemv(&w, &x, shape, &mut y).unwrap();
            let wf = to_f32_vec(&w);
            for r in 0..m {
                for o in 0..n {
                    let want: f64 = (0..k).map(|j| wf[o * k + j] as f64 * x[r * k + j] as f64).sum();
                    assert!((y[r * n + o] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{m}x{n}x{k} [{r},{o}]");
                }
            }
            // Into bf16: the f32 result rounded once.
            let mut yb = vec![bf16::ZERO; m * n];
            dense_gemv(&w, &x, shape, &mut yb).unwrap();
            assert_eq!(yb, from_f32_slice::<bf16>(&y));
        }
    }

    #[test]
    fn shapes_and_types_are_checked() {
        let w = vec![bf16::ZERO; 6];
        let mut y = vec![0.0f32; 2];
        let s = GemvShape { m: 1, n: 2, k: 3 };
        assert!(dense_gemv(&w, &[0.0f32; 3], s, &mut y).is_ok());
        assert!(dense_gemv(&w, &[0.0f32; 4], s, &mut y).is_err());
        assert!(dense_gemv(&w, &[0.0f32; 99], GemvShape { m: 33, n: 2, k: 3 }, &mut [0.0f32; 66]).is_err());
        // f16 activations into a bf16 matrix: not a combination the kernels have.
        let err = dense_gemv(&w, &[half::f16::ZERO; 3], s, &mut y).unwrap_err().to_string();
        assert!(err.contains("must be f32 or Bf16"), "{err}");
        assert!(dense_gemv(&[0.0f32; 6], &[bf16::ZERO; 3], s, &mut y).is_err());
        // The fused form takes gate/up rows of 2k, and silu(0) * 0 = 0.
        assert!(dense_gemv_silu(&w, &[0.0f32; 6], s, &mut y).is_ok());
        assert!(dense_gemv_silu(&w, &[0.0f32; 3], s, &mut y).is_err());
        // The norm fused in: the product in the rows' type, the weight k long.
        let (x, g) = ([bf16::ONE; 3], [bf16::ONE; 3]);
        let (mut yb, mut sum) = ([bf16::ZERO; 2], [bf16::ZERO; 3]);
        assert!(dense_gemv_norm(&w, &x, &x, &g, 1e-5, s, &mut yb, &mut sum).is_ok());
        assert_eq!(sum, [bf16::from_f32(2.0); 3]);
        assert!(dense_gemv_norm(&w, &x, &x, &g[..2], 1e-5, s, &mut yb, &mut sum).is_err());
        assert!(dense_gemv_norm(&w, &x, &x[..2], &g, 1e-5, s, &mut yb, &mut sum).is_err());
        let g = [1.0f32, 2.0, -3.0, 0.5, 0.25, 4.0];
        dense_gemv_silu(&[1.0f32; 3], &g, GemvShape { m: 1, n: 1, k: 3 }, &mut y[..1]).unwrap();
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let want = silu(1.0) * 0.5 + silu(2.0) * 0.25 + silu(-3.0) * 4.0;
        assert!((y[0] - want).abs() < 1e-6, "{} vs {want}", y[0]);
    }
}
