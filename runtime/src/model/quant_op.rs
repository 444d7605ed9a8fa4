//! A product by a GGUF model's quantized matrix (`Q8_0`, `Q4_0`, `Q4_1`) as
//! one candle op for 1 to 8 rows: on a CUDA device our `quant_gemv` kernel
//! (`kernels/cuda/quant_gemv.cu`) on candle's stream, on the CPU its
//! reference. [`super::weights::Linear`] routes here when the process's
//! kernel plan says `quantized=ours`, or on a GPU `ARQON_CUDA_QUANTIZED`
//! does. Its reason to exist on a GPU: candle's quantized kernels keep one
//! scratch buffer per device and replace it when a product needs more, so a
//! decode step that launches them cannot be captured as a CUDA graph; with
//! this op a step of up to 8 rows launches none of them.
//!
//! The op reads the matrix's blocks from a `u8` tensor of its own
//! ([`QuantBlocks`]): candle lends its device buffer only as a raw pointer,
//! which this crate (no `unsafe`) cannot wrap, and its kernels still take
//! products of more rows. So under `quantized=ours` a quantized matrix
//! takes its size twice on the device; on a GPU the copy is made at load,
//! from the file's bytes, before the KV cache is sized.

use std::sync::{Arc, OnceLock};

use arqon_kernels::plan::{QuantGemvVariant, QuantizedVariant};
use arqon_kernels::reference::ggml::{quant_gemv, GemvShape, QuantFormat};
use arqon_kernels::KernelPlan;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::op_layout::span;
use crate::error::Result;

const OP: &str = "quantized GEMV";

/// Most rows the op takes (the kernel's `MAX_M`).
pub(crate) const MAX_ROWS: usize = 8;

/// `x @ Wᵀ` for f32 rows `x` `[m ≤ 8, k]` and a quantized `W` `[n, k]`, f32 out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantGemv {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: QuantGemvVariant,
    format: QuantFormat,
    /// `(n, k)`.
    dims: (usize, usize),
}

/// A matrix's GGML blocks as a `u8` tensor on its device, made once, on its
/// first product through the op.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuantBlocks(Arc<OnceLock<Tensor>>);

impl QuantBlocks {
    /// The blocks of `q` (this holder's matrix), copied from it the first
    /// time if [`QuantBlocks::make`] has not made them.
    pub fn of(&self, q: &QTensor) -> Result<Tensor> {
        self.make(q, &q.device())
    }

    /// Copies the blocks of `q` (wherever it is) to `device`, once.
    pub fn make(&self, q: &QTensor, device: &candle_core::Device) -> Result<Tensor> {
        if let Some(t) = self.0.get() {
            return Ok(t.clone());
        }
        let bytes = q.data()?;
        let t = Tensor::from_raw_buffer(&bytes, DType::U8, &[bytes.len()], device)?;
        Ok(self.0.get_or_init(|| t).clone())
    }

    /// Bytes of the copy, 0 before it is made.
    pub fn bytes(&self) -> u64 {
        self.0.get().map_or(0, |t| t.elem_count() as u64)
    }
}

/// The kernels' format of a GGML type, if they take it.
pub(crate) fn format_of(t: GgmlDType) -> Option<QuantFormat> {
    match t {
        GgmlDType::Q8_0 => Some(QuantFormat::Q8_0),
        GgmlDType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlDType::Q4_1 => Some(QuantFormat::Q4_1),
        _ => None,
    }
}

/// Whether ours serve quantized products on `device` under `plan`: on a GPU
/// `ARQON_CUDA_QUANTIZED` if set, else the plan's `quantized`.
fn serves(plan: Option<KernelPlan>, device: &candle_core::Device) -> bool {
    let over = if device.is_cpu() { None } else { env_override() };
    over.or(plan.map(|p| p.quantized)) == Some(QuantizedVariant::Ours)
}

/// Whether ours serve a matrix of `format` on `device` under `plan`, at some row count.
pub(crate) fn serves_format(plan: Option<KernelPlan>, device: &candle_core::Device, format: GgmlDType) -> bool {
    serves(plan, device) && format_of(format).is_some()
}

/// Whether the op takes the product of `rows` f32 rows by `w` on `device`
/// under `plan` (what [`QuantGemv::route`] checks of all but the rows' width).
pub(crate) fn takes(plan: Option<KernelPlan>, device: &candle_core::Device, rows: usize, w: &QTensor) -> bool {
    serves_format(plan, device, w.dtype()) && (1..=MAX_ROWS).contains(&rows)
}

impl QuantGemv {
    /// The op for a product of `x` by `w` when ours serve it: on a GPU
    /// `ARQON_CUDA_QUANTIZED` if set, else `plan` (the process's,
    /// [`super::plan::kernel_plan`]) says `quantized=ours`; `x` f32
    /// `[1..=8, k]` and `w` a `[n, k]` matrix in a format the kernel takes.
    pub fn route(plan: Option<KernelPlan>, x: &Tensor, w: &QTensor) -> Option<QuantGemv> {
        let format = format_of(w.dtype())?;
        let (Ok((rows, k)), [n, wk]) = (x.dims2(), w.shape().dims()) else { return None };
        let fits = takes(plan, x.device(), rows, w) && k == *wk && x.dtype() == DType::F32;
        let variant = plan.map(|p| p.quant_gemv).unwrap_or_default();
        fits.then_some(QuantGemv { variant, format, dims: (*n, k) })
    }

