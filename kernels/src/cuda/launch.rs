//! Typed, checked launches of our CUDA kernels on cudarc device slices.
//!
//! [`CudaKernels`] loads every module once (the image [`select_image`] picks
//! for the device) and launches on one stream. Each launch function checks
//! every buffer length against the shape with the same `check_lens` the CPU
//! reference uses, picks the entry point from the typed variant and element
//! type, and enqueues asynchronously: results are ready after the stream
//! synchronises (cudarc's copies to the host do that). What a launch cannot
//! check without reading device memory (block-table entries, positions,
//! slots) the kernels clamp or skip, so a bad value gives a wrong result,
//! never an out-of-bounds access; see each `.cu` header.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule as LoadedModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::{select_image, CudaModule, Image};
use crate::launches::{
    self, ArgmaxLaunch, DenseLaunch, Launch, PagedLaunch, PagedParams, RopeKvParams, TopKLens, TopKParams,
};
use crate::plan::{
    ArgmaxVariant, DenseGemvVariant, PagedAttentionVariant, QuantGemvVariant, RmsNormVariant, RopeKvVariant,
    SiluMulVariant, TopKVariant,
};
use crate::reference::fused::{RopeKvLens, RopeKvShape};
use crate::reference::ggml::{GemvShape, QuantFormat};
use crate::reference::paged::{PagedAttentionLens, PagedAttentionShape};
use crate::{DType, Elem, KernelError, KernelId};

/// Element types that can live in device memory.
pub trait DeviceElem: Elem + DeviceRepr + ValidAsZeroBits {}
impl<T: Elem + DeviceRepr + ValidAsZeroBits> DeviceElem for T {}

/// A GEMV shape whose output length overflows.
fn gemv_shape_err(kernel: KernelId, shape: GemvShape) -> KernelError {
    KernelError::Shape { kernel, message: format!("{shape:?}") }
}

pub(super) fn cu(e: DriverError) -> KernelError {
    KernelError::Cuda(format!("{e:?}"))
}

fn cfg(l: &Launch) -> LaunchConfig {
    LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: 0 }
}

/// The loaded modules of one device, and the stream launches go to.
#[derive(Debug)]
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    cc: (u32, u32),
    modules: Vec<(CudaModule, Arc<LoadedModule>)>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// A cuBLAS handle on `stream`, made on the first [`DenseGemvVariant::Cublas`] launch.
    blas: OnceLock<Result<CudaBlas, String>>,
}

