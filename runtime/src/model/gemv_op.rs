//! A decode step's product by a dense matrix as one candle op: `x @ Wᵀ` for
//! few rows (1-32: [`GemvShape::suits_dense_kernel`]), on a CUDA device our `dense_gemv` kernel
//! (`kernels/cuda/dense_gemv.cu`) on candle's stream, on the CPU its
//! reference. The rows and the product are each f32 or the matrix's type, so
//! a bf16 matrix takes the f32 residual stream's rows and hands f32 back in
//! one launch, where candle's path takes three (the rows to bf16, cuBLAS,
//! the product to f32). [`super::weights::Linear`] routes here when the
//! process's kernel plan names one of our variants (`dense_gemv=`), or on a
//! GPU `ARQON_CUDA_DENSE_GEMV` does.

use arqon_kernels::plan::DenseGemvVariant;
use arqon_kernels::reference::dense::{dense_gemv, dense_gemv_silu};
use arqon_kernels::reference::ggml::GemvShape;
use arqon_kernels::{Elem, KernelPlan};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::op_layout::span;
use crate::error::Result;

const OP: &str = "dense GEMV";

/// `x @ wᵀ` into `out`'s dtype; with `silu`, `silu(gate) * up @ wᵀ` of
/// gate/up rows `x` (the MLP's activation fused into the down product).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DenseGemv {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: DenseGemvVariant,
    out: DType,
    silu: bool,
}

impl DenseGemv {
    /// The variant in force for a product of `x` by `w`, when it is one of
    /// ours and the product fits it (rows [`GemvShape::suits_dense_kernel`]
    /// takes, `w` a `[n, k]` matrix of f32,
    /// bf16 or f16, `x` `[rows, k]` in f32 or `w`'s type): on a GPU
    /// `ARQON_CUDA_DENSE_GEMV` if set, else the one `plan` names (the
    /// process's, [`super::plan::kernel_plan`]).
    pub fn route(plan: Option<KernelPlan>, x: &Tensor, w: &Tensor) -> Option<DenseGemvVariant> {
        Self::variant(plan, x).filter(|_| Self::fits(x, w, 1))
    }

    /// [`DenseGemv::route`] for the fused form: `gate_up` rows `[rows, 2k]`
    /// into a `[n, k]` down matrix.
    pub fn route_silu(plan: Option<KernelPlan>, gate_up: &Tensor, w: &Tensor) -> Option<DenseGemvVariant> {
        Self::variant(plan, gate_up).filter(|_| Self::fits(gate_up, w, 2))
    }

    fn variant(plan: Option<KernelPlan>, x: &Tensor) -> Option<DenseGemvVariant> {
        let over = if x.device().is_cpu() { None } else { env_override() };
        over.or(plan.map(|p| p.dense_gemv)).filter(|v| v.is_ours())
    }

    /// Whether a product of `x` (rows `widths` times the matrix's width) by
    /// `w` is one the op takes.
    pub fn fits(x: &Tensor, w: &Tensor, widths: usize) -> bool {
        let (Ok((rows, k)), Ok((n, wk))) = (x.dims2(), w.dims2()) else { return false };
        GemvShape { m: rows, n, k: wk }.suits_dense_kernel()
            && k == widths * wk
            && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && (x.dtype() == DType::F32 || x.dtype() == w.dtype())
    }

    /// The op in `variant`, its product in `out` (f32 or the matrix's type).
    pub fn new(variant: DenseGemvVariant, out: DType) -> Self {
        DenseGemv { variant, out, silu: false }
    }

    /// The fused form: rows `[gate | up]`, multiplied as `silu(gate) * up`
    /// (in the rows' arithmetic, as [`super::silu_op::SiluMul`] computes it).
    pub fn with_silu(variant: DenseGemvVariant, out: DType) -> Self {
        DenseGemv { variant, out, silu: true }
    }

