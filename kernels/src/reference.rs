//! Plain, obviously-correct CPU implementations of every kernel.
//!
//! These are slow on purpose: they exist to be compared against. Rows are the
//! last dimension; a slice of `rows * dim` values is `rows` contiguous rows.
//! The functions in this file work in `f32`; the submodules mirror the CUDA
//! kernels one for one (same layouts, same storage types through
//! [`Elem`](crate::Elem), same rounding points), so a CUDA result can be
//! compared with its reference under a dtype-aware tolerance.

pub mod dense;
pub mod fused;
pub mod ggml;
pub mod paged;
pub mod rng;
pub mod sampling;

use crate::{KernelError, KernelId};

/// How rotary pairs are formed within a head. `#[repr(i32)]`: the value is the
/// `pairs` argument of the CUDA RoPE kernels.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairs {
    /// Pairs are adjacent, `(x[2i], x[2i+1])` (GGUF's llama layout).
    Interleaved = 0,
    /// Pairs are `(x[i], x[i + d/2])` (Hugging Face / GPT-NeoX layout).
    HalfSplit = 1,
}

impl RopePairs {
    /// The element indices of pair `i` in a head of `head_dim`.
    pub fn indices(self, i: usize, head_dim: usize) -> (usize, usize) {
        match self {
            RopePairs::Interleaved => (2 * i, 2 * i + 1),
            RopePairs::HalfSplit => (i, i + head_dim / 2),
        }
    }
}

/// `out = x / rms(x) * weight`, row by row, where `x = input + residual` when a
/// residual is given (the sum is also written back to `residual`, as fused
/// kernels do so the next block can reuse it).
pub fn rms_norm(
    input: &[f32],
    residual: Option<&mut [f32]>,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let dim = weight.len();
    if dim == 0 || !input.len().is_multiple_of(dim) || out.len() != input.len() {
        return Err(KernelError::Shape {
            kernel: KernelId::RmsNorm,
            message: format!("input {} / out {} not rows of {dim}", input.len(), out.len()),
        });
    }
    let mut summed;
    let x: &[f32] = match residual {
        Some(res) => {
            if res.len() != input.len() {
                return Err(KernelError::Shape {
                    kernel: KernelId::RmsNorm,
                    message: format!("residual {} != input {}", res.len(), input.len()),
                });
            }
            for (r, i) in res.iter_mut().zip(input) {
                *r += *i;
            }
            summed = res.to_vec();
            &mut summed[..]
        }
        None => input,
    };
    for (row, orow) in x.chunks(dim).zip(out.chunks_mut(dim)) {
        let ms = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / dim as f64;
        let scale = 1.0 / (ms + eps as f64).sqrt();
        for ((o, v), w) in orow.iter_mut().zip(row).zip(weight) {
            *o = (*v as f64 * scale) as f32 * w;
        }
    }
    Ok(())
}

/// Rotates one head vector `x` (length `d`) in place for position `pos`, with
/// `inv_freq[i]` the angular frequency of pair `i` (`d / 2` of them).
pub fn rope(x: &mut [f32], pos: usize, inv_freq: &[f32], pairs: RopePairs) -> Result<(), KernelError> {
    let d = x.len();
    if !d.is_multiple_of(2) || inv_freq.len() != d / 2 {
        return Err(KernelError::Shape {
            kernel: KernelId::Rope,
            message: format!("head dim {d} with {} frequencies", inv_freq.len()),
        });
    }
    for (i, f) in inv_freq.iter().enumerate() {
        let theta = pos as f64 * *f as f64;
        let (s, c) = theta.sin_cos();
        let (a, b) = pairs.indices(i, d);
        let (xa, xb) = (x[a] as f64, x[b] as f64);
        x[a] = (xa * c - xb * s) as f32;
        x[b] = (xa * s + xb * c) as f32;
    }
    Ok(())
}

/// Softmax of each row of `x`, in place.
pub fn softmax(x: &mut [f32], dim: usize) -> Result<(), KernelError> {
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(KernelError::Shape {
            kernel: KernelId::Softmax,
            message: format!("{} not rows of {dim}", x.len()),
        });
    }
    for row in x.chunks_mut(dim) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += *v as f64;
        }
        for v in row.iter_mut() {
            *v = (*v as f64 / sum) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let x = vec![3.0f32; 8];
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut out = vec![0.0; 8];
        rms_norm(&x, None, &w, 0.0, &mut out).unwrap();
        for (o, w) in out.iter().zip(&w) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    #[test]
    fn rms_norm_with_residual_writes_the_sum_back() {
        let x = vec![1.0f32, 2.0, 3.0, 4.0];
        let mut res = vec![1.0f32; 4];
        let mut out = vec![0.0; 4];
        rms_norm(&x, Some(&mut res), &[1.0; 4], 1e-6, &mut out).unwrap();
        assert_eq!(res, vec![2.0, 3.0, 4.0, 5.0]);
        let ms: f32 = res.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((out[0] - 2.0 / ms.sqrt()).abs() < 1e-5);
    }

    #[test]
    fn rope_keeps_norm_and_is_identity_at_zero() {
        let inv: Vec<f32> = (0..4).map(|i| 10000f32.powf(-(2 * i) as f32 / 8.0)).collect();
        for pairs in [RopePairs::Interleaved, RopePairs::HalfSplit] {
            let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let mut y = x.clone();
            rope(&mut y, 0, &inv, pairs).unwrap();
            assert_eq!(x, y);
            rope(&mut y, 17, &inv, pairs).unwrap();
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x) - n(&y)).abs() < 1e-3);
        }
    }

    #[test]
    fn shape_errors_are_typed() {
        assert!(rope(&mut [0.0; 3], 0, &[1.0], RopePairs::Interleaved).is_err());
        assert!(softmax(&mut [0.0; 3], 2).is_err());
        assert!(rms_norm(&[0.0; 3], None, &[1.0; 2], 0.0, &mut [0.0; 3]).is_err());
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0f32, 2.0, 3.0, 1000.0, 1000.0, 1000.0];
        softmax(&mut x, 3).unwrap();
        assert!((x[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((x[3] - 1.0 / 3.0).abs() < 1e-6);
    }
}