impl CudaKernels {
    /// Creates a context on device `ordinal` and loads the kernels on its
    /// default stream. Without a usable driver or device this is an error.
    /// That stream is the legacy one, which CUDA refuses to capture: for
    /// [`StepGraph`](super::graph::StepGraph), use [`CudaKernels::on_stream`]
    /// with a stream of its own or the thread's (`per_thread_stream`).
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        let ctx = CudaContext::new(ordinal).map_err(cu)?;
        Self::on_stream(ctx.default_stream())
    }

    /// Loads the kernels into `stream`'s context and launches on `stream`
    /// (e.g. the stream candle's CUDA device uses).
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let ctx = stream.context().clone();
        let (major, minor) = ctx.compute_capability().map_err(cu)?;
        let cc = (major.max(0) as u32, minor.max(0) as u32);
        let mut modules = Vec::new();
        for m in CudaModule::ALL {
            let image = match select_image(m, cc)? {
                Image::Cubin { bytes, .. } => Ptx::from_binary(bytes.to_vec()),
                Image::Ptx(src) => Ptx::from_src(src),
            };
            modules.push((m, ctx.load_module(image).map_err(cu)?));
        }
        Ok(CudaKernels { stream, cc, modules, functions: Mutex::new(HashMap::new()), blas: OnceLock::new() })
    }

    /// The stream launches are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's compute capability.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// The entry point `name` of `module`, looked up once and cached (the
    /// name is built from typed variants, never taken from outside).
    fn function(&self, launch: &Launch) -> Result<CudaFunction, KernelError> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&launch.entry) {
            return Ok(f.clone());
        }
        let m = self.modules.iter().find(|(id, _)| *id == launch.module).map(|(_, m)| m);
        let f = m.expect("every module is loaded").load_function(&launch.entry).map_err(cu)?;
        cache.insert(launch.entry.clone(), f.clone());
        Ok(f)
    }

    /// Fused residual add + RMSNorm (`cuda/rms_norm.cu`; reference
    /// [`fused_add_rms_norm`](crate::reference::fused::fused_add_rms_norm)).
    pub fn rms_norm<T: DeviceElem>(
        &self,
        variant: RmsNormVariant,
        b: RmsNormBuffers<'_, T>,
        eps: f32,
    ) -> Result<(), KernelError> {
        let lens = (b.x.len(), b.residual.len(), b.weight.len(), b.out.len());
        let Some((launch, rows_i, dim_i)) = launches::rms_norm(variant, T::DTYPE, lens, 1)? else { return Ok(()) };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(b.x).arg(b.residual).arg(b.weight).arg(b.out).arg(&rows_i).arg(&dim_i).arg(&eps);
        // SAFETY: the arguments match `rms_norm_residual_*(const T* x, T* res, const T* w, T* out, int rows,
        // int dim, float eps)` for this T; the lengths were checked (x, residual, out hold rows * dim, w dim),
        // so every index the kernel forms is in bounds, and the &mut borrows keep the outputs unaliased.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// The packed form of [`CudaKernels::rms_norm`]: the residual rows are
    /// read, not updated, and `out` (`[2, rows, dim]`) takes the sums
    /// `x + residual` and then the normalised rows. One fresh output, as a
    /// tensor library's op returns (`arqon-runtime`'s fused norm op).
    pub fn add_rms_norm_packed<T: DeviceElem>(
        &self,
        variant: RmsNormVariant,
        b: PackedRmsNormBuffers<'_, T>,
        eps: f32,
    ) -> Result<(), KernelError> {
        let lens = (b.x.len(), b.residual.len(), b.weight.len(), b.out.len());
        let Some((launch, rows_i, dim_i)) = launches::rms_norm(variant, T::DTYPE, lens, 2)? else { return Ok(()) };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&b.x).arg(&b.residual).arg(&b.weight).arg(b.out).arg(&rows_i).arg(&dim_i).arg(&eps);
        // SAFETY: the arguments match `add_rms_norm_packed_*(const T* x, const T* res, const T* w, T* out,
        // int rows, int dim, float eps)` for this T; x and residual hold rows * dim, w dim and out 2 * rows * dim
        // (checked above), so every index the kernel forms is in bounds; `out` is a &mut borrow, unaliased.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// [`CudaKernels::add_rms_norm_packed`] into a fresh output, not zeroed
    /// first: the kernel writes every element of it.
    pub fn add_rms_norm_packed_new<T: DeviceElem>(
        &self,
        variant: RmsNormVariant,
        (x, residual, weight): (CudaView<'_, T>, CudaView<'_, T>, CudaView<'_, T>),
        eps: f32,
    ) -> Result<CudaSlice<T>, KernelError> {
        // SAFETY: uninitialised device memory, read by no one before the launch below writes all 2 * rows * dim
        // elements (each row's sums and normalised entries); on an error it is dropped unread.
        let mut out =
            unsafe { self.stream.alloc::<T>(launches::fresh_len(KernelId::RmsNorm, 2 * x.len())?) }.map_err(cu)?;
        self.add_rms_norm_packed(variant, PackedRmsNormBuffers { x, residual, weight, out: &mut out }, eps)?;
        Ok(out)
    }

    /// The MLP's activation from the stacked gate/up product
    /// (`cuda/silu_mul.cu`; reference [`silu_mul`](crate::reference::fused::silu_mul)):
    /// `out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]`.
    pub fn silu_mul<T: DeviceElem>(
        &self,
        variant: SiluMulVariant,
        gate_up: CudaView<'_, T>,
        inter: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let Some((launch, rows_i, inter_i)) = launches::silu_mul(variant, T::DTYPE, gate_up.len(), inter, out.len())?
        else {
            return Ok(());
        };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&gate_up).arg(out).arg(&rows_i).arg(&inter_i);
        // SAFETY: the arguments match `silu_mul_*(const T* gate_up, T* out, long long rows, int inter)` for this
        // T; gate_up holds rows * 2 * inter and out rows * inter (checked above), the kernels index below those
        // bounds, and `out` is a &mut borrow, unaliased.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// [`CudaKernels::silu_mul`] into a fresh `[rows, inter]` output, not
    /// zeroed first: every variant writes each element.
    pub fn silu_mul_new<T: DeviceElem>(
        &self,
        variant: SiluMulVariant,
        gate_up: CudaView<'_, T>,
        inter: usize,
    ) -> Result<CudaSlice<T>, KernelError> {
        // SAFETY: uninitialised device memory, read by no one before the launch below writes all of it;
        // on an error it is dropped unread.
        let mut out = unsafe { self.stream.alloc::<T>(launches::fresh_len(KernelId::SiluMul, gate_up.len() / 2)?) }
            .map_err(cu)?;
        self.silu_mul(variant, gate_up, inter, &mut out)?;
        Ok(out)
    }

    /// RoPE on q and k fused with the paged KV-cache write (`cuda/rope_kv.cu`;
    /// reference [`rope_kv_write`](crate::reference::fused::rope_kv_write)).
    pub fn rope_kv_write<T: DeviceElem>(
        &self,
        variant: RopeKvVariant,
        shape: &RopeKvShape,
        mut b: RopeKvBuffers<'_, T>,
    ) -> Result<(), KernelError> {
        let lens = RopeKvLens {
            src: b.src.len(),
            q_out: b.q_out.len(),
            cos_sin: b.cos_sin.len(),
            positions: b.positions.len(),
            slots: b.slots.len(),
            k_cache: b.k_cache.len(),
            v_cache: b.v_cache.len(),
        };
        let Some((launch, p)) = launches::rope_kv(variant, T::DTYPE, shape, &lens)? else { return Ok(()) };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&b.src).arg(&mut b.q_out).arg(&b.cos_sin).arg(&b.positions).arg(&b.slots);
        l.arg(&mut b.k_cache).arg(&mut b.v_cache).arg(&p);
        // SAFETY: the arguments match `rope_kv_write_*(const T* src, T* q_out, const float* cs, const int*
        // positions, const int* slots, T* kc, T* vc, RopeKvParams p)`, `RopeKvParams` being the same eight ints;
        // check_lens verified every buffer against the shape, and the kernel bounds-checks the device-side
        // positions and slots before indexing, so all accesses are in bounds; the three outputs are distinct
        // mutable views (disjoint by the borrow rules), none of them aliasing an input.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// Decode attention over the paged KV cache (`cuda/paged_attention.cu`;
    /// reference [`paged_decode_attention`](crate::reference::paged::paged_decode_attention)).
    /// The split-K variant allocates its f32 scratch on the stream per call.
    pub fn paged_attention<T: DeviceElem>(
        &self,
        variant: PagedAttentionVariant,
        shape: &PagedAttentionShape,
        b: PagedAttentionBuffers<'_, T>,
        scale: f32,
    ) -> Result<(), KernelError> {
        let lens = PagedAttentionLens {
            q: b.q.len(),
            k_cache: b.k_cache.len(),
            v_cache: b.v_cache.len(),
            block_tables: b.block_tables.len(),
            context_lens: b.context_lens.len(),
            out: b.out.len(),
        };
        let Some((launch, p)) = launches::paged_attention(variant, T::DTYPE, shape, &lens, scale)? else {
            return Ok(());
        };
        match launch {
            PagedLaunch::Plain(launch) => {
                let f = self.function(&launch)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(&b.q).arg(&b.k_cache).arg(&b.v_cache).arg(b.block_tables).arg(b.context_lens).arg(b.out).arg(&p);
                // SAFETY: arguments match `paged_attention_decode_*(const T* q, const T* kc, const T* vc, const
                // int* tables, const int* lens, T* out, PagedParams p)` (same field order, repr(C)); buffer
                // lengths were checked against the shape, the kernel clamps context lengths to the table width
                // and skips block ids outside the pool, so every access is in bounds; `out` is a &mut borrow.
                unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
            }
            PagedLaunch::Split { split, reduce, slots } => {
                // SAFETY: uninitialised scratch, no memset: `split` writes every (seq, head, partition)
                // slot of both (an empty partition its neutral element) before `reduce` reads any.
                let mut ml = unsafe { self.stream.alloc::<f32>(2 * slots) }.map_err(cu)?;
                let mut acc = unsafe { self.stream.alloc::<f32>(slots * shape.cache.head_dim) }.map_err(cu)?;
                let f = self.function(&split)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(&b.q).arg(&b.k_cache).arg(&b.v_cache).arg(b.block_tables).arg(b.context_lens);
                l.arg(&mut ml).arg(&mut acc).arg(&p);
                // SAFETY: as for `decode`, plus the scratch: `ml` holds 2 and `acc` head_dim floats for each
                // (seq, head, partition) of the grid, exactly the slots `split` writes.
                unsafe { l.launch(cfg(&split)) }.map_err(cu)?;
                let f = self.function(&reduce)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(&ml).arg(&acc).arg(b.out).arg(&p);
                // SAFETY: `reduce(const float* ml, const float* acc, T* out, PagedParams p)` reads the slots the
                // split launch before it on this stream wrote (stream order) and writes `out`, length-checked.
                unsafe { l.launch(cfg(&reduce)) }.map_err(cu)?;
            }
        }
        Ok(())
    }

    /// [`CudaKernels::paged_attention`] into a fresh `[num_seqs, q_heads *
    /// head_dim]` output, not zeroed first: every variant writes all
    /// head_dim elements of every (sequence, head), whatever its length.
    pub fn paged_attention_new<T: DeviceElem>(
        &self,
        variant: PagedAttentionVariant,
        shape: &PagedAttentionShape,
        (q, k_cache, v_cache, block_tables, context_lens): PagedAttentionReads<'_, T>,
        scale: f32,
    ) -> Result<CudaSlice<T>, KernelError> {
        let n = shape.num_seqs * shape.q_heads * shape.cache.head_dim;
        // SAFETY: uninitialised device memory, read by no one before the launch below writes every element
        // (see above); on an error it is dropped unread.
        let mut out =
            unsafe { self.stream.alloc::<T>(launches::fresh_len(KernelId::PagedAttention, n)?) }.map_err(cu)?;
        let b = PagedAttentionBuffers { q, k_cache, v_cache, block_tables, context_lens, out: &mut out };
        self.paged_attention(variant, shape, b, scale)?;
        Ok(out)
    }

    /// Weight-only quantized GEMV for 1-8 rows (`cuda/quant_gemv.cu`;
    /// reference [`quant_gemv`](crate::reference::ggml::quant_gemv)).
    pub fn quant_gemv<T: DeviceElem>(
        &self,
        variant: QuantGemvVariant,
        format: QuantFormat,
        shape: GemvShape,
        b: GemvBuffers<'_, T>,
    ) -> Result<(), KernelError> {
        let lens = (b.w.len(), b.x.len(), b.y.len());
        let Some((launch, [m, n, kk])) = launches::quant_gemv(variant, format, T::DTYPE, shape, lens)? else {
            return Ok(());
        };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&b.w).arg(&b.x).arg(b.y).arg(&m).arg(&n).arg(&kk);
        // SAFETY: arguments match `quant_gemv_*(const uint8_t* w, const T* x, T* y, int m, int n, int k)` for
        // this format and T; `check` verified w = n * k/32 blocks of this format, x = m * k, y = m * n with
        // m <= 8 and k % 32 == 0, the bounds the kernel indexes within; `y` is a &mut borrow.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// [`CudaKernels::quant_gemv`] into a fresh `[m, n]` output, not zeroed
    /// first: the kernel writes each element.
    pub fn quant_gemv_new<T: DeviceElem>(
        &self,
        variant: QuantGemvVariant,
        format: QuantFormat,
        shape: GemvShape,
        w: CudaView<'_, u8>,
        x: CudaView<'_, T>,
    ) -> Result<CudaSlice<T>, KernelError> {
        let len = shape.m.checked_mul(shape.n).ok_or_else(|| gemv_shape_err(KernelId::QuantGemv, shape))?;
        // SAFETY: uninitialised device memory, read by no one before the launch below (which checks every
        // length first) writes all of it; on an error it is dropped unread.
        let mut y = unsafe { self.stream.alloc::<T>(launches::fresh_len(KernelId::QuantGemv, len)?) }.map_err(cu)?;
        self.quant_gemv(variant, format, shape, GemvBuffers { w, x, y: &mut y })?;
        Ok(y)
    }

    /// Dense GEMV for 1-32 rows, `y[m, n] = x[m, k] · w[n, k]ᵀ`
    /// (`cuda/dense_gemv.cu`; reference
    /// [`dense_gemv`](crate::reference::dense::dense_gemv)): `x` and `y` each
    /// in f32 or `w`'s type. [`DenseGemvVariant::Cublas`] is cuBLAS's
    /// `gemmEx` (f32 compute, as candle calls it), which takes `x` in `w`'s
    /// type only.
    pub fn dense_gemv<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        b: DenseGemvBuffers<'_, W, X, Y>,
    ) -> Result<(), KernelError> {
        self.dense_launch(variant, shape, b, false)
    }

    /// [`CudaKernels::dense_gemv`] with the MLP's activation fused in front
    /// (reference [`dense_gemv_silu`](crate::reference::dense::dense_gemv_silu)):
    /// `b.x` is the stacked gate/up product `[m, 2k]`, and the rows multiplied
    /// are `silu(gate) * up` in `X`'s arithmetic, as `silu_mul` computes them.
    /// Our variants only: cuBLAS has no such form.
    pub fn dense_gemv_silu<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        b: DenseGemvBuffers<'_, W, X, Y>,
    ) -> Result<(), KernelError> {
        self.dense_launch(variant, shape, b, true)
    }

    fn dense_launch<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        b: DenseGemvBuffers<'_, W, X, Y>,
        silu: bool,
    ) -> Result<(), KernelError> {
        let types = (W::DTYPE, X::DTYPE, Y::DTYPE);
        let Some((launch, dims)) =
            launches::dense_gemv(variant, silu, types, shape, (b.w.len(), b.x.len(), b.y.len()))?
        else {
            return Ok(());
        };
        let launch = match launch {
            DenseLaunch::Cublas => return self.cublas_gemv::<W, X, Y>(dims, b),
            DenseLaunch::Kernel(launch) => launch,
        };
        let [m, n, kk] = dims;
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&b.w).arg(&b.x).arg(&mut *b.y).arg(&m).arg(&n).arg(&kk);
        // SAFETY: the arguments match `dense_gemv[_silu]_*_{w}_{x}_{y}(const W* w, const X* x, Y* y, int m, int
        // n, int k)` for these types (`check_dense` admitted the combination, so the entry exists); w holds n * k,
        // x m * k (m * 2k with the activation) and y m * n elements with m <= 32 (checked), the bounds the kernel
        // indexes within (it reads 16 bytes at a time only at 16-byte aligned addresses inside those rows); `y`
        // is a &mut borrow.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// [`CudaKernels::dense_gemv`] into a fresh `[m, n]` output, not zeroed
    /// first: every variant writes each element.
    pub fn dense_gemv_new<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        w: CudaView<'_, W>,
        x: CudaView<'_, X>,
    ) -> Result<CudaSlice<Y>, KernelError> {
        self.dense_new(variant, shape, w, x, false)
    }

    /// [`CudaKernels::dense_gemv_silu`] into a fresh `[m, n]` output.
    pub fn dense_gemv_silu_new<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        w: CudaView<'_, W>,
        gate_up: CudaView<'_, X>,
    ) -> Result<CudaSlice<Y>, KernelError> {
        self.dense_new(variant, shape, w, gate_up, true)
    }

    fn dense_new<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        w: CudaView<'_, W>,
        x: CudaView<'_, X>,
        silu: bool,
    ) -> Result<CudaSlice<Y>, KernelError> {
        let len = shape.m.checked_mul(shape.n).ok_or_else(|| gemv_shape_err(KernelId::DenseGemv, shape))?;
        // SAFETY: uninitialised device memory, read by no one before the launch below (which checks every
        // length first) writes all of it; on an error it is dropped unread.
        let mut y = unsafe { self.stream.alloc::<Y>(launches::fresh_len(KernelId::DenseGemv, len)?) }.map_err(cu)?;
        self.dense_launch(variant, shape, DenseGemvBuffers { w, x, y: &mut y }, silu)?;
        Ok(y)
    }

    /// Dense GEMV with the residual add and RMSNorm fused in front
    /// (`cuda/dense_gemv.cu`'s `dense_gemv_norm_*`; reference
    /// [`dense_gemv_norm`](crate::reference::dense::dense_gemv_norm)): `b.sum`
    /// takes `x + d`, and `b.y` the product of its rows normed with weight
    /// `g`, both in `X`. Our variants only.
    pub fn dense_gemv_norm<W: DeviceElem, X: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        mut b: DenseGemvNormBuffers<'_, W, X>,
        eps: f32,
    ) -> Result<(), KernelError> {
        let lens = (b.w.len(), b.x.len(), b.d.len(), b.g.len(), b.y.len(), b.sum.len());
        let Some((launch, [m, n, kk])) = launches::dense_gemv_norm(variant, (W::DTYPE, X::DTYPE), shape, lens)? else {
            return Ok(());
        };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&b.w).arg(&b.x).arg(&b.d).arg(&b.g).arg(&mut b.y).arg(&mut b.sum);
        l.arg(&m).arg(&n).arg(&kk).arg(&eps);
        // SAFETY: the arguments match `dense_gemv_norm_*_{w}_{x}_{x}(const W* w, const X* x, const X* d, const X*
        // g, X* y, X* sum, int m, int n, int k, float eps)` for these types (`check_norm` admitted them, so the
        // entry exists); w holds n * k, x, d and sum m * k, g k and y m * n elements with m <= 32 (checked), the
        // bounds the kernel indexes within (16-byte reads only at 16-byte aligned addresses inside them); `y`
        // and `sum` are distinct mutable views, aliasing no input.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// [`CudaKernels::dense_gemv_norm`] into one fresh output, not zeroed
    /// first: `[m * k]` sums, then the `[m * n]` product (the kernel writes
    /// every element of both).
    pub fn dense_gemv_norm_new<W: DeviceElem, X: DeviceElem>(
        &self,
        variant: DenseGemvVariant,
        shape: GemvShape,
        (w, x, d, g): (CudaView<'_, W>, CudaView<'_, X>, CudaView<'_, X>, CudaView<'_, X>),
        eps: f32,
    ) -> Result<CudaSlice<X>, KernelError> {
        let (mk, mn) = (x.len(), shape.m.saturating_mul(shape.n));
        // SAFETY: uninitialised device memory, read by no one before the launch below (which checks every length
        // first) writes all of it: the m * k sums and the m * n products; on an error it is dropped unread.
        let mut out =
            unsafe { self.stream.alloc::<X>(launches::fresh_len(KernelId::DenseGemv, mk + mn)?) }.map_err(cu)?;
        let (sum, y) = out.split_at_mut(mk);
        self.dense_gemv_norm(variant, shape, DenseGemvNormBuffers { w, x, d, g, y, sum }, eps)?;
        Ok(out)
    }

    /// `y = x` converted element by element between f32 and bf16 or f16
    /// (rounded to nearest even): the conversion candle launches around
    /// cuBLAS when a product's rows or output are not in the matrix's type,
    /// so `arqon bench kernels` can time cuBLAS as serving runs it.
    pub fn convert<A: DeviceElem, B: DeviceElem>(
        &self,
        x: CudaView<'_, A>,
        y: &mut CudaSlice<B>,
    ) -> Result<(), KernelError> {
        let Some((launch, n)) = launches::convert(A::DTYPE, B::DTYPE, x.len(), y.len())? else { return Ok(()) };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&x).arg(&mut *y).arg(&n);
        // SAFETY: the arguments match `convert_{a}_{b}(const A* x, B* y, long long n)`, an entry that exists for
        // every f32 / half pair (checked above); x and y hold n elements each, and thread i touches element i < n
        // only; `y` is a &mut borrow.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }

    /// The cuBLAS arm of [`CudaKernels::dense_gemv`] (shape and lengths checked, `n > 0`).
    fn cublas_gemv<W: DeviceElem, X: DeviceElem, Y: DeviceElem>(
        &self,
        [m, n, k]: [i32; 3],
        b: DenseGemvBuffers<'_, W, X, Y>,
    ) -> Result<(), KernelError> {
        let handle = match self.blas.get_or_init(|| CudaBlas::new(self.stream.clone()).map_err(|e| format!("{e:?}"))) {
            Ok(h) => *h.handle(),
            Err(e) => return Err(KernelError::Cuda(format!("cuBLAS: {e}"))),
        };
        let ty = |d: DType| match d {
            DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            DType::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w, _w) = b.w.device_ptr(&self.stream);
        let (x, _x) = b.x.device_ptr(&self.stream);
        let (y, _y) = b.y.device_ptr_mut(&self.stream);
        // Column-major, as cuBLAS sees them: w is k × n (ld k), x is k × m (ld k), y is n × m (ld n); y = wᵀ x.
        // SAFETY: the handle is bound to `self.stream`, the stream the pointers are recorded on; w holds n * k, x
        // m * k and y m * n elements of the types named (checked by the caller), exactly what the dimensions
        // and leading dimensions address; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires, and outlive
        // the call (cuBLAS reads host scalars before it returns); `y` is a &mut borrow.
        unsafe {
            blas::gemm_ex(
                handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                w as *const _,
                ty(W::DTYPE),
                k,
                x as *const _,
                ty(X::DTYPE),
                k,
                (&beta as *const f32).cast(),
                y as *mut _,
                ty(Y::DTYPE),
                n,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Cuda(format!("cuBLAS gemmEx: {e:?}")))
    }

    /// Greedy argmax per row (`cuda/sampling.cu`; reference
    /// [`argmax`](crate::reference::sampling::argmax)).
    pub fn argmax<T: DeviceElem>(
        &self,
        variant: ArgmaxVariant,
        logits: &CudaSlice<T>,
        vocab: usize,
        tokens: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        let Some((launch, rows_i, vocab_i)) = launches::argmax(variant, T::DTYPE, logits.len(), vocab, tokens.len())?
        else {
            return Ok(());
        };
        match launch {
            ArgmaxLaunch::Block(launch) => {
                let f = self.function(&launch)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(logits).arg(&mut *tokens).arg(&rows_i).arg(&vocab_i);
                // SAFETY: arguments match `argmax_block_*(const T* logits, int* token, int rows, int vocab)`;
                // logits hold rows * vocab and tokens rows, checked above.
                unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
            }
            ArgmaxLaunch::Split { split, reduce, chunks } => {
                let parts = tokens.len() * chunks as usize;
                let mut part_v = self.stream.alloc_zeros::<f32>(parts).map_err(cu)?;
                let mut part_i = self.stream.alloc_zeros::<i32>(parts).map_err(cu)?;
                let f = self.function(&split)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(logits).arg(&mut part_v).arg(&mut part_i).arg(&rows_i).arg(&vocab_i);
                // SAFETY: `argmax_split_*(const T* logits, float* part_v, int* part_i, int rows, int vocab)` with a
                // (chunks, rows) grid writes part_*[row * chunks + chunk], within the rows * chunks allocated.
                unsafe { l.launch(cfg(&split)) }.map_err(cu)?;
                let f = self.function(&reduce)?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(&part_v).arg(&part_i).arg(&mut *tokens).arg(&rows_i).arg(&chunks);
                // SAFETY: `argmax_split_reduce(const float*, const int*, int* token, int rows, int chunks)` reads
                // what the launch before it on this stream wrote and writes tokens[0..rows].
                unsafe { l.launch(cfg(&reduce)) }.map_err(cu)?;
            }
        }
        Ok(())
    }

    /// Top-k/top-p filtering and the draw, per row (`cuda/sampling.cu`;
    /// reference [`top_k_top_p`](crate::reference::sampling::top_k_top_p)).
    pub fn top_k_top_p<T: DeviceElem>(
        &self,
        variant: TopKVariant,
        logits: &CudaSlice<T>,
        vocab: usize,
        params: SamplingParams<'_>,
        out: SamplingOutputs<'_>,
    ) -> Result<(), KernelError> {
        let lens = TopKLens {
            logits: logits.len(),
            top_k: params.top_k.len(),
            top_p: params.top_p.len(),
            inv_temp: params.inv_temp.len(),
            uniform: params.uniform.len(),
            ids: out.ids.len(),
            probs: out.probs.len(),
            count: out.count.len(),
            token: out.token.len(),
        };
        let Some((launch, p)) = launches::top_k_top_p(variant, T::DTYPE, vocab, &lens)? else { return Ok(()) };
        let f = self.function(&launch)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(logits).arg(params.top_k).arg(params.top_p).arg(params.inv_temp).arg(params.uniform);
        l.arg(out.ids).arg(out.probs).arg(out.count).arg(out.token).arg(&p);
        // SAFETY: arguments match `top_k_top_p_*(const T* logits, const int* top_k, const float* top_p, const
        // float* inv_temp, const float* uniform, int* ids, float* probs, int* count, int* token, TopKParams)`;
        // inputs hold rows (logits rows * vocab), outputs rows * MAX_TOP_K or rows, all checked above.
        unsafe { l.launch(cfg(&launch)) }.map_err(cu)?;
        Ok(())
    }
}

