//! Weight-only quantized matrix products on the CPU: GGML's `Q4_1` weights
//! times activations quantized on the fly to `Q8_1`, the scheme llama.cpp uses,
//! so our numbers track llama.cpp's on the same file.
//!
//! candle-core's `Q4_1` dot product is scalar; this module adds an AVX2+FMA
//! path (detected at run time) and spreads output rows over threads with
//! rayon. The scalar path is the reference the SIMD path is tested against.
//!
//! Block layouts are GGML's, byte for byte:
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]` — 32 weights `d * q + m`, weight
//!   `j < 16` in the low nibble of `qs[j]`, weight `j + 16` in its high nibble.
//! - `Q8_1`: `d: f16, s: f16, qs: [i8; 32]` — 32 values `d * q`, `s = d * Σq`.

use half::f16;
use rayon::prelude::*;

use crate::{KernelError, KernelId};

/// Values per block in both formats.
pub const QK: usize = 32;

/// One GGML `Q4_1` block (20 bytes).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// 32 4-bit values, two per byte.
    pub qs: [u8; QK / 2],
}

/// One GGML `Q8_1` block (36 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * Σ qs`.
    pub s: f16,
    /// 32 signed 8-bit values.
    pub qs: [i8; QK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        BlockQ8_1 { d: f16::ZERO, s: f16::ZERO, qs: [0; QK] }
    }
}

/// A `[rows, cols]` matrix of `Q4_1` blocks, row-major.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

fn shape_err(message: String) -> KernelError {
    KernelError::Shape { kernel: KernelId::QuantMatmul, message }
}

impl Q4_1Matrix {
    /// Reads GGML's raw bytes (`rows * cols / 32` blocks of 20 bytes).
    pub fn from_ggml_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(QK) {
            return Err(shape_err(format!("{cols} columns is not a multiple of {QK}")));
        }
        let n = rows * cols / QK;
        if bytes.len() != n * 20 {
            return Err(shape_err(format!("{} bytes for {n} Q4_1 blocks of 20", bytes.len())));
        }
        let blocks = bytes
            .chunks_exact(20)
            .map(|b| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&b[4..20]);
                BlockQ4_1 { d: f16::from_le_bytes([b[0], b[1]]), m: f16::from_le_bytes([b[2], b[3]]), qs }
            })
            .collect();
        Ok(Q4_1Matrix { rows, cols, blocks })
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.len() * 20
    }

    fn row_blocks(&self, r: usize) -> &[BlockQ4_1] {
        let nb = self.cols / QK;
        &self.blocks[r * nb..(r + 1) * nb]
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in self.row_blocks(r).iter().zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            for j in 0..QK / 2 {
                o[j] = (b.qs[j] & 0x0F) as f32 * d + m;
                o[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
            }
        }
    }

    /// `out[i][r] = Σ_c x[i][c] * W[r][c]` for `x` of `m` rows of `cols`
    /// values; `out` has `m` rows of `self.rows()` values. Activations are
    /// quantized to `Q8_1` first, as llama.cpp does.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(x, m, out, Path::detect())
    }

    /// [`Q4_1Matrix::matmul`] on a chosen code path (for tests and benchmarks).
    pub fn matmul_with(&self, x: &[f32], m: usize, out: &mut [f32], path: Path) -> Result<(), KernelError> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            return Err(shape_err(format!(
                "x {} / out {} for m={m} and a [{}, {}] matrix",
                x.len(),
                out.len(),
                self.rows,
                self.cols
            )));
        }
        let nb = self.cols / QK;
        let mut xq = vec![BlockQ8_1::default(); m * nb];
        for (row, q) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(nb)) {
            quantize_q8_1(row, q);
        }
        // Each task owns a run of weight rows and computes them for every
        // activation row, so each weight byte is read once per call.
        const ROWS_PER_TASK: usize = 16;
        let mut out_t = vec![0f32; self.rows * m];
        out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(t, chunk)| {
            for (k, o) in chunk.chunks_exact_mut(m).enumerate() {
                let w = self.row_blocks(t * ROWS_PER_TASK + k);
                for (i, xi) in xq.chunks_exact(nb).enumerate() {
                    o[i] = dot(w, xi, path);
                }
            }
        });
        if m == 1 {
            out.copy_from_slice(&out_t);
        } else {
            for (r, col) in out_t.chunks_exact(m).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * self.rows + r] = *v;
                }
            }
        }
        Ok(())
    }
}

