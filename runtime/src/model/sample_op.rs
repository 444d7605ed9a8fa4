//! Picking tokens where a step's logits are, so that only what the host
//! needs of a row leaves the device, not its `vocab` logits:
//! - greedy rows: one op over the step's logits gives each row's id, on a
//!   CUDA device our `argmax` kernel (`kernels/cuda/sampling.cu`) on
//!   candle's stream, on the CPU the kernel's reference
//!   ([`arqon_kernels::reference::sampling::argmax`]), which is the rule
//!   greedy decoding always used ([`super::argmax`]: the largest logit, the
//!   lowest id on ties, never a NaN);
//! - sampled rows with a `top_k` (up to [`MAX_TOP_K`]) and no penalty: the
//!   row's best `top_k` (id, logit) pairs ([`top_candidates`]), picked by our
//!   `top_k_top_p` kernel on a GPU, from which the host draws exactly the
//!   token it draws from the whole row
//!   ([`crate::sampling::Sampler::sample_candidates`]).
//!
//! The server picks so on the CPU always (the same result as sampling the
//! row on the host, so every greedy and top-k server test runs it) and on a
//! GPU when the SKU's kernel plan says `sampling=device` (measured by `arqon
//! bench kernels`), unless `ARQON_CUDA_SAMPLING` says `device` or `host`
//! (see [`enabled_on`]).

use arqon_kernels::plan::SamplingVariant;
use arqon_kernels::reference::sampling::{argmax, MAX_TOP_K};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;
use crate::sampling::{weigh_row, RowWeights, CHUNK};

/// Whether greedy and top-k rows on `device` are picked by the ops: on the
/// CPU always; on a GPU as `ARQON_CUDA_SAMPLING` says (`device` or `host`),
/// else as the process's kernel plan says (`sampling=device`). Read once per
/// process: the scheduler asks every step.
pub fn enabled_on(device: &Device) -> bool {
    static ON_GPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cpu()
        || *ON_GPU.get_or_init(|| match std::env::var("ARQON_CUDA_SAMPLING").as_deref() {
            Ok("device") => true,
            Ok("host") => false,
            _ => super::plan::kernel_plan().is_some_and(|p| p.sampling == SamplingVariant::Device),
        })
}

/// The greedy token of each row of `logits` (`[rows, vocab]`, f32).
pub fn greedy_ids(logits: &Tensor) -> Result<Vec<u32>> {
    let (rows, _) = logits.dims2()?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let ids = whole_f32(logits)?.apply_op1_no_bwd(&Argmax)?;
    Ok(ids.to_vec1::<i32>()?.into_iter().map(|i| i as u32).collect())
}

/// `logits` as f32, contiguous from its first element: the kernels take
/// whole slices, so rows cut out of a step are copied.
fn whole_f32(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let whole = logits.is_contiguous() && logits.layout().start_offset() == 0;
    Ok(if whole { logits } else { logits.force_contiguous()? })
}

/// The op: `[rows, vocab]` f32 logits, contiguous, to `[rows]` i32 ids.
struct Argmax;

/// The rows and vocabulary of contiguous logits starting at element 0 (what
/// the kernel's whole-slice arguments need).
fn rows_vocab(l: &Layout) -> candle_core::Result<(usize, usize)> {
    if !(l.is_contiguous() && l.start_offset() == 0) {
        candle_core::bail!("greedy sampling: the logits must be contiguous from their first element")
    }
    l.shape().dims2()
}

impl CustomOp1 for Argmax {
    fn name(&self) -> &'static str {
        "greedy-argmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = rows_vocab(l)?;
        let mut out = vec![0i32; rows];
        argmax(s.as_slice::<f32>()?, vocab, &mut out).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::I32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use arqon_kernels::plan::ArgmaxVariant;
        let (rows, vocab) = rows_vocab(l)?;
        let dev = s.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        let mut out = dev.alloc_zeros::<i32>(rows)?;
        // Exact whichever variant runs (no float sums): the SKU's measured
        // plan's, else the one for few rows and a big vocabulary when a step
        // has few rows.
        let variant = match super::plan::kernel_plan() {
            Some(plan) => plan.argmax,
            None if rows < 8 => ArgmaxVariant::SplitRow,
            None => ArgmaxVariant::BlockPerRow,
        };
        kernels.argmax(variant, s.as_cuda_slice::<f32>()?, vocab, &mut out).map_err(candle_core::Error::wrap)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
    }
}