/// Buffers of [`CudaKernels::rms_norm`] (layouts as the reference's).
#[derive(Debug)]
pub struct RmsNormBuffers<'a, T> {
    /// Input rows.
    pub x: &'a CudaSlice<T>,
    /// Residual rows, replaced by `x + residual`.
    pub residual: &'a mut CudaSlice<T>,
    /// Per-column weight (its length is the row width).
    pub weight: &'a CudaSlice<T>,
    /// Normalised rows.
    pub out: &'a mut CudaSlice<T>,
}

/// Buffers of [`CudaKernels::add_rms_norm_packed`].
#[derive(Debug)]
pub struct PackedRmsNormBuffers<'a, T> {
    /// Input rows.
    pub x: CudaView<'a, T>,
    /// Residual rows (read only).
    pub residual: CudaView<'a, T>,
    /// Per-column weight (its length is the row width).
    pub weight: CudaView<'a, T>,
    /// `[2, rows, dim]`: the sums, then the normalised rows.
    pub out: &'a mut CudaSlice<T>,
}

/// Buffers of [`CudaKernels::rope_kv_write`] (layouts in `cuda/rope_kv.cu`).
/// Views, so that the outputs can be parts of one allocation (the KV
/// cache's per-layer tensor holds both caches and the rotated queries).
#[derive(Debug)]
pub struct RopeKvBuffers<'a, T> {
    /// The stacked q/k/v projection.
    pub src: CudaView<'a, T>,
    /// Rotated queries.
    pub q_out: CudaViewMut<'a, T>,
    /// The cos/sin table.
    pub cos_sin: CudaView<'a, f32>,
    /// Token positions.
    pub positions: CudaView<'a, i32>,
    /// Token cache slots.
    pub slots: CudaView<'a, i32>,
    /// Paged key cache.
    pub k_cache: CudaViewMut<'a, T>,
    /// Paged value cache.
    pub v_cache: CudaViewMut<'a, T>,
}

