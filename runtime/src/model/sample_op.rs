//! Greedy token choice as one candle op over a step's logits, so that for a
//! greedy row only its token id leaves the device, not its `vocab` logits:
//! on a CUDA device our `argmax` kernel (`kernels/cuda/sampling.cu`) on
//! candle's stream, on the CPU the kernel's reference
//! ([`arqon_kernels::reference::sampling::argmax`]), which is the rule
//! greedy decoding always used ([`super::argmax`]: the largest logit, the
//! lowest id on ties, never a NaN).
//!
//! The server takes greedy ids through it on the CPU always (the same
//! result as sampling the row on the host, so every greedy server test runs
//! it) and on a GPU when `ARQON_CUDA_SAMPLING=device`, off by default there
//! until a GPU run has checked the kernel (see [`enabled_on`]).

use arqon_kernels::reference::sampling::argmax;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;

/// Whether greedy rows on `device` are picked by the op: on the CPU always;
/// on a GPU when `ARQON_CUDA_SAMPLING=device` (read once per process: the
/// scheduler asks every step).
pub fn enabled_on(device: &Device) -> bool {
    static ON_GPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    device.is_cpu() || *ON_GPU.get_or_init(|| std::env::var("ARQON_CUDA_SAMPLING").is_ok_and(|v| v == "device"))
}

/// The greedy token of each row of `logits` (`[rows, vocab]`, f32).
pub fn greedy_ids(logits: &Tensor) -> Result<Vec<u32>> {
    let (rows, _) = logits.dims2()?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    let logits = logits.to_dtype(DType::F32)?;
    // The kernel takes whole slices: rows cut out of a step are copied.
    let whole = logits.is_contiguous() && logits.layout().start_offset() == 0;
    let logits = if whole { logits } else { logits.force_contiguous()? };
    let ids = logits.apply_op1_no_bwd(&Argmax)?;
    Ok(ids.to_vec1::<i32>()?.into_iter().map(|i| i as u32).collect())
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
}
