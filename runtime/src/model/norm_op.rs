//! Residual add fused with the RMSNorm after it, as one candle op: on a CUDA
//! device our `add_rms_norm_packed` kernel (`kernels/cuda/rms_norm.cu`) on
//! candle's stream, on the CPU candle's own RMSNorm arithmetic (see
//! [`AddRmsNorm::cpu`]; the kernel is held to its reference,
//! [`arqon_kernels::reference::fused::fused_add_rms_norm`]).
//!
//! A candle op returns one fresh tensor, and this one has two results (the
//! sum, which is the next residual, and its normalised rows), so the op
//! returns both packed as `[2, rows, dim]`; [`AddRmsNorm::forward`] hands
//! them back as two views of it, each contiguous. The fixed-buffer decode
//! step uses it between every two blocks of a layer (vLLM's pattern): one
//! launch where candle takes two (an add, then its RMSNorm).

use arqon_kernels::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

#[cfg(feature = "cuda")]
use super::op_layout::cuda_view;
use super::op_layout::span;
use crate::error::Result;

/// `h = x + residual`, `norm = rms_norm(h) * weight` over rows of the
/// weight's length, computed in the inputs' dtype (f32, bf16 or f16; the
/// sum rounded once and the mean taken over the rounded sum).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddRmsNorm {
    eps: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: arqon_kernels::plan::RmsNormVariant,
}

impl AddRmsNorm {
    /// The op with RMSNorm's `eps`, in the SKU's measured variant.
    pub fn new(eps: f32) -> Self {
        let variant = super::plan::kernel_plan().map(|p| p.rms_norm).unwrap_or_default();
        AddRmsNorm { eps, variant }
    }

    /// `(x + residual, rms_norm(x + residual) * weight)` for `x` and
    /// `residual` of one shape `[.., dim]` and `weight` `[dim]`, all of one dtype.
    pub fn forward(&self, x: &Tensor, residual: &Tensor, weight: &Tensor) -> Result<(Tensor, Tensor)> {
        let dims = x.dims().to_vec();
        let packed = x.contiguous()?.apply_op3_no_bwd(&residual.contiguous()?, &weight.contiguous()?, self)?;
        Ok((packed.get(0)?.reshape(dims.as_slice())?, packed.get(1)?.reshape(dims.as_slice())?))
    }
}

const OP: &str = "add + RMSNorm";

/// Rows and width of the op's inputs, checked (rows of the weight; each
/// input's contiguity is checked where its span is taken).
fn geometry(lx: &Layout, lr: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize)> {
    let dim = lw.shape().elem_count();
    let n = lx.shape().elem_count();
    if lw.shape().rank() != 1 || dim == 0 || lx.shape() != lr.shape() || lx.shape().dims().last() != Some(&dim) {
        candle_core::bail!(
            "add + RMSNorm: x {:?} and residual {:?} must be rows of the weight's {:?}",
            lx.shape(),
            lr.shape(),
            lw.shape()
        )
    }
    Ok((n / dim, dim))
}

impl AddRmsNorm {
    /// The CPU arm, packed: the sums as the kernel's reference forms them
    /// (one f32 add, rounded once), the norm as candle's CPU RMSNorm computes it (an f32 sum of squares
    /// in row order; `h / T(sqrt(mean + eps)) * w` in `T`), so that on the
    /// CPU the fused op gives the unfused step's numbers bit for bit. The
    /// quantized matmuls after it round their input rows to q8, which turns
    /// a last-bit difference into a visible one; the reference (f64 sums)
    /// differs from either by reassociation only, and the kernel is tested
    /// against it (`kernels/tests/backends.rs`).
    fn cpu<T: Elem>(&self, x: &[T], residual: &[T], weight: &[T]) -> candle_core::Result<Vec<T>> {
        Ok(add_rms_norm_cpu(x, residual, weight, self.eps))
    }