    /// `x @ Wᵀ`, `[rows, n]` f32, reading the matrix from `blocks`
    /// ([`QuantBlocks::of`] the routed matrix).
    pub fn forward(&self, x: &Tensor, blocks: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op2_no_bwd(blocks, self)?)
    }

    /// The product's shape for rows `lx`, and the spans of the rows and of
    /// the blocks in `lw` (which may hold padding after them), checked.
    fn shape(&self, lx: &Layout, lw: &Layout) -> candle_core::Result<(GemvShape, [std::ops::Range<usize>; 2])> {
        let (n, k) = self.dims;
        let bytes = n * (k / 32) * self.format.block_bytes();
        let w = span(lw, OP, "the blocks")?;
        if w.len() < bytes {
            candle_core::bail!("{OP}: {} bytes of blocks, not the {bytes} of a [{n}, {k}] matrix", w.len());
        }
        match lx.shape().dims() {
            &[m, xk] if xk == k && (1..=MAX_ROWS).contains(&m) => {
                Ok((GemvShape { m, n, k }, [span(lx, OP, "the rows")?, w.start..w.start + bytes]))
            }
            d => candle_core::bail!("{OP}: want rows [1..={MAX_ROWS}, {k}], got {d:?}"),
        }
    }
}

/// `ARQON_CUDA_QUANTIZED=candle|ours`, read once (a value that does not
/// parse is logged once and ignored).
fn env_override() -> Option<QuantizedVariant> {
    static OVERRIDE: OnceLock<Option<QuantizedVariant>> = OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let v = std::env::var("ARQON_CUDA_QUANTIZED").ok()?;
        v.parse()
            .map_err(
                |e| tracing::warn!(error = %e, "ARQON_CUDA_QUANTIZED is ignored: the kernel plan's quantized serves"),
            )
            .ok()
    })
}

impl CustomOp2 for QuantGemv {
    fn name(&self) -> &'static str {
        "quant-gemv"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, [rx, rw]) = self.shape(lx, lw)?;
        let (x, w) = (&sx.as_slice::<f32>()?[rx], &sw.as_slice::<u8>()?[rw]);
        let mut y = vec![0.0f32; shape.m * shape.n];
        quant_gemv(self.format, w, x, shape, &mut y).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), Shape::from((shape.m, shape.n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (shape, [rx, rw]) = self.shape(lx, lw)?;
        let dev = sx.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        let x = sx.as_cuda_slice::<f32>()?.slice(rx);
        let w = sw.as_cuda_slice::<u8>()?.slice(rw);
        let y = kernels.quant_gemv_new(self.variant, self.format, shape, w, x).map_err(candle_core::Error::wrap)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(y, dev), Shape::from((shape.m, shape.n))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    use super::*;

    /// The op against candle's quantized matmul on the same blocks, for
    /// each format the kernel takes and 1 to 8 rows (rows that start inside
    /// their storage); and what it does not take.
    #[test]
    fn the_op_multiplies_as_candle_does_and_routes_only_under_the_plan() {
        let dev = Device::Cpu;
        let mut rng = arqon_kernels::reference::rng::TestRng::new(21);
        let (n, k) = (37, 128); // candle's CPU Q4_1 dot takes an even number of blocks
        let dense = Tensor::from_vec(rng.vec(n * k, -1.0, 1.0), (n, k), &dev).unwrap();
        let ours = Some(KernelPlan { quantized: QuantizedVariant::Ours, ..KernelPlan::default() });
        for t in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let w = Arc::new(QTensor::quantize(&dense, t).unwrap());
            let candle = QMatMul::from_arc(w.clone()).unwrap();
            for m in [1, 3, 8] {
                let rows = Tensor::from_vec(rng.vec(m * k + 5, -2.0, 2.0), m * k + 5, &dev).unwrap();
                let x = rows.narrow(0, 5, m * k).unwrap().reshape((m, k)).unwrap();
                let op = QuantGemv::route(ours, &x, &w).expect("ours under the plan");
                let got = op.forward(&x, &QuantBlocks::default().of(&w).unwrap()).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[m, n][..], DType::F32));
                let want = candle.forward(&x).unwrap();
                let (g, w) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap());
                // candle quantizes the rows to 8 bits per block first (as llama.cpp does); the kernel
                // multiplies them as they are: within that rounding of the product.
                for (i, (a, b)) in g.iter().zip(w.to_vec1::<f32>().unwrap()).enumerate() {
                    assert!((a - b).abs() <= 0.02 * (1.0 + b.abs()) + 0.05, "{t:?} m{m} [{i}]: {a} vs {b}");
                }
            }
            let x = Tensor::zeros((9, k), DType::F32, &dev).unwrap();
            assert!(QuantGemv::route(ours, &x, &w).is_none(), "9 rows go to candle");
            assert!(QuantGemv::route(Some(KernelPlan::default()), &x.narrow(0, 0, 1).unwrap(), &w).is_none());
            assert!(QuantGemv::route(None, &x.narrow(0, 0, 1).unwrap(), &w).is_none());
            let half = x.narrow(0, 0, 1).unwrap().to_dtype(DType::BF16).unwrap();
            assert!(QuantGemv::route(ours, &half, &w).is_none(), "f32 rows only");
        }
        let f16 = Arc::new(QTensor::quantize(&dense, GgmlDType::F16).unwrap());
        assert!(QuantGemv::route(ours, &dense.narrow(0, 0, 1).unwrap(), &f16).is_none(), "not a block format");
    }
}
