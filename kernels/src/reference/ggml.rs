//! GGML block formats and the quantized GEMV reference (`cuda/quant_gemv.cu`).
//!
//! Weights stay in GGML's bytes exactly as a GGUF file holds them, so the
//! reference and the kernel read the same buffer. Blocks hold 32 weights:
//! - `Q8_0` (34 bytes): `d: f16, qs: [i8; 32]`, `w_j = d * qs[j]`.
//! - `Q4_0` (18 bytes): `d: f16, qs: [u8; 16]`, `w_j = d * (nib_j - 8)`.
//! - `Q4_1` (20 bytes): `d: f16, m: f16, qs: [u8; 16]`, `w_j = d * nib_j + m`.
//!
//! with `nib_j = qs[j] & 15` for `j < 16` and `qs[j - 16] >> 4` for `j >= 16`
//! (low nibbles are elements 0..16, high nibbles 16..32). `f16`s are little
//! endian. A matrix `[n, k]` is `n` rows of `k / 32` consecutive blocks.

use half::f16;

use crate::{Elem, KernelError, KernelId};

/// Weights per block (GGML's, shared with the CPU kernels).
pub use crate::quant::QK;
/// Activation rows the GEMV kernels take at most.
pub const MAX_ROWS: usize = 8;

/// The closed set of weight formats; `#[repr(i32)]` for the FFI edge.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit, one scale.
    Q8_0 = 0,
    /// 4-bit, one scale, offset 8.
    Q4_0 = 1,
    /// 4-bit, scale and minimum (the default model's format).
    Q4_1 = 2,
}

impl QuantFormat {
    /// Every format.
    pub const ALL: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1];

    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
        }
    }

    /// The suffix of this format's CUDA entry points.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
        }
    }

    /// `(d, m)` and the 32 integer levels of one block.
    fn decode(self, b: &[u8]) -> (f32, f32, [f32; QK]) {
        let h = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let mut q = [0.0f32; QK];
        let nib = |qs: &[u8], j: usize| if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
        match self {
            QuantFormat::Q8_0 => {
                for (j, v) in q.iter_mut().enumerate() {
                    *v = b[2 + j] as i8 as f32;
                }
                (h(0), 0.0, q)
            }
            QuantFormat::Q4_0 => {
                for (j, v) in q.iter_mut().enumerate() {
                    *v = nib(&b[2..], j) as f32 - 8.0;
                }
                (h(0), 0.0, q)
            }
            QuantFormat::Q4_1 => {
                for (j, v) in q.iter_mut().enumerate() {
                    *v = nib(&b[4..], j) as f32;
                }
                (h(0), h(2), q)
            }
        }
    }
}