    /// `x @ wᵀ`, `[rows, n]` in the op's output dtype.
    pub fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, self)?)
    }

    /// The shape and spans of `x` `[m, k]` (`[m, 2k]` fused) and `w` `[n, k]`, checked.
    fn shape(&self, lx: &Layout, lw: &Layout) -> candle_core::Result<(GemvShape, [std::ops::Range<usize>; 2])> {
        let widths = if self.silu { 2 } else { 1 };
        match (lx.shape().dims(), lw.shape().dims()) {
            (&[m, xk], &[n, k]) if xk == widths * k => {
                Ok((GemvShape { m, n, k }, [span(lx, OP, "the rows")?, span(lw, OP, "the matrix")?]))
            }
            (x, w) => {
                candle_core::bail!("{OP}: want rows [m, {widths} × k] and a matrix [n, k], got {x:?} and {w:?}")
            }
        }
    }
}

/// `ARQON_CUDA_DENSE_GEMV=cublas|warp_per_row|warp_per_row_x4`, read once
/// (a value that does not parse is logged once and ignored).
fn env_override() -> Option<DenseGemvVariant> {
    static OVERRIDE: std::sync::OnceLock<Option<DenseGemvVariant>> = std::sync::OnceLock::new();
    *OVERRIDE.get_or_init(|| {
        let v = std::env::var("ARQON_CUDA_DENSE_GEMV").ok()?;
        v.parse()
            .map_err(
                |e| tracing::warn!(error = %e, "ARQON_CUDA_DENSE_GEMV is ignored: the kernel plan's dense_gemv serves"),
            )
            .ok()
    })
}

/// Calls `$arm!(X, W, Y)` for the element types of `(x, w, out)`, the
/// combinations the kernels take; anything else is an error.
macro_rules! by_types {
    ($types:expr, $arm:ident) => {
        match $types {
            (DType::F32, DType::F32, DType::F32) => $arm!(f32, f32, f32),
            (DType::BF16, DType::BF16, DType::BF16) => $arm!(bf16, bf16, bf16),
            (DType::BF16, DType::BF16, DType::F32) => $arm!(bf16, bf16, f32),
            (DType::F32, DType::BF16, DType::BF16) => $arm!(f32, bf16, bf16),
            (DType::F32, DType::BF16, DType::F32) => $arm!(f32, bf16, f32),
            (DType::F16, DType::F16, DType::F16) => $arm!(f16, f16, f16),
            (DType::F16, DType::F16, DType::F32) => $arm!(f16, f16, f32),
            (DType::F32, DType::F16, DType::F16) => $arm!(f32, f16, f16),
            (DType::F32, DType::F16, DType::F32) => $arm!(f32, f16, f32),
            (x, w, y) => {
                candle_core::bail!("{OP}: {x:?} rows, a {w:?} matrix and a {y:?} product is not a combination it takes")
            }
        }
    };
}

/// The CPU arm: the kernel's reference, plain or fused.
fn cpu<X: Elem, W: Elem, Y: Elem>(x: &[X], w: &[W], shape: GemvShape, silu: bool) -> candle_core::Result<Vec<Y>> {
    let mut y = vec![Y::from_f32(0.0); shape.m * shape.n];
    let r = if silu { dense_gemv_silu(w, x, shape, &mut y) } else { dense_gemv(w, x, shape, &mut y) };
    r.map_err(candle_core::Error::wrap)?;
    Ok(y)
}

impl CustomOp2 for DenseGemv {
    fn name(&self) -> &'static str {
        "dense-gemv"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, [rx, rw]) = self.shape(lx, lw)?;
        macro_rules! arm {
            ($x:ty, $w:ty, $y:ty) => {{
                let x = &sx.as_slice::<$x>()?[rx];
                let w = &sw.as_slice::<$w>()?[rw];
                <$y as candle_core::WithDType>::to_cpu_storage_owned(cpu::<$x, $w, $y>(x, w, shape, self.silu)?)
            }};
        }
        let out = by_types!((sx.dtype(), sw.dtype(), self.out), arm);
        Ok((out, Shape::from((shape.m, shape.n))))
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
        macro_rules! arm {
            ($x:ty, $w:ty, $y:ty) => {{
                let x = sx.as_cuda_slice::<$x>()?.slice(rx);
                let w = sw.as_cuda_slice::<$w>()?.slice(rw);
                let y = if self.silu {
                    kernels.dense_gemv_silu_new::<$w, $x, $y>(self.variant, shape, w, x)
                } else {
                    kernels.dense_gemv_new::<$w, $x, $y>(self.variant, shape, w, x)
                };
                let y = y.map_err(candle_core::Error::wrap)?;
                candle_core::CudaStorage::wrap_cuda_slice(y, dev)
            }};
        }
        let out = by_types!((sx.dtype(), sw.dtype(), self.out), arm);
        Ok((out, Shape::from((shape.m, shape.n))))
    }
}