    /// The CUDA arm in element type `T`.
    #[cfg(feature = "cuda")]
    fn cuda<T: arqon_kernels::cuda::launch::DeviceElem + candle_core::cuda::CudaDType>(
        &self,
        (x, lx): (&candle_core::CudaStorage, &Layout),
        (r, lr): (&candle_core::CudaStorage, &Layout),
        (w, lw): (&candle_core::CudaStorage, &Layout),
    ) -> candle_core::Result<candle_core::CudaStorage> {
        let dev = x.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        let inputs = (
            cuda_view::<T>(x, lx, OP, "x")?,
            cuda_view::<T>(r, lr, OP, "the residual")?,
            cuda_view::<T>(w, lw, OP, "the weight")?,
        );
        let out = kernels.add_rms_norm_packed_new(self.variant, inputs, self.eps).map_err(candle_core::Error::wrap)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// [`AddRmsNorm`]'s CPU arm (see its `cpu`): `[sums, normed rows]`, packed.
pub(super) fn add_rms_norm_cpu<T: Elem>(x: &[T], residual: &[T], weight: &[T], eps: f32) -> Vec<T> {
    let (n, dim) = (x.len(), weight.len());
    let mut out: Vec<T> = x.iter().zip(residual).map(|(a, b)| T::from_f32(a.to_f32() + b.to_f32())).collect();
    out.resize(2 * n, T::from_f32(0.0));
    let (sum, norm) = out.split_at_mut(n);
    for (h, o) in sum.chunks_exact(dim).zip(norm.chunks_exact_mut(dim)) {
        let sum2: f32 = h.iter().map(|v| v.to_f32() * v.to_f32()).sum();
        let m = T::from_f32((sum2 / dim as f32 + eps).sqrt()).to_f32();
        for ((o, h), w) in o.iter_mut().zip(h).zip(weight) {
            *o = T::from_f32(T::from_f32(h.to_f32() / m).to_f32() * w.to_f32());
        }
    }
    out
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        r: &CpuStorage,
        lr: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = geometry(lx, lr, lw)?;
        let (sx, sr, sw) = (span(lx, OP, "x")?, span(lr, OP, "the residual")?, span(lw, OP, "the weight")?);
        macro_rules! arm {
            ($v:ident, $x:expr, $r:expr, $w:expr) => {
                CpuStorage::$v(self.cpu(&$x[sx], &$r[sr], &$w[sw])?)
            };
        }
        let out = match (x, r, w) {
            (CpuStorage::F32(x), CpuStorage::F32(r), CpuStorage::F32(w)) => arm!(F32, x, r, w),
            (CpuStorage::BF16(x), CpuStorage::BF16(r), CpuStorage::BF16(w)) => arm!(BF16, x, r, w),
            (CpuStorage::F16(x), CpuStorage::F16(r), CpuStorage::F16(w)) => arm!(F16, x, r, w),
            _ => candle_core::bail!(
                "add + RMSNorm: x ({:?}), the residual ({:?}) and the weight ({:?}) must share one of f32, bf16, f16",
                x.dtype(),
                r.dtype(),
                w.dtype()
            ),
        };
        Ok((out, Shape::from((2, rows, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        r: &candle_core::CudaStorage,
        lr: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        let (rows, dim) = geometry(lx, lr, lw)?;
        let dtypes = (x.dtype(), r.dtype(), w.dtype());
        let out = match dtypes {
            (DType::F32, DType::F32, DType::F32) => self.cuda::<f32>((x, lx), (r, lr), (w, lw))?,
            (DType::BF16, DType::BF16, DType::BF16) => self.cuda::<half::bf16>((x, lx), (r, lr), (w, lw))?,
            (DType::F16, DType::F16, DType::F16) => self.cuda::<half::f16>((x, lx), (r, lr), (w, lw))?,
            _ => candle_core::bail!("add + RMSNorm: the inputs ({dtypes:?}) must share one of f32, bf16, f16"),
        };
        Ok((out, Shape::from((2, rows, dim))))
    }
}

#[cfg(test)]
mod tests {
    use arqon_kernels::reference::fused::fused_add_rms_norm;
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// The packed op against candle's add and RMSNorm, in f32 and bf16, on
    /// inputs that start inside their storage (as a packed sum does).
    #[test]
    fn fused_add_and_norm_equal_candle_s_add_then_norm() {
        let dev = Device::Cpu;
        let (rows, dim) = (3, 64);
        let draw = |seed: u64, n: usize| -> Tensor {
            let mut rng = arqon_kernels::reference::rng::TestRng::new(seed);
            Tensor::from_vec(rng.vec(n, -2.0, 2.0), n, &dev).unwrap()
        };
        // x sits at an offset: the second half of a longer buffer.
        let x = draw(1, 2 * rows * dim).narrow(0, rows * dim, rows * dim).unwrap().reshape((rows, dim)).unwrap();
        let r = draw(2, rows * dim).reshape((rows, dim)).unwrap();
        let w = (draw(3, dim).abs().unwrap() + 0.5).unwrap();
        let op = AddRmsNorm::new(1e-5);
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1.0 / 64.0)] {
            let (x, r, w) = (x.to_dtype(dtype).unwrap(), r.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let (sum, norm) = op.forward(&x, &r, &w).unwrap();
            assert_eq!(sum.dims(), [rows, dim]);
            assert_eq!(sum.dtype(), dtype);
            let want_sum = (&x + &r).unwrap();
            let want_norm = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // One add, rounded once, in both: the sums are the same numbers.
            assert_eq!(f(&sum), f(&want_sum), "{dtype:?}");
            // On the CPU the norm is candle's, bit for bit.
            assert_eq!(f(&norm), f(&want_norm), "{dtype:?}");
            // And the kernel's reference, which the GPU kernel is held to, is
            // within reassociation of it.
            let mut ref_sum = f(&r);
            let mut ref_norm = vec![0.0; rows * dim];
            fused_add_rms_norm(&f(&x), &mut ref_sum, &f(&w), 1e-5, &mut ref_norm).unwrap();
            for (a, b) in ref_norm.iter().zip(f(&want_norm)) {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{dtype:?}: {a} vs {b}");
            }
        }
        // Mismatched rows and a mixed dtype are refused, not misread.
        let short = Tensor::zeros((rows, dim - 1), DType::F32, &dev).unwrap();
        assert!(op.forward(&short, &short, &w).is_err());
        assert!(op.forward(&x, &r.to_dtype(DType::BF16).unwrap(), &w).is_err());
    }
}
