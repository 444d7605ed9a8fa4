//! Measuring kernel variants on this machine and picking its [`KernelPlan`]
//! (what `arqon bench kernels` runs).
//!
//! A timer measures every variant of every kernel that has several, at the
//! shapes one model's decode and prefill steps give them ([`ModelShape`],
//! batches, context lengths), as [`Measurement`]s. Before a variant is timed
//! at a shape its output is compared with the kernel's first variant (the
//! default) there; one that disagrees, or fails to run, is measured as an
//! error and never chosen. [`pick`] then takes, per kernel, the variant with
//! the lowest geometric mean over the shapes of its time over the best time
//! at that shape: the variant that is closest to the fastest everywhere, not
//! the one that wins one shape by a lot and loses the rest. Ties keep the
//! default.
//!
//! [`measure_cpu`] times the CPU's quantized matmul paths (they must give the
//! same bits); `cuda::tune::measure` times the CUDA kernels on a device.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::plan::{CpuMatmulVariant, KernelPlan};
use crate::quant::{Path, Q4_1Matrix, Q8_0Matrix, QK};
use crate::reference::ggml::{quantize_row, QuantFormat};
use crate::reference::rng::TestRng;
use crate::{KernelError, KernelId};

/// The sizes of one Llama-family model that set its kernels' shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// How much to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneOptions {
    /// Rows per call (sequences in a decode step, tokens in a prefill chunk).
    pub batches: Vec<usize>,
    /// Context lengths, for the attention kernels.
    pub contexts: Vec<usize>,
    /// Time one measurement runs for, at least (three samples at least).
    pub min_seconds: f64,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions { batches: vec![1, 8, 32, 64, 128], contexts: vec![128, 512, 2048], min_seconds: 0.02 }
    }
}

/// One variant of one kernel at one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The kernel.
    pub kernel: KernelId,
    /// The variant's stable name (as a [`KernelPlan`] writes it).
    pub variant: String,
    /// The shape, as a short stable label (`m8 1536x576 q4_1`).
    pub case: String,
    /// Rows of the call.
    pub batch: usize,
    /// Seconds per call (median of the samples), or why the variant is out
    /// at this shape: it failed, or disagreed with the default.
    pub seconds: Result<f64, String>,
}

/// The variant [`pick`] chose for one kernel, with the figures that chose it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The kernel.
    pub kernel: KernelId,
    /// The chosen variant.
    pub variant: String,
    /// The kernel's default variant (its first measured).
    pub default: String,
    /// Shapes measured.
    pub cases: usize,
    /// Geometric mean over the shapes of the default's time over the chosen
    /// variant's (1 when the default is chosen).
    pub speedup_over_default: f64,
    /// Every variant that ran everywhere, with its geometric mean over the
    /// shapes of its time over the best (1 for a variant fastest everywhere),
    /// in measured order.
    pub scores: Vec<(String, f64)>,
    /// Variants out for failing or disagreeing somewhere.
    pub rejected: Vec<String>,
}

/// Picks each measured kernel's variant into `base` (kernels not measured
/// keep theirs). A kernel none of whose variants ran everywhere keeps its
/// variant in `base` and has no [`Choice`].
pub fn pick(measurements: &[Measurement], base: KernelPlan) -> Result<(KernelPlan, Vec<Choice>), KernelError> {
    let mut plan = base;
    let mut choices = Vec::new();
    for kernel in KernelPlan::KERNELS {
        let ms = of_kernel(measurements, kernel);
        let (variants, cases) = variants_and_cases(&ms);
        let Some(default) = variants.first().copied() else { continue };
        let time: BTreeMap<(&str, &str), &Result<f64, String>> =
            ms.iter().map(|m| ((m.variant.as_str(), m.case.as_str()), &m.seconds)).collect();
        let ok = |v: &str, c: &str| match time.get(&(v, c)) {
            Some(Ok(s)) if s.is_finite() && *s > 0.0 => Some(*s),
            _ => None,
        };
        let (eligible, rejected): (Vec<&str>, Vec<&str>) =
            variants.iter().partition(|v| cases.iter().all(|c| ok(v, c).is_some()));
        let best: Vec<f64> =
            cases.iter().map(|c| eligible.iter().filter_map(|v| ok(v, c)).fold(f64::INFINITY, f64::min)).collect();
        let geo = |v: &str, over: &dyn Fn(usize, f64) -> f64| {
            let logs: f64 = cases.iter().enumerate().map(|(i, c)| over(i, ok(v, c).expect("eligible")).ln()).sum();
            (logs / cases.len() as f64).exp()
        };
        let mut chosen: Option<(&str, f64)> = None;
        let mut scores = Vec::new();
        for v in &eligible {
            let score = geo(v, &|i, t| t / best[i]);
            scores.push((v.to_string(), score));
            // Strictly better only: ties keep the earlier (the default first).
            if chosen.is_none_or(|(_, s)| score < s * (1.0 - 1e-9)) {
                chosen = Some((v, score));
            }
        }
        let Some((variant, _)) = chosen else { continue };
        plan.set(kernel, variant)?;
        let speedup_over_default = if eligible.contains(&default) {
            geo(default, &|i, t| t / ok(variant, cases[i]).expect("eligible"))
        } else {
            f64::NAN
        };
        choices.push(Choice {
            kernel,
            variant: variant.to_string(),
            default: default.to_string(),
            cases: cases.len(),
            speedup_over_default,
            scores,
            rejected: rejected.iter().map(|s| s.to_string()).collect(),
        });
    }
    Ok((plan, choices))
}