/// The residual add and RMSNorm fused in front of the product: from the
/// residual rows `x` and the rows `d` added to them (`[m, k]`, one dtype),
/// `sum = x + d` and `y = rmsnorm(sum) * g @ wᵀ` (the norm as
/// [`super::norm_op::AddRmsNorm`] computes it, its rows rounded to `x`'s
/// dtype), both in `x`'s dtype: one launch for the norm and the product that
/// follows it. The norm's weight `g` (`[k]`, `x`'s dtype) rides in the op.
#[derive(Debug)]
pub(crate) struct DenseGemvNorm {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: DenseGemvVariant,
    eps: f32,
    g: Tensor,
}

const NORM_OP: &str = "dense GEMV with the norm fused in";

impl DenseGemvNorm {
    /// The variant in force (as [`DenseGemv::route`]) for the norm of
    /// residual rows `x` plus `d` with weight `g`, then the product by `w`,
    /// when it is ours and the op takes them: rows [`DenseGemv::route`] takes, `x` and `d` of one
    /// shape and dtype (f32 or `w`'s), `g` `[k]` in it.
    pub fn route(
        plan: Option<KernelPlan>,
        (x, d, g): (&Tensor, &Tensor, &Tensor),
        w: &Tensor,
    ) -> Option<DenseGemvVariant> {
        let takes = DenseGemv::fits(x, w, 1)
            && d.dims() == x.dims()
            && d.dtype() == x.dtype()
            && g.dtype() == x.dtype()
            && g.dims() == [x.dims()[1]];
        DenseGemv::variant(plan, x).filter(|_| takes)
    }

    /// The op in `variant`, with the norm's weight `g` (made contiguous
    /// here, once, for the op to read its span) and epsilon.
    pub fn new(variant: DenseGemvVariant, g: &Tensor, eps: f32) -> Result<Self> {
        Ok(DenseGemvNorm { variant, eps, g: g.contiguous()? })
    }

    /// `(sum, y)`: `[m, k]` and `[m, n]`, views of one packed output.
    pub fn forward(&self, x: &Tensor, d: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let (m, k) = x.dims2()?;
        let n = w.dim(0)?;
        let out = x.contiguous()?.apply_op3_no_bwd(&d.contiguous()?, &w.contiguous()?, self)?;
        Ok((out.narrow(0, 0, m * k)?.reshape((m, k))?, out.narrow(0, m * k, m * n)?.reshape((m, n))?))
    }

    /// The shape and the spans of `x`, `d`, `w` and the weight, checked.
    fn shape(
        &self,
        lx: &Layout,
        ld: &Layout,
        lw: &Layout,
    ) -> candle_core::Result<(GemvShape, [std::ops::Range<usize>; 4])> {
        let lg = self.g.layout();
        match (lx.shape().dims(), ld.shape().dims(), lw.shape().dims(), lg.shape().dims()) {
            (&[m, xk], d, &[n, k], &[gk]) if xk == k && gk == k && d == [m, k] => Ok((
                GemvShape { m, n, k },
                [
                    span(lx, NORM_OP, "the residual rows")?,
                    span(ld, NORM_OP, "the rows added")?,
                    span(lw, NORM_OP, "the matrix")?,
                    span(lg, NORM_OP, "the norm's weight")?,
                ],
            )),
            (x, d, w, g) => candle_core::bail!(
                "{NORM_OP}: want rows [m, k] twice, a matrix [n, k] and a weight [k], got {x:?}, {d:?}, {w:?} and {g:?}"
            ),
        }
    }
}