/// Which implementation of the block dot product to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Portable scalar code (the reference).
    Scalar,
    /// AVX2 + FMA (x86-64).
    Avx2,
}

impl Path {
    /// The fastest path this CPU supports.
    pub fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Path::Avx2;
            }
        }
        Path::Scalar
    }
}

/// Quantizes 32-value blocks of `x` to `Q8_1` (GGML's `quantize_row_q8_1`).
pub fn quantize_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(sum as f32 * d);
    }
}

fn dot(w: &[BlockQ4_1], x: &[BlockQ8_1], path: Path) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => {
            // SAFETY: `Path::Avx2` is only produced by `Path::detect` after checking
            // avx2 and fma at run time (or chosen by tests on the same condition).
            unsafe { avx2::dot(w, x) }
        }
        _ => dot_scalar(w, x),
    }
}

fn dot_scalar(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (a, b) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (a.qs[j] & 0x0F) as i32 * b.qs[j] as i32 + (a.qs[j] >> 4) as i32 * b.qs[j + QK / 2] as i32;
        }
        sum += sumi as f32 * a.d.to_f32() * b.d.to_f32() + a.m.to_f32() * b.s.to_f32();
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ4_1, BlockQ8_1};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for (a, b) in w.iter().zip(x) {
            summs += a.m.to_f32() * b.s.to_f32();
            // SAFETY: `qs` are 16 and 32 bytes; unaligned loads read exactly them.
            let packed = unsafe { _mm_loadu_si128(a.qs.as_ptr() as *const __m128i) };
            let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
            let y = unsafe { _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i) };
            let p16 = _mm256_maddubs_epi16(nib, y);
            let p32 = _mm256_madd_epi16(p16, ones);
            let scale = _mm256_set1_ps(a.d.to_f32() * b.d.to_f32());
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
        }
        let hi = _mm256_extractf128_ps(acc, 1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1) + summs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random_q4_1(rows: usize, cols: usize, seed: &mut u64) -> Q4_1Matrix {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(f16::from_f32(0.01 + lcg(seed).abs() * 0.05).to_le_bytes());
            bytes.extend(f16::from_f32(lcg(seed) * 0.4).to_le_bytes());
            for _ in 0..16 {
                bytes.push((lcg(seed).abs() * 255.0) as u8);
            }
        }
        Q4_1Matrix::from_ggml_bytes(rows, cols, &bytes).unwrap()
    }

    #[test]
    fn simd_equals_scalar_and_both_track_f32() {
        let mut seed = 7;
        for (rows, cols, m) in [(40, 64, 1), (33, 576, 3), (130, 1536, 5)] {
            let w = random_q4_1(rows, cols, &mut seed);
            let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut scalar = vec![0f32; m * rows];
            w.matmul_with(&x, m, &mut scalar, Path::Scalar).unwrap();
            let mut fast = vec![0f32; m * rows];
            w.matmul_with(&x, m, &mut fast, Path::detect()).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for i in 0..m {
                    let exact: f32 = row.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| a * b).sum();
                    let (s, f) = (scalar[i * rows + r], fast[i * rows + r]);
                    assert!((s - f).abs() <= 1e-4 * (1.0 + s.abs()), "simd {f} vs scalar {s}");
                    // 8-bit activations: error well under 1% of the row's magnitude.
                    let mag: f32 = row.iter().zip(&x[i * cols..]).map(|(a, b)| (a * b).abs()).sum();
                    assert!((s - exact).abs() <= 0.01 * mag, "quantized {s} vs exact {exact} (|.| {mag})");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert!(Q4_1Matrix::from_ggml_bytes(2, 30, &[0; 40]).is_err());
        assert!(Q4_1Matrix::from_ggml_bytes(2, 32, &[0; 39]).is_err());
        let w = Q4_1Matrix::from_ggml_bytes(2, 32, &[0; 40]).unwrap();
        assert!(w.matmul(&[0.0; 31], 1, &mut [0.0; 2]).is_err());
    }

    #[test]
    fn q8_1_sum_is_scale_times_quant_sum() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let mut q = vec![BlockQ8_1::default(); 2];
        quantize_q8_1(&x, &mut q);
        for b in &q {
            let s: i32 = b.qs.iter().map(|v| *v as i32).sum();
            assert!((b.s.to_f32() - s as f32 * b.d.to_f32()).abs() < 0.05 * b.s.to_f32().abs().max(1.0));
            assert_eq!(b.qs.iter().map(|v| v.unsigned_abs()).max(), Some(127));
        }
    }
}