/// The best `ks[i]` `(id, raw logit)` pairs of each row of `logits`
/// (`[rows, vocab]`), best first (largest logit, lowest id on ties, never a
/// NaN; fewer where the row has fewer): what a sampled row needs to draw its
/// token when [`crate::sampling::Sampler::candidates_needed`] says so. On a
/// CUDA device our `top_k_top_p` kernel picks the ids and only those pairs
/// cross to the host, not `vocab` logits per row. Each `ks[i]` is in
/// `1..=MAX_TOP_K`.
pub fn top_candidates(logits: &Tensor, ks: &[usize]) -> Result<Vec<Vec<(u32, f32)>>> {
    let (rows, vocab) = logits.dims2()?;
    if rows != ks.len() {
        return Err(crate::error::Error::InvalidRequest(format!("{} top-k values for {rows} rows", ks.len())));
    }
    if let Some(k) = ks.iter().find(|k| !(1..=MAX_TOP_K).contains(*k)) {
        return Err(crate::error::Error::InvalidRequest(format!("top-k {k} is not in 1..={MAX_TOP_K}")));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = whole_f32(logits)?;
    let op = TopK { ks: ks.iter().map(|&k| k as i32).collect() };
    let ids = logits.apply_op1_no_bwd(&op)?.to_vec2::<i32>()?;
    // The chosen logits, gathered where they are: rows * k values cross.
    let mut flat = Vec::with_capacity(ks.iter().sum());
    for (r, row) in ids.iter().enumerate() {
        flat.extend(row.iter().take_while(|&&i| i >= 0).map(|&i| (r * vocab) as u32 + i as u32));
    }
    let values = if flat.is_empty() {
        Vec::new()
    } else {
        let n = flat.len();
        logits.flatten_all()?.index_select(&Tensor::from_vec(flat, n, logits.device())?, 0)?.to_vec1::<f32>()?
    };
    let mut values = values.into_iter();
    Ok(ids
        .iter()
        .map(|row| {
            row.iter().take_while(|&&i| i >= 0).map(|&i| (i as u32, values.next().expect("a value per id"))).collect()
        })
        .collect())
}

/// Each row's [`RowWeights`] (`[rows, vocab]` logits, one `(temperature,
/// min_p)` per row), reduced where the logits are, so that a draw of
/// [`crate::sampling::Sampler::chunked_draw`] then reads one chunk of its row,
/// not the row: on the CPU [`crate::sampling::weigh`] on the row (the host's
/// own numbers); elsewhere candle ops over the whole step (f32 sums, so a
/// draw may differ from the host's only where a rounding moves a boundary).
/// `None` for a row with nothing finite to weigh (the host takes it whole).
pub fn row_weights(logits: &Tensor, params: &[(f32, f32)]) -> Result<Vec<Option<RowWeights>>> {
    let (rows, _) = logits.dims2()?;
    if rows != params.len() {
        return Err(crate::error::Error::InvalidRequest(format!("{} sampling settings for {rows} rows", params.len())));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() {
        let mut w = Vec::new();
        return Ok(logits
            .to_vec2::<f32>()?
            .iter()
            .zip(params)
            .map(|(row, &(t, min_p))| weigh_row(row, t, min_p, &mut w).map(|(parts, max)| RowWeights { max, parts }))
            .collect());
    }
    weights_by_ops(&logits, params)
}

/// [`row_weights`] by candle ops over the whole step, where the logits are.
fn weights_by_ops(logits: &Tensor, params: &[(f32, f32)]) -> Result<Vec<Option<RowWeights>>> {
    let (rows, vocab) = logits.dims2()?;
    let dev = logits.device();
    let chunks = vocab.div_ceil(CHUNK);
    let temps = Tensor::from_vec(params.iter().map(|p| p.0).collect::<Vec<_>>(), (rows, 1), dev)?;
    let min_p = Tensor::from_vec(params.iter().map(|p| p.1).collect::<Vec<_>>(), (rows, 1, 1), dev)?;
    let v = logits.broadcast_div(&temps)?;
    let max = v.max_keepdim(1)?;
    let w = v.broadcast_sub(&max)?.exp()?;
    let w = if vocab % CHUNK == 0 { w } else { w.pad_with_zeros(1, 0, chunks * CHUNK - vocab)? };
    let w = w.reshape((rows, chunks, CHUNK))?;
    let all = w.sum(2)?.to_vec2::<f32>()?;
    let kept = (&w * w.broadcast_ge(&min_p)?.to_dtype(DType::F32)?)?.sum(2)?.to_vec2::<f32>()?;
    let max = max.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..rows)
        .map(|r| {
            let parts: Vec<(f64, f64)> = all[r].iter().zip(&kept[r]).map(|(a, k)| (*a as f64, *k as f64)).collect();
            let finite = max[r].is_finite() && parts.iter().all(|(a, k)| a.is_finite() && k.is_finite());
            finite.then(|| RowWeights { max: max[r], parts })
        })
        .collect())
}