/// The read-only buffers of [`CudaKernels::paged_attention_new`]: queries,
/// paged keys and values, block tables, context lengths.
pub type PagedAttentionReads<'a, T> =
    (CudaView<'a, T>, CudaView<'a, T>, CudaView<'a, T>, &'a CudaSlice<i32>, &'a CudaSlice<i32>);

/// Buffers of [`CudaKernels::paged_attention`].
#[derive(Debug)]
pub struct PagedAttentionBuffers<'a, T> {
    /// Queries.
    pub q: CudaView<'a, T>,
    /// Paged keys (a view: one allocation may hold both caches).
    pub k_cache: CudaView<'a, T>,
    /// Paged values.
    pub v_cache: CudaView<'a, T>,
    /// Block tables.
    pub block_tables: &'a CudaSlice<i32>,
    /// Context lengths.
    pub context_lens: &'a CudaSlice<i32>,
    /// Attention output.
    pub out: &'a mut CudaSlice<T>,
}

/// Buffers of [`CudaKernels::quant_gemv`].
#[derive(Debug)]
pub struct GemvBuffers<'a, T> {
    /// GGML blocks, `[n, k / 32]`.
    pub w: CudaView<'a, u8>,
    /// Activations `[m, k]`.
    pub x: CudaView<'a, T>,
    /// Output `[m, n]`.
    pub y: &'a mut CudaSlice<T>,
}