/// Calls `$arm!(X, W)` for the element types of `(x, w)` the fused-norm
/// kernels take (the product and sums in `X`); anything else is an error.
macro_rules! by_norm_types {
    ($types:expr, $arm:ident) => {
        match $types {
            (DType::F32, DType::F32) => $arm!(f32, f32),
            (DType::BF16, DType::BF16) => $arm!(bf16, bf16),
            (DType::F32, DType::BF16) => $arm!(f32, bf16),
            (DType::F16, DType::F16) => $arm!(f16, f16),
            (DType::F32, DType::F16) => $arm!(f32, f16),
            (x, w) => candle_core::bail!("{NORM_OP}: {x:?} rows and a {w:?} matrix is not a combination it takes"),
        }
    };
}

/// The CPU arm, `[sums, product]`: the norm as [`super::norm_op::AddRmsNorm`]'s
/// CPU arm computes it (candle's CPU RMSNorm, so a CPU step fused here gives
/// the unfused step's numbers bit for bit), then the GEMV's reference. The
/// kernel follows [`dense_gemv_norm`] (the norm as `rms_norm.cu` computes
/// it), against which `kernels/tests/backends.rs` checks it.
fn norm_cpu<X: Elem, W: Elem>(
    w: &[W],
    x: &[X],
    d: &[X],
    g: &[X],
    eps: f32,
    shape: GemvShape,
) -> candle_core::Result<Vec<X>> {
    let mk = shape.m * shape.k;
    let check = shape.check_norm((W::DTYPE, X::DTYPE), w.len(), x.len(), d.len(), g.len(), shape.m * shape.n, mk);
    check.map_err(candle_core::Error::wrap)?;
    let mut out = super::norm_op::add_rms_norm_cpu(d, x, g, eps);
    let mut y = vec![X::from_f32(0.0); shape.m * shape.n];
    dense_gemv(w, &out[mk..], shape, &mut y).map_err(candle_core::Error::wrap)?;
    out.truncate(mk);
    out.extend(y);
    Ok(out)
}