/// The measurements of `kernel`, in measured order.
pub fn of_kernel(measurements: &[Measurement], kernel: KernelId) -> Vec<&Measurement> {
    measurements.iter().filter(|m| m.kernel == kernel).collect()
}

/// The distinct variants and cases of `ms`, each in first-measured order (so
/// the default variant first).
pub fn variants_and_cases<'a>(ms: &[&'a Measurement]) -> (Vec<&'a str>, Vec<&'a str>) {
    let (mut variants, mut cases): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for m in ms {
        if !variants.contains(&m.variant.as_str()) {
            variants.push(&m.variant);
        }
        if !cases.contains(&m.case.as_str()) {
            cases.push(&m.case);
        }
    }
    (variants, cases)
}

/// Seconds per call of `run`: one call to warm up, then samples of enough
/// calls to last a fifth of `min_seconds` each, until `min_seconds` have
/// passed and three samples are in; the median sample. `sync` waits for the
/// calls to finish (a device's stream; nothing on the CPU) and ends every
/// sample.
pub fn seconds_per_call(
    min_seconds: f64,
    run: &mut dyn FnMut() -> Result<(), KernelError>,
    sync: &mut dyn FnMut() -> Result<(), KernelError>,
) -> Result<f64, KernelError> {
    run()?;
    sync()?;
    let t = Instant::now();
    run()?;
    sync()?;
    let one = t.elapsed().as_secs_f64().max(1e-7);
    let calls = ((min_seconds / 5.0 / one).ceil() as usize).clamp(1, 10_000);
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed().as_secs_f64() < min_seconds {
        let t = Instant::now();
        for _ in 0..calls {
            run()?;
        }
        sync()?;
        samples.push(t.elapsed().as_secs_f64() / calls as f64);
        if samples.len() >= 1000 {
            break;
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// The matrices of one layer and the LM head, as the CPU runs them: `(label,
/// rows, cols, format)`. Widths that are not a multiple of the block size
/// are left out (such a model does not run on these kernels).
fn cpu_matrices(s: &ModelShape) -> Vec<(&'static str, usize, usize, QuantFormat)> {
    let attn = s.q_heads * s.head_dim;
    let kv = s.kv_heads * s.head_dim;
    [
        ("qkv", attn + 2 * kv, s.hidden, QuantFormat::Q4_1),
        ("o", s.hidden, attn, QuantFormat::Q4_1),
        ("gate_up", 2 * s.intermediate, s.hidden, QuantFormat::Q4_1),
        ("down", s.hidden, s.intermediate, QuantFormat::Q4_1),
        ("lm_head", s.vocab, s.hidden, QuantFormat::Q8_0),
    ]
    .into_iter()
    .filter(|(_, rows, cols, _)| *rows > 0 && *cols > 0 && cols.is_multiple_of(QK))
    .collect()
}

/// One matrix on our CPU kernels.
enum CpuMatrix {
    Q4_1(Q4_1Matrix),
    Q8_0(Q8_0Matrix),
}

impl CpuMatrix {
    fn random(rng: &mut TestRng, rows: usize, cols: usize, format: QuantFormat) -> Result<Self, KernelError> {
        let mut bytes = Vec::with_capacity(rows * cols / QK * format.block_bytes());
        for _ in 0..rows {
            bytes.extend(quantize_row(format, &rng.vec(cols, -1.0, 1.0)));
        }
        Ok(match format {
            QuantFormat::Q8_0 => CpuMatrix::Q8_0(Q8_0Matrix::from_ggml_bytes(rows, cols, &bytes)?),
            _ => CpuMatrix::Q4_1(Q4_1Matrix::from_ggml_bytes(rows, cols, &bytes)?),
        })
    }

    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], path: Path) -> Result<(), KernelError> {
        match self {
            CpuMatrix::Q4_1(w) => w.matmul_with(x, m, out, path),
            CpuMatrix::Q8_0(w) => w.matmul_with(x, m, out, path),
        }
    }
}

/// Times the CPU's quantized matmul on every SIMD path this CPU has, at the
/// model's matrices and `opts.batches` rows. [`Path::detect`]'s path is
/// measured first (it is what `auto` runs); the scalar reference only where
/// it is the only path. Every path must give the default's bits.
pub fn measure_cpu(
    shape: &ModelShape,
    opts: &TuneOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Measurement>, KernelError> {
    let detected = Path::detect();
    let mut paths = vec![detected];
    paths.extend(Path::available().into_iter().filter(|p| *p != detected && *p != Path::Scalar));
    let mut rng = TestRng::new(0x6b65726e656c73);
    let mut out = Vec::new();
    for (label, rows, cols, format) in cpu_matrices(shape) {
        let w = CpuMatrix::random(&mut rng, rows, cols, format)?;
        for &m in &opts.batches {
            let case = format!("m{m} {label} {rows}x{cols} {}", format.name());
            let x = rng.vec(m * cols, -1.0, 1.0);
            let mut want = vec![0f32; m * rows];
            w.matmul(&x, m, &mut want, detected)?;
            for &path in &paths {
                let mut got = vec![0f32; m * rows];
                let seconds = w
                    .matmul(&x, m, &mut got, path)
                    .map_err(|e| e.to_string())
                    .and_then(|()| match got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits()) {
                        Some(i) => Err(format!("differs from {} at [{i}]", detected.name())),
                        None => Ok(()),
                    })
                    .and_then(|()| {
                        seconds_per_call(opts.min_seconds, &mut || w.matmul(&x, m, &mut got, path), &mut || Ok(()))
                            .map_err(|e| e.to_string())
                    });
                let variant = CpuMatmulVariant::of(path).to_string();
                match &seconds {
                    Ok(s) => progress(&format!("quant_matmul {variant} {case}: {:.1} µs", s * 1e6)),
                    Err(e) => progress(&format!("quant_matmul {variant} {case}: {e}")),
                }
                out.push(Measurement { kernel: KernelId::QuantMatmul, variant, case: case.clone(), batch: m, seconds });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{ArgmaxVariant, RmsNormVariant};

    fn m(kernel: KernelId, variant: &str, case: &str, seconds: Result<f64, String>) -> Measurement {
        Measurement { kernel, variant: variant.into(), case: case.into(), batch: 1, seconds }
    }

    #[test]
    fn the_variant_closest_to_the_best_everywhere_wins_and_errors_disqualify() {
        let r = KernelId::RmsNorm;
        let ms = vec![
            // block_per_row wins both shapes by a little: chosen.
            m(r, "warp_per_row", "a", Ok(2.0)),
            m(r, "warp_per_row", "b", Ok(4.0)),
            m(r, "block_per_row", "a", Ok(1.8)),
            m(r, "block_per_row", "b", Ok(3.6)),
            // argmax: split_row is ten times faster at one shape but failed at another.
            m(KernelId::Argmax, "block_per_row", "a", Ok(1.0)),
            m(KernelId::Argmax, "block_per_row", "b", Ok(1.0)),
            m(KernelId::Argmax, "split_row", "a", Ok(0.1)),
            m(KernelId::Argmax, "split_row", "b", Err("disagrees".into())),
        ];
        let (plan, choices) = pick(&ms, KernelPlan::default()).unwrap();
        assert_eq!(plan.rms_norm, RmsNormVariant::BlockPerRow);
        assert_eq!(plan.argmax, ArgmaxVariant::BlockPerRow);
        let rms = choices.iter().find(|c| c.kernel == r).unwrap();
        assert!((rms.speedup_over_default - 2.0 / 1.8).abs() < 1e-9, "{rms:?}");
        assert_eq!(rms.cases, 2);
        assert_eq!(rms.scores[1], ("block_per_row".to_string(), 1.0));
        assert!((rms.scores[0].1 - 2.0 / 1.8).abs() < 1e-9);
        let am = choices.iter().find(|c| c.kernel == KernelId::Argmax).unwrap();
        assert_eq!(am.rejected, vec!["split_row".to_string()]);
        assert_eq!(am.speedup_over_default, 1.0);
        // Kernels not measured keep the base plan's variant.
        assert_eq!(plan.quant_gemv, KernelPlan::default().quant_gemv);
        assert_eq!(choices.len(), 2);
    }

    #[test]
    fn a_big_win_at_one_shape_does_not_beat_a_variant_near_the_best_everywhere() {
        let r = KernelId::RmsNorm;
        // block_per_row is 4x faster at `a` and 8x slower at `b` and `c`. Over
        // the best per shape, warp_per_row's geometric mean is 4^(1/3) ≈ 1.6
        // and block_per_row's 64^(1/3) = 4, so warp_per_row stays.
        let ms = vec![
            m(r, "warp_per_row", "a", Ok(4.0)),
            m(r, "warp_per_row", "b", Ok(1.0)),
            m(r, "warp_per_row", "c", Ok(1.0)),
            m(r, "block_per_row", "a", Ok(1.0)),
            m(r, "block_per_row", "b", Ok(8.0)),
            m(r, "block_per_row", "c", Ok(8.0)),
        ];
        let (plan, _) = pick(&ms, KernelPlan::default()).unwrap();
        assert_eq!(plan.rms_norm, RmsNormVariant::WarpPerRow);
    }

    #[test]
    fn ties_keep_the_default_and_no_eligible_variant_keeps_the_base() {
        let r = KernelId::RmsNorm;
        let base = KernelPlan { rms_norm: RmsNormVariant::BlockPerRow, ..KernelPlan::default() };
        let ms = vec![m(r, "warp_per_row", "a", Err("launch failed".into()))];
        let (plan, choices) = pick(&ms, base).unwrap();
        assert_eq!(plan, base);
        assert!(choices.is_empty());
        let ms = vec![m(r, "warp_per_row", "a", Ok(1.0)), m(r, "block_per_row", "a", Ok(1.0))];
        let (plan, _) = pick(&ms, base).unwrap();
        assert_eq!(plan.rms_norm, RmsNormVariant::WarpPerRow);
        // An unknown variant name is a typed error, not a silent default.
        let ms = vec![m(r, "fastest", "a", Ok(1.0))];
        assert!(matches!(pick(&ms, base), Err(KernelError::Plan(_))));
    }

    #[test]
    fn cpu_paths_are_measured_at_every_matrix_and_batch() {
        let shape = ModelShape { hidden: 64, q_heads: 4, kv_heads: 2, head_dim: 16, intermediate: 96, vocab: 200 };
        let opts = TuneOptions { batches: vec![1, 3], contexts: vec![], min_seconds: 0.0 };
        let ms = measure_cpu(&shape, &opts, &mut |_| {}).unwrap();
        let paths = Path::available().into_iter().filter(|p| *p != Path::Scalar).count().max(1);
        assert_eq!(ms.len(), cpu_matrices(&shape).len() * 2 * paths);
        assert!(ms.iter().all(|m| m.kernel == KernelId::QuantMatmul && m.seconds.is_ok()), "{ms:?}");
        assert_eq!(ms[0].variant, CpuMatmulVariant::of(Path::detect()).to_string());
        let (plan, choices) = pick(&ms, KernelPlan::default()).unwrap();
        assert_eq!(choices.len(), 1);
        assert!(plan.quant_matmul.path().is_some_and(|p| p.supported()));
    }

    #[test]
    fn the_serving_path_follows_the_preference_and_refuses_what_the_cpu_lacks() {
        assert_eq!(Path::serving(), Path::detect());
        Path::prefer(Some(Path::Scalar)).unwrap();
        assert_eq!(Path::serving(), Path::Scalar);
        Path::prefer(None).unwrap();
        assert_eq!(Path::serving(), Path::detect());
        if let Some(missing) = Path::ALL.into_iter().find(|p| !p.supported()) {
            assert!(matches!(Path::prefer(Some(missing)), Err(KernelError::Plan(_))));
            assert_eq!(Path::serving(), Path::detect());
        }
    }
}