/// The best `k` `(id, logit)` pairs of `row` into `out`, best first, in
/// the kernel's order (larger first, lower id on ties, NaN never chosen):
/// the op's CPU arm, and the host's pick it is checked against.
pub fn best_of_row(row: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    out.extend(row.iter().enumerate().filter(|(_, v)| !v.is_nan()).map(|(i, v)| (i as u32, *v)));
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = k.min(out.len());
    if k < out.len() && k > 0 {
        out.select_nth_unstable_by(k - 1, by);
    }
    out.truncate(k);
    out.sort_unstable_by(by);
}

/// The op: `[rows, vocab]` f32 logits, contiguous, to `[rows, MAX_TOP_K]`
/// i32 ids of each row's best `ks[row]`, best first, `-1` after them.
struct TopK {
    ks: Vec<i32>,
}

impl CustomOp1 for TopK {
    fn name(&self) -> &'static str {
        "top-k-candidates"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = rows_vocab(l)?;
        let logits = s.as_slice::<f32>()?;
        let mut out = vec![-1i32; rows * MAX_TOP_K];
        let mut cand: Vec<(u32, f32)> = Vec::with_capacity(vocab);
        for ((row, &k), ids) in logits.chunks_exact(vocab).zip(&self.ks).zip(out.chunks_exact_mut(MAX_TOP_K)) {
            best_of_row(row, k as usize, &mut cand);
            for (o, (i, _)) in ids.iter_mut().zip(&cand) {
                *o = *i as i32;
            }
        }
        Ok((CpuStorage::I32(out), Shape::from((rows, MAX_TOP_K))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use arqon_kernels::cuda::launch::{SamplingOutputs, SamplingParams};
        let (rows, vocab) = rows_vocab(l)?;
        let dev = s.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        // top_p 1 (off), 1 / temperature 1 (raw logits): the kernel keeps
        // exactly each row's best k; its probabilities and draw go unused.
        let top_k = dev.clone_htod(&self.ks)?;
        let top_p = dev.clone_htod(&vec![1.0f32; rows])?;
        let inv_temp = dev.clone_htod(&vec![1.0f32; rows])?;
        let uniform = dev.alloc_zeros::<f32>(rows)?;
        let mut ids = dev.alloc_zeros::<i32>(rows * MAX_TOP_K)?;
        let mut probs = dev.alloc_zeros::<f32>(rows * MAX_TOP_K)?;
        let mut count = dev.alloc_zeros::<i32>(rows)?;
        let mut token = dev.alloc_zeros::<i32>(rows)?;
        let variant = super::plan::kernel_plan().map(|p| p.top_k_top_p).unwrap_or_default();
        let params = SamplingParams { top_k: &top_k, top_p: &top_p, inv_temp: &inv_temp, uniform: &uniform };
        let out = SamplingOutputs { ids: &mut ids, probs: &mut probs, count: &mut count, token: &mut token };
        kernels
            .top_k_top_p(variant, s.as_cuda_slice::<f32>()?, vocab, params, out)
            .map_err(candle_core::Error::wrap)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(ids, dev), Shape::from((rows, MAX_TOP_K))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_what_greedy_decoding_picks_row_by_row() {
        let (rows, vocab) = (5, 97);
        let mut data: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 1013) as f32 / 17.0 - 30.0).collect();
        // Row 1: a tie (the lower id wins); row 2: a NaN above the rest; row
        // 3: every logit -inf (id 0); row 4: the maximum last.
        let max = data.iter().copied().fold(f32::MIN, f32::max) + 1.0;
        data[vocab + 10] = max;
        data[vocab + 60] = max;
        data[2 * vocab + 3] = f32::NAN;
        data[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
        data[5 * vocab - 1] = max;
        let t = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let want: Vec<u32> = data.chunks(vocab).map(super::super::argmax).collect();
        assert_eq!(want[1], 10);
        assert_eq!((want[3], want[4]), (0, vocab as u32 - 1));
        assert_eq!(greedy_ids(&t).unwrap(), want);
        // Rows picked out of a bigger step (a strided view) give the same ids.
        let two = t.narrow(0, 1, 2).unwrap();
        assert_eq!(greedy_ids(&two).unwrap(), want[1..3]);
        assert!(greedy_ids(&t.narrow(0, 0, 0).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn candidates_are_the_kernels_choice_with_their_logits() {
        use arqon_kernels::reference::sampling::{top_k_top_p, RowSampling};
        let (rows, vocab) = (4, 300);
        // Quantised values: many ties, broken by the lower id.
        let mut data: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 61) as f32 / 4.0 - 7.0).collect();
        data[2 * vocab + 5] = f32::NAN;
        let t = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let ks = [1, 40, 128, 7];
        let got = top_candidates(&t, &ks).unwrap();
        for (r, (row, k)) in data.chunks(vocab).zip(ks).enumerate() {
            let want = top_k_top_p(row, &RowSampling { top_k: k as i32, top_p: 1.0, inv_temp: 1.0, uniform: 0.0 });
            let ids: Vec<i32> = got[r].iter().map(|(i, _)| *i as i32).collect();
            assert_eq!(ids, want.ids, "row {r}");
            assert!(got[r].iter().all(|(i, v)| *v == row[*i as usize]), "row {r}: the logits of the ids");
        }
        // A strided view of rows, and a k past a small vocabulary.
        let two = t.narrow(0, 1, 2).unwrap();
        assert_eq!(top_candidates(&two, &[40, 128]).unwrap(), got[1..3]);
        let small = Tensor::from_vec(vec![0.5f32, f32::NAN, 2.0], (1, 3), &Device::Cpu).unwrap();
        assert_eq!(top_candidates(&small, &[128]).unwrap(), vec![vec![(2, 2.0), (0, 0.5)]]);
        for bad in [&[0usize][..], &[129], &[5, 5]] {
            assert!(top_candidates(&small, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn row_weights_are_the_hosts_and_the_ops_agree_with_them() {
        let (rows, vocab) = (3, 2 * CHUNK + 100);
        let data: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 4001) as f32 / 200.0 - 10.0).collect();
        let t = Tensor::from_vec(data.clone(), (rows, vocab), &Device::Cpu).unwrap();
        let params = [(1.0, 0.0), (0.7, 0.05), (1.5, 0.0)];
        let host = row_weights(&t, &params).unwrap();
        let ops = weights_by_ops(&t, &params).unwrap();
        for (r, ((h, o), (temp, min_p))) in host.iter().zip(&ops).zip(params).enumerate() {
            let mut w = Vec::new();
            let (parts, max) =
                crate::sampling::weigh(&data[r * vocab..(r + 1) * vocab], temp, min_p, &mut w, false).unwrap();
            let h = h.as_ref().unwrap();
            assert_eq!((h.max, &h.parts), (max, &parts), "row {r}: the CPU's weights are the host's");
            let o = o.as_ref().unwrap();
            assert_eq!(o.max, max);
            assert_eq!(o.parts.len(), 3);
            for ((a, k), (ha, hk)) in o.parts.iter().zip(&parts) {
                assert!(
                    (a - ha).abs() <= 1e-5 * ha && (k - hk).abs() <= 1e-5 * ha.max(1.0),
                    "row {r}: {a} {k} vs {ha} {hk}"
                );
            }
            assert!(parts.iter().any(|(a, k)| k < a) == (min_p > 0.0), "row {r}: min_p drops weights");
        }
        let nan = Tensor::from_vec(vec![f32::NAN; 8], (1, 8), &Device::Cpu).unwrap();
        assert_eq!(weights_by_ops(&nan, &[(1.0, 0.0)]).unwrap(), vec![None]);
        assert_eq!(row_weights(&nan, &[(1.0, 0.0)]).unwrap(), vec![None]);
    }
}