/// Quantizes one row (`x.len() % 32 == 0`) with GGML's reference quantizers
/// (`quantize_row_q8_0_ref` and friends in ggml-quants.c).
pub fn quantize_row(format: QuantFormat, x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(QK), "row of {} is not whole blocks", x.len());
    let mut out = Vec::with_capacity(x.len() / QK * format.block_bytes());
    for blk in x.chunks(QK) {
        match format {
            QuantFormat::Q8_0 => {
                let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QuantFormat::Q4_0 => {
                let max = blk.iter().fold(0.0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
            QuantFormat::Q4_1 => {
                let (min, max) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
            }
        }
    }
    out
}

/// Dequantizes one row of blocks into `out` (`32` values per block).
pub fn dequantize_row(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes.chunks(format.block_bytes()).zip(out.chunks_mut(QK)) {
        let (d, m, q) = format.decode(b);
        for (o, q) in o.iter_mut().zip(q) {
            *o = d * q + m;
        }
    }
}

/// Shape of a GEMV, quantized or dense: `y[m, n] = x[m, k] · W[n, k]ᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    /// Activation rows, `1..=MAX_ROWS`.
    pub m: usize,
    /// Output features (weight rows).
    pub n: usize,
    /// Input features, a multiple of 32 for the quantized GEMV (any for the
    /// dense one, [`crate::reference::dense`]).
    pub k: usize,
}

impl GemvShape {
    /// Checks the shape and the buffer sizes against it.
    pub fn check(&self, format: QuantFormat, w: usize, x: usize, y: usize) -> Result<(), KernelError> {
        let ok = (1..=MAX_ROWS).contains(&self.m)
            && self.k > 0
            && self.k.is_multiple_of(QK)
            && w == self.n * self.k / QK * format.block_bytes()
            && x == self.m * self.k
            && y == self.m * self.n;
        if ok {
            Ok(())
        } else {
            Err(KernelError::Shape {
                kernel: KernelId::QuantGemv,
                message: format!("{self:?} {format:?}: w {w} bytes, x {x}, y {y}"),
            })
        }
    }
}

/// The quantized GEMV as the kernels compute it: per block `d * Σ q_j x_j (+
/// m * Σ x_j)` in f32, blocks summed (here in f64), one rounding to `T`.
pub fn quant_gemv<T: Elem>(
    format: QuantFormat,
    w: &[u8],
    x: &[T],
    shape: GemvShape,
    y: &mut [T],
) -> Result<(), KernelError> {
    shape.check(format, w.len(), x.len(), y.len())?;
    let row_bytes = shape.k / QK * format.block_bytes();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    for r in 0..shape.m {
        let xr = &xf[r * shape.k..][..shape.k];
        for (o, wr) in w.chunks(row_bytes).enumerate() {
            let mut acc = 0.0f64;
            for (b, xb) in wr.chunks(format.block_bytes()).zip(xr.chunks(QK)) {
                let (d, m, q) = format.decode(b);
                let (mut sq, mut sx) = (0.0f32, 0.0f32);
                for (q, x) in q.iter().zip(xb) {
                    sq += q * x;
                    sx += x;
                }
                acc += (d * sq + m * sx) as f64;
            }
            y[r * shape.n + o] = T::from_f32(acc as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::quant::Q4_1Matrix;
    use crate::reference::rng::TestRng;

    #[test]
    fn block_layouts_are_ggmls() {
        // Q4_0: d = 0.5, qs[0] = 0x1F -> element 0 low nibble 15, element 16 high nibble 1.
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend([0x1Fu8].iter().chain([0x88u8; 15].iter()));
        let mut out = [0.0f32; 32];
        dequantize_row(QuantFormat::Q4_0, &b, &mut out);
        assert_eq!((out[0], out[16], out[1], out[17]), ((15.0 - 8.0) * 0.5, (1.0 - 8.0) * 0.5, 0.0, 0.0));
        // Q8_0: signed bytes.
        let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize_row(QuantFormat::Q8_0, &b, &mut out);
        assert_eq!((out[0], out[31]), (-4.0, 3.75));
        // Q4_1: d, then m, then nibbles.
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend([0x30u8; 16]);
        dequantize_row(QuantFormat::Q4_1, &b, &mut out);
        assert_eq!((out[0], out[16]), (-1.0, 5.0));
        assert_eq!(QuantFormat::ALL.map(|f| quantize_row(f, &[0.0; 64]).len()), [68, 36, 40]);
    }

    #[test]
    fn q4_1_decodes_like_the_cpu_engine() {
        let mut rng = TestRng::new(5);
        let (rows, cols) = (3, 128);
        let x = rng.vec(rows * cols, -2.0, 2.0);
        let bytes: Vec<u8> = x.chunks(cols).flat_map(|r| quantize_row(QuantFormat::Q4_1, r)).collect();
        let m = Q4_1Matrix::from_ggml_bytes(rows, cols, &bytes).unwrap();
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in 0..rows {
            m.dequantize_row(r, &mut a);
            dequantize_row(QuantFormat::Q4_1, &bytes[r * cols / QK * 20..][..cols / QK * 20], &mut b);
            assert_eq!(a, b);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn quantize_round_trip_error_is_within_a_step(seed in any::<u64>(), scale in 0.01f32..10.0) {
            let mut rng = TestRng::new(seed);
            let x = rng.vec(64, -scale, scale);
            for f in QuantFormat::ALL {
                let bytes = quantize_row(f, &x);
                let mut y = vec![0.0; 64];
                dequantize_row(f, &bytes, &mut y);
                for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                    let d = f16::from_le_bytes([bytes[blk * f.block_bytes()], bytes[blk * f.block_bytes() + 1]]).to_f32().abs();
                    // Rounding costs half a step; f16 scales and Q4_0's clamp at +7 cost up to one more.
                    for (a, b) in xb.iter().zip(yb) {
                        prop_assert!((a - b).abs() <= 1.01 * d + 1e-3 * scale, "{:?}: {} vs {} (d {})", f, a, b, d);
                    }
                }
            }
        }

        #[test]
        fn gemv_equals_dequantize_then_matmul(seed in any::<u64>(), m in 1usize..=MAX_ROWS, n in 1usize..40, kb in 1usize..20) {
            let mut rng = TestRng::new(seed);
            let k = kb * QK;
            let wf = rng.vec(n * k, -1.0, 1.0);
            let x = rng.vec(m * k, -1.0, 1.0);
            for f in QuantFormat::ALL {
                let w: Vec<u8> = wf.chunks(k).flat_map(|r| quantize_row(f, r)).collect();
                let mut deq = vec![0.0f32; n * k];
                for (r, o) in deq.chunks_mut(k).enumerate() {
                    dequantize_row(f, &w[r * k / QK * f.block_bytes()..][..k / QK * f.block_bytes()], o);
                }
                let mut y = vec![0.0f32; m * n];
                quant_gemv(f, &w, &x, GemvShape { m, n, k }, &mut y).unwrap();
                for r in 0..m {
                    for o in 0..n {
                        let want: f64 = (0..k).map(|j| x[r * k + j] as f64 * deq[o * k + j] as f64).sum();
                        let got = y[r * n + o] as f64;
                        prop_assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt(), "{:?}: {} vs {}", f, got, want);
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_shape_errors_are_typed() {
        let w = quantize_row(QuantFormat::Q8_0, &[0.0; 64]);
        let mut y = [0.0f32; 9];
        assert!(quant_gemv(QuantFormat::Q8_0, &w, &[0.0f32; 9 * 64], GemvShape { m: 9, n: 1, k: 64 }, &mut y).is_err());
        assert!(quant_gemv(QuantFormat::Q4_0, &w, &[0.0f32; 64], GemvShape { m: 1, n: 1, k: 64 }, &mut y[..1]).is_err());
        assert!(quant_gemv(QuantFormat::Q8_0, &w, &[0.0f32; 64], GemvShape { m: 1, n: 1, k: 64 }, &mut y[..1]).is_ok());
    }
}