/// Buffers of [`CudaKernels::dense_gemv`]: views, so that the matrix and the
/// rows may be parts of larger allocations (a tensor's storage).
#[derive(Debug)]
pub struct DenseGemvBuffers<'a, W, X, Y> {
    /// The matrix, `[n, k]` row-major.
    pub w: CudaView<'a, W>,
    /// Activations `[m, k]`.
    pub x: CudaView<'a, X>,
    /// Output `[m, n]`.
    pub y: &'a mut CudaSlice<Y>,
}

/// Buffers of [`CudaKernels::dense_gemv_norm`].
#[derive(Debug)]
pub struct DenseGemvNormBuffers<'a, W, X> {
    /// The matrix, `[n, k]` row-major.
    pub w: CudaView<'a, W>,
    /// The residual rows `[m, k]`.
    pub x: CudaView<'a, X>,
    /// The rows added to them `[m, k]`.
    pub d: CudaView<'a, X>,
    /// The norm's weight `[k]`.
    pub g: CudaView<'a, X>,
    /// The product `[m, n]`.
    pub y: CudaViewMut<'a, X>,
    /// The sums `x + d`, `[m, k]`.
    pub sum: CudaViewMut<'a, X>,
}

/// Per-row sampling parameters of [`CudaKernels::top_k_top_p`].
#[derive(Debug, Clone, Copy)]
pub struct SamplingParams<'a> {
    /// `top_k` per row.
    pub top_k: &'a CudaSlice<i32>,
    /// `top_p` per row.
    pub top_p: &'a CudaSlice<f32>,
    /// `1 / temperature` per row.
    pub inv_temp: &'a CudaSlice<f32>,
    /// Uniform draws in `[0, 1)` per row.
    pub uniform: &'a CudaSlice<f32>,
}

/// Outputs of [`CudaKernels::top_k_top_p`].
#[derive(Debug)]
pub struct SamplingOutputs<'a> {
    /// Kept ids, `[rows, MAX_TOP_K]`, `-1` past the count.
    pub ids: &'a mut CudaSlice<i32>,
    /// Their renormalised probabilities, `[rows, MAX_TOP_K]`.
    pub probs: &'a mut CudaSlice<f32>,
    /// Kept per row.
    pub count: &'a mut CudaSlice<i32>,
    /// The sampled token per row.
    pub token: &'a mut CudaSlice<i32>,
}

// SAFETY: plain `repr(C)` structs of 4-byte ints and floats with no padding, field for field the structs the
// kernels take by value, so their bytes are a valid kernel argument.
unsafe impl DeviceRepr for RopeKvParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for PagedParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TopKParams {}