impl CustomOp3 for DenseGemvNorm {
    fn name(&self) -> &'static str {
        "dense-gemv-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (shape, [rx, rd, rw, rg]) = self.shape(lx, ld, lw)?;
        let (sg, _) = self.g.storage_and_layout();
        let candle_core::Storage::Cpu(sg) = &*sg else {
            candle_core::bail!("{NORM_OP}: the norm's weight is not on the CPU")
        };
        let (mk, mn) = (shape.m * shape.k, shape.m * shape.n);
        macro_rules! arm {
            ($x:ty, $w:ty) => {{
                let (x, d) = (&sx.as_slice::<$x>()?[rx.clone()], &sd.as_slice::<$x>()?[rd.clone()]);
                let (w, g) = (&sw.as_slice::<$w>()?[rw.clone()], &sg.as_slice::<$x>()?[rg.clone()]);
                <$x as candle_core::WithDType>::to_cpu_storage_owned(norm_cpu(w, x, d, g, self.eps, shape)?)
            }};
        }
        let out = by_norm_types!((sx.dtype(), sw.dtype()), arm);
        Ok((out, Shape::from(mk + mn)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (shape, [rx, rd, rw, rg]) = self.shape(lx, ld, lw)?;
        let (sg, _) = self.g.storage_and_layout();
        let candle_core::Storage::Cuda(sg) = &*sg else {
            candle_core::bail!("{NORM_OP}: the norm's weight is not on the device")
        };
        let dev = sx.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        macro_rules! arm {
            ($x:ty, $w:ty) => {{
                let (x, d) = (sx.as_cuda_slice::<$x>()?.slice(rx.clone()), sd.as_cuda_slice::<$x>()?.slice(rd.clone()));
                let (w, g) = (sw.as_cuda_slice::<$w>()?.slice(rw.clone()), sg.as_cuda_slice::<$x>()?.slice(rg.clone()));
                let out = kernels.dense_gemv_norm_new::<$w, $x>(self.variant, shape, (w, x, d, g), self.eps);
                candle_core::CudaStorage::wrap_cuda_slice(out.map_err(candle_core::Error::wrap)?, dev)
            }};
        }
        let out = by_norm_types!((sx.dtype(), sw.dtype()), arm);
        Ok((out, Shape::from(shape.m * (shape.k + shape.n))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The op against candle's matmul, for every combination it takes, on
    /// rows and a matrix that start inside their storage: equal within the
    /// output type's rounding (candle rounds the rows to the matrix's type
    /// first; the op reads them as they are).
    #[test]
    fn dense_gemv_equals_candle_s_matmul() {
        let dev = Device::Cpu;
        let mut rng = arqon_kernels::reference::rng::TestRng::new(9);
        let (m, n, k) = (3, 37, 100);
        let rows = Tensor::from_vec(rng.vec(m * k + 5, -1.0, 1.0), m * k + 5, &dev).unwrap();
        let x = rows.narrow(0, 5, m * k).unwrap().reshape((m, k)).unwrap();
        let mat = Tensor::from_vec(rng.vec(n * k + 7, -1.0, 1.0), n * k + 7, &dev).unwrap();
        let w = mat.narrow(0, 7, n * k).unwrap().reshape((n, k)).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for wt in [DType::F32, DType::BF16, DType::F16] {
            let w = w.to_dtype(wt).unwrap();
            for xt in [DType::F32, wt] {
                for yt in [DType::F32, wt] {
                    let x = x.to_dtype(xt).unwrap();
                    assert!(DenseGemv::fits(&x, &w, 1));
                    let got = DenseGemv::new(DenseGemvVariant::WarpPerRow, yt).forward(&x, &w).unwrap();
                    assert_eq!((got.dims(), got.dtype()), (&[m, n][..], yt));
                    let want = x.to_dtype(wt).unwrap().matmul(&w.t().unwrap()).unwrap();
                    // The rows rounded to a half type first (candle) or not (the op): a few of its ulps.
                    let tol = if wt == DType::F32 { 1e-5 } else { 0.05 };
                    for (i, (g, w)) in f(&got).iter().zip(f(&want)).enumerate() {
                        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{xt:?}·{wt:?}→{yt:?} [{i}]: {g} vs {w}");
                    }
                }
            }
        }
        // What the op does not take: 33 rows, f16 rows into a bf16 matrix, mismatched widths.
        let w = w.to_dtype(DType::BF16).unwrap();
        let tall = Tensor::zeros((33, k), DType::F32, &dev).unwrap();
        assert!(DenseGemv::fits(&tall.narrow(0, 0, 32).unwrap(), &w, 1));
        assert!(!DenseGemv::fits(&tall, &w, 1));
        assert!(!DenseGemv::fits(&x.to_dtype(DType::F16).unwrap(), &w, 1));
        assert!(!DenseGemv::fits(&x.narrow(1, 0, k - 1).unwrap(), &w, 1));
        let err = DenseGemv::new(DenseGemvVariant::WarpPerRow, DType::F16).forward(&x, &w).unwrap_err();
        assert!(err.to_string().contains("not a combination"), "{err}");
        assert!(DenseGemv::new(DenseGemvVariant::WarpPerRow, DType::F32).forward(&tall, &w).is_err());
    }

    /// The fused form equals the SiLU-and-multiply op, then the plain one,
    /// bit for bit (f32 and bf16 rows, f32 and bf16 products).
    #[test]
    fn the_fused_activation_is_silu_mul_then_the_gemv() {
        let dev = Device::Cpu;
        let mut rng = arqon_kernels::reference::rng::TestRng::new(10);
        let (m, n, k) = (4, 23, 40);
        let gu = Tensor::from_vec(rng.vec(m * 2 * k, -6.0, 6.0), (m, 2 * k), &dev).unwrap();
        let w = Tensor::from_vec(rng.vec(n * k, -1.0, 1.0), (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for xt in [DType::F32, DType::BF16] {
            let gu = gu.to_dtype(xt).unwrap();
            assert!(DenseGemv::fits(&gu, &w, 2) && !DenseGemv::fits(&gu, &w, 1));
            let act = super::super::silu_op::SiluMul::new(k).forward(&gu).unwrap();
            for yt in [DType::F32, DType::BF16] {
                let v = DenseGemvVariant::WarpPerRow;
                let fused = DenseGemv::with_silu(v, yt).forward(&gu, &w).unwrap();
                let plain = DenseGemv::new(v, yt).forward(&act, &w).unwrap();
                assert_eq!((fused.dims(), fused.dtype()), (&[m, n][..], yt));
                assert_eq!(f(&fused), f(&plain), "{xt:?} → {yt:?}");
            }
        }
        assert!(DenseGemv::with_silu(DenseGemvVariant::WarpPerRow, DType::F32)
            .forward(&gu.narrow(1, 0, k).unwrap(), &w)
            .is_err());
    }

    /// The fused norm equals the add + RMSNorm op, then the plain GEMV, bit
    /// for bit, sums included (f32 and bf16 rows into a bf16 matrix; rows
    /// that start inside their storage).
    #[test]
    fn the_fused_norm_is_add_rms_norm_then_the_gemv() {
        let dev = Device::Cpu;
        let mut rng = arqon_kernels::reference::rng::TestRng::new(11);
        let (m, n, k) = (3, 29, 64);
        let xs = Tensor::from_vec(rng.vec(m * k + 3, -2.0, 2.0), m * k + 3, &dev).unwrap();
        let x = xs.narrow(0, 3, m * k).unwrap().reshape((m, k)).unwrap();
        let d = Tensor::from_vec(rng.vec(m * k, -2.0, 2.0), (m, k), &dev).unwrap();
        let g = Tensor::from_vec(rng.vec(k, 0.5, 1.5), k, &dev).unwrap();
        let w = Tensor::from_vec(rng.vec(n * k, -1.0, 1.0), (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = DenseGemvVariant::WarpPerRow;
        let plan = KernelPlan { dense_gemv: v, ..KernelPlan::default() };
        for xt in [DType::F32, DType::BF16] {
            let (x, d, g) = (x.to_dtype(xt).unwrap(), d.to_dtype(xt).unwrap(), g.to_dtype(xt).unwrap());
            assert_eq!(DenseGemvNorm::route(Some(plan), (&x, &d, &g), &w), Some(v));
            let (sum, y) = DenseGemvNorm::new(v, &g, 1e-5).unwrap().forward(&x, &d, &w).unwrap();
            let (want_sum, normed) = super::super::norm_op::AddRmsNorm::new(1e-5).forward(&d, &x, &g).unwrap();
            let want = DenseGemv::new(v, xt).forward(&normed, &w).unwrap();
            assert_eq!((sum.dims(), y.dims(), y.dtype()), (&[m, k][..], &[m, n][..], xt));
            assert_eq!(f(&sum), f(&want_sum), "{xt:?}: the sums");
            assert_eq!(f(&y), f(&want), "{xt:?}: the product");
        }
        // Not taken: the default plan (cuBLAS), a weight of the wrong length, rows of two dtypes.
        assert_eq!(DenseGemvNorm::route(Some(KernelPlan::default()), (&x, &d, &g), &w), None);
        assert_eq!(DenseGemvNorm::route(Some(plan), (&x, &d, &g.narrow(0, 0, k - 1).unwrap()), &w), None);
        let xb = x.to_dtype(DType::BF16).unwrap();
        assert_eq!(DenseGemvNorm::route(Some(plan), (&xb, &d, &g), &w), None);
        let err =
            DenseGemvNorm::new(v, &g.narrow(0, 0, k - 1).unwrap(), 1e-5).unwrap().forward(&x, &d, &w).unwrap_err();
        assert!(err.to_string().contains("a weight [k]"), "{err}");
    }
}
