//! The MLP's activation as one candle op over the stacked gate/up product
//! (vLLM's `silu_and_mul`): on a CUDA device our `silu_mul` kernel
//! (`kernels/cuda/silu_mul.cu`) on candle's stream, on the CPU its
//! reference; both in the storage type's arithmetic, as candle's SiLU and
//! multiply. Candle takes two launches for it (SiLU of the gate's view, then
//! the product with the up view); this takes one. The fixed-buffer decode
//! step uses it.

use arqon_kernels::reference::fused::silu_mul;
use arqon_kernels::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::op_layout::span;
use crate::error::Result;

const OP: &str = "SiLU and multiply";

/// `silu(gate) * up` from `[rows, gate (inter) | up (inter)]` rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SiluMul {
    inter: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: arqon_kernels::plan::SiluMulVariant,
}

impl SiluMul {
    /// The op for an intermediate size of `inter`, in the SKU's measured variant.
    pub fn new(inter: usize) -> Self {
        let variant = super::plan::kernel_plan().map(|p| p.silu_mul).unwrap_or_default();
        SiluMul { inter, variant }
    }

    /// `[rows, inter]` in `gate_up`'s dtype (f32, bf16 or f16).
    pub fn forward(&self, gate_up: &Tensor) -> Result<Tensor> {
        Ok(gate_up.contiguous()?.apply_op1_no_bwd(self)?)
    }

    /// The span and rows of a `[rows, 2 * inter]` input, checked.
    fn rows(&self, l: &Layout) -> candle_core::Result<(std::ops::Range<usize>, usize)> {
        match l.shape().dims() {
            [rows, w] if *w == 2 * self.inter && self.inter > 0 => Ok((span(l, OP, "the product")?, *rows)),
            dims => candle_core::bail!("{OP}: want [rows, 2 × {}], got {dims:?}", self.inter),
        }
    }

    /// The CPU arm: the kernel's reference ([`silu_mul`]), in `T`'s
    /// arithmetic as candle's SiLU and multiply compute it, so that the
    /// fused step equals the unfused one bit for bit (see [`super::norm_op`]
    /// on why that matters on the CPU).
    fn cpu<T: Elem>(&self, gate_up: &[T]) -> candle_core::Result<Vec<T>> {
        let mut out = vec![T::from_f32(0.0); gate_up.len() / 2];
        silu_mul(gate_up, self.inter, &mut out).map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (all, rows) = self.rows(l)?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(&v[all])?),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.cpu(&v[all])?),
            CpuStorage::F16(v) => CpuStorage::F16(self.cpu(&v[all])?),
            other => candle_core::bail!("{OP}: {:?} is not f32, bf16 or f16", other.dtype()),
        };
        Ok((out, Shape::from((rows, self.inter))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        let (all, rows) = self.rows(l)?;
        let dev = s.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        macro_rules! arm {
            ($t:ty) => {{
                let view = s.as_cuda_slice::<$t>()?.slice(all);
                let out = kernels.silu_mul_new(self.variant, view, self.inter).map_err(candle_core::Error::wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => arm!(f32),
            DType::BF16 => arm!(half::bf16),
            DType::F16 => arm!(half::f16),
            other => candle_core::bail!("{OP}: {other:?} is not f32, bf16 or f16"),
        };
        Ok((out, Shape::from((rows, self.inter))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// The op against candle's SiLU of the gate's view times the up view, in
    /// f32 and bf16, on a product that starts inside its storage: the same
    /// numbers bit for bit.
    #[test]
    fn silu_mul_equals_candle_s_silu_then_mul() {
        let dev = Device::Cpu;
        let (rows, inter) = (3, 40);
        let mut rng = arqon_kernels::reference::rng::TestRng::new(5);
        let all = Tensor::from_vec(rng.vec(rows * 2 * inter + 8, -8.0, 8.0), rows * 2 * inter + 8, &dev).unwrap();
        let y = all.narrow(0, 8, rows * 2 * inter).unwrap().reshape((rows, 2 * inter)).unwrap();
        let op = SiluMul::new(inter);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let y = y.to_dtype(dtype).unwrap();
            let got = op.forward(&y).unwrap();
            assert_eq!(got.dims(), [rows, inter]);
            assert_eq!(got.dtype(), dtype);
            let (gate, up) = (y.narrow(1, 0, inter).unwrap(), y.narrow(1, inter, inter).unwrap());
            let want = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(f(&got), f(&want), "{dtype:?}");
        }
        // A row of the wrong width is refused, not misread.
        assert!(SiluMul::new(inter + 1).forward(&y).is_err());
    }
}
