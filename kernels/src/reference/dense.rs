//! The dense GEMV reference (`cuda/dense_gemv.cu`): `y[m, n] = x[m, k] ·
//! W[n, k]^T` for 1-8 rows, with the matrix `W` in f32, bf16 or f16 and the
//! activations `x` and the output `y` each in f32 or the matrix's own type
//! (the kernels' combinations: a bf16 matrix takes the f32 residual stream's
//! rows and gives f32 back, with no conversions around it). Products in f32,
//! the sum here in f64 (the kernel's is f32, so they differ by
//! reassociation), one rounding to `y`'s type. [`dense_gemv_silu`] is the
//! down product with the MLP's activation fused in front, [`dense_gemv_norm`]
//! a product with the residual add and RMSNorm fused in front.

use rayon::prelude::*;

use super::fused::{fused_add_rms_norm, silu_mul};
use super::ggml::{GemvShape, MAX_ROWS};
use crate::{DType, Elem, KernelError, KernelId};

impl GemvShape {
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
        let ok = (1..=MAX_ROWS).contains(&self.m)
            && self.k > 0
            && Some(w) == self.n.checked_mul(self.k)
            && Some(x) == self.m.checked_mul(self.k)
            && Some(y) == self.m.checked_mul(self.n);
        if ok {
            Ok(())
        } else {
            Err(KernelError::Shape {
                kernel: KernelId::DenseGemv,
                message: format!("{self:?}: w {w}, x {x}, y {y} (want n·k, m·k, m·n with 1 <= m <= {MAX_ROWS})"),
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

/// The dense GEMV as the kernels compute it, rows of `y` in parallel.
pub fn dense_gemv<W: Elem, X: Elem, Y: Elem>(
    w: &[W],
    x: &[X],
    shape: GemvShape,
    y: &mut [Y],
) -> Result<(), KernelError> {
    shape.check_dense((W::DTYPE, X::DTYPE, Y::DTYPE), w.len(), x.len(), y.len())?;
    let k = shape.k;
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(shape.n)) {
        let xf: Vec<f32> = xr.iter().map(|v| v.to_f32()).collect();
        yr.par_iter_mut().zip(w.par_chunks_exact(k)).for_each(|(o, wr)| {
            let s: f64 = wr.iter().zip(&xf).map(|(a, b)| (a.to_f32() * b) as f64).sum();
            *o = Y::from_f32(s as f32);
        });
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

    /// Against the plain triple loop in f64 over the same (rounded) values.
    #[test]
    fn dense_gemv_is_the_product_rounded_once() {
        let mut rng = TestRng::new(21);
        for (m, n, k) in [(1, 1, 1), (3, 17, 100), (8, 40, 577)] {
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
        assert!(dense_gemv(&w, &[0.0f32; 27], GemvShape { m: 9, n: 2, k: 3 }, &mut [0.0f32; 18]).is_err());
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
