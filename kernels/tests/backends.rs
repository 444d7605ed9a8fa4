//! The same test bodies on every backend, compared with the CPU references
//! under dtype-aware tolerances (candle's `test_device!` pattern).
//!
//! Each body takes an [`Exec`]: [`Cpu`] runs the references (and, for split-K
//! attention, the CPU split formulation), so on a machine without a GPU the
//! bodies, shapes and comparisons are still exercised; with the `cuda`
//! feature every body also runs on device 0, and skips with a message only
//! when no CUDA context can be created. Everywhere, the bodies also run on
//! `arqon-kernels-emu`: the very `.cu` sources compiled for the host, launched
//! with the grids and arguments `arqon_kernels::launches` gives the CUDA
//! wrappers, the blocks and each block's threads run first to last and last to first.

use arqon_kernels::dtype::{from_f32_slice, to_f32_vec};
use arqon_kernels::plan::{
    ArgmaxVariant, DenseGemvVariant, PagedAttentionVariant, PartitionTokens, QuantGemvVariant, RmsNormVariant,
    RopeKvVariant, SiluMulVariant, TopKVariant,
};
use arqon_kernels::reference::dense::{dense_gemv, dense_gemv_norm, dense_gemv_silu};
use arqon_kernels::reference::fused::{
    cos_sin_cache, fused_add_rms_norm, pack_qkv, rope_kv_write, silu_mul, RopeKvInputs, RopeKvShape,
};
use arqon_kernels::reference::ggml::{quant_gemv, quantize_row, GemvShape, QuantFormat};
use arqon_kernels::reference::paged::{
    paged_decode_attention, paged_decode_attention_split, PagedAttentionInputs, PagedAttentionShape, PagedKvShape,
    RandomPagedCase,
};
use arqon_kernels::reference::rng::TestRng;
use arqon_kernels::reference::sampling::{argmax, top_k_top_p, Filtered, RowSampling};
use arqon_kernels::reference::RopePairs;
use arqon_kernels::{DType, Elem};
use half::{bf16, f16};

/// What every backend takes: a kernel element type, plain in the emulator's
/// buffers, and (under the feature) in CUDA device memory.
#[cfg(feature = "cuda")]
trait DevElem: arqon_kernels::cuda::launch::DeviceElem + arqon_kernels_emu::Plain {}
#[cfg(feature = "cuda")]
impl<T: arqon_kernels::cuda::launch::DeviceElem + arqon_kernels_emu::Plain> DevElem for T {}
#[cfg(not(feature = "cuda"))]
trait DevElem: Elem + arqon_kernels_emu::Plain {}
#[cfg(not(feature = "cuda"))]
impl<T: Elem + arqon_kernels_emu::Plain> DevElem for T {}

/// One backend: every kernel, host slices in, host vectors out.
trait Exec {
    /// Whether [`DenseGemvVariant::Cublas`] runs here (the emulator has no cuBLAS).
    fn has_cublas(&self) -> bool {
        true
    }
    fn rms_norm<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> (Vec<T>, Vec<T>);
    /// The packed form: `[sums, normalised rows]`, the residual left as it was.
    fn rms_norm_packed<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> Vec<T>;
    fn rope_kv<T: DevElem>(
        &self,
        v: RopeKvVariant,
        shape: &RopeKvShape,
        inputs: &RopeKvInputs<'_, T>,
        outputs: (&[T], &[T], &[T]),
    ) -> (Vec<T>, Vec<T>, Vec<T>);
    fn silu_mul<T: DevElem>(&self, v: SiluMulVariant, gate_up: &[T], inter: usize) -> Vec<T>;
    fn paged_attention<T: DevElem>(
        &self,
        v: PagedAttentionVariant,
        shape: &PagedAttentionShape,
        inputs: &PagedAttentionInputs<'_, T>,
    ) -> Vec<T>;
    fn quant_gemv<T: DevElem>(&self, v: QuantGemvVariant, f: QuantFormat, w: &[u8], x: &[T], s: GemvShape) -> Vec<T>;
    /// `w` and `x` placed `offset` elements into their buffers (misaligned for a vector load when odd).
    fn dense_gemv<W: DevElem, X: DevElem, Y: DevElem>(
        &self,
        v: DenseGemvVariant,
        w: &[W],
        x: &[X],
        s: GemvShape,
        offset: usize,
    ) -> Vec<Y>;
    /// The same with the activation fused in: `gate_up` rows of `2 s.k`.
    fn dense_gemv_silu<W: DevElem, X: DevElem, Y: DevElem>(
        &self,
        v: DenseGemvVariant,
        w: &[W],
        gate_up: &[X],
        s: GemvShape,
    ) -> Vec<Y>;
    /// The residual add and RMSNorm fused in front: `(y, sum)`.
    #[allow(clippy::too_many_arguments)]
    fn dense_gemv_norm<W: DevElem, X: DevElem>(
        &self,
        v: DenseGemvVariant,
        w: &[W],
        x: &[X],
        d: &[X],
        g: &[X],
        eps: f32,
        s: GemvShape,
    ) -> (Vec<X>, Vec<X>);
    /// Element-wise conversion between f32 and a half type.
    fn convert<A: DevElem, B: DevElem>(&self, x: &[A]) -> Vec<B>;
    fn argmax<T: DevElem>(&self, v: ArgmaxVariant, logits: &[T], vocab: usize) -> Vec<i32>;
    fn top_k_top_p<T: DevElem>(
        &self,
        v: TopKVariant,
        logits: &[T],
        vocab: usize,
        rows: &[RowSampling],
    ) -> Vec<Filtered>;
}

/// A device's top-k outputs (`[rows, MAX_TOP_K]` ids and probabilities,
/// a count and a token per row) as the reference's per-row results.
fn filtered(ids: &[i32], probs: &[f32], count: &[i32], token: &[i32]) -> Vec<Filtered> {
    use arqon_kernels::reference::sampling::MAX_TOP_K;
    (0..count.len())
        .map(|r| {
            let c = count[r] as usize;
            Filtered {
                ids: ids[r * MAX_TOP_K..][..c].to_vec(),
                probs: probs[r * MAX_TOP_K..][..c].to_vec(),
                token: token[r],
            }
        })
        .collect()
}

/// The CPU references.
struct Cpu;

impl Exec for Cpu {
    fn rms_norm<T: DevElem>(&self, _: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> (Vec<T>, Vec<T>) {
        let (mut r, mut o) = (res.to_vec(), res.to_vec());
        fused_add_rms_norm(x, &mut r, w, eps, &mut o).unwrap();
        (r, o)
    }
    fn rms_norm_packed<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> Vec<T> {
        let (mut r, o) = self.rms_norm(v, x, res, w, eps);
        r.extend(o);
        r
    }
    fn rope_kv<T: DevElem>(
        &self,
        _: RopeKvVariant,
        shape: &RopeKvShape,
        inputs: &RopeKvInputs<'_, T>,
        (q, kc, vc): (&[T], &[T], &[T]),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (mut q, mut kc, mut vc) = (q.to_vec(), kc.to_vec(), vc.to_vec());
        rope_kv_write(shape, inputs, &mut q, &mut kc, &mut vc).unwrap();
        (q, kc, vc)
    }
    fn silu_mul<T: DevElem>(&self, _: SiluMulVariant, gate_up: &[T], inter: usize) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); gate_up.len() / 2];
        silu_mul(gate_up, inter, &mut out).unwrap();
        out
    }
    fn paged_attention<T: DevElem>(
        &self,
        v: PagedAttentionVariant,
        shape: &PagedAttentionShape,
        inputs: &PagedAttentionInputs<'_, T>,
    ) -> Vec<T> {
        let mut out = inputs.q.to_vec();
        match v {
            PagedAttentionVariant::Plain => paged_decode_attention(shape, inputs, &mut out).unwrap(),
            PagedAttentionVariant::SplitK(p) => {
                paged_decode_attention_split(shape, inputs, p.get() as usize, &mut out).unwrap()
            }
        }
        out
    }
    fn quant_gemv<T: DevElem>(&self, _: QuantGemvVariant, f: QuantFormat, w: &[u8], x: &[T], s: GemvShape) -> Vec<T> {
        let mut y = vec![T::from_f32(0.0); s.m * s.n];
        quant_gemv(f, w, x, s, &mut y).unwrap();
        y
    }
    fn dense_gemv<W: DevElem, X: DevElem, Y: DevElem>(
        &self,
        _: DenseGemvVariant,
        w: &[W],
        x: &[X],
        s: GemvShape,
        _: usize,
    ) -> Vec<Y> {
        let mut y = vec![Y::from_f32(0.0); s.m * s.n];
        dense_gemv(w, x, s, &mut y).unwrap();
        y
    }
    fn dense_gemv_silu<W: DevElem, X: DevElem, Y: DevElem>(
        &self,
        _: DenseGemvVariant,
        w: &[W],
        gate_up: &[X],
        s: GemvShape,
    ) -> Vec<Y> {
        let mut y = vec![Y::from_f32(0.0); s.m * s.n];
        dense_gemv_silu(w, gate_up, s, &mut y).unwrap();
        y
    }
    fn dense_gemv_norm<W: DevElem, X: DevElem>(
        &self,
        _: DenseGemvVariant,
        w: &[W],
        x: &[X],
        d: &[X],
        g: &[X],
        eps: f32,
        s: GemvShape,
    ) -> (Vec<X>, Vec<X>) {
        let (mut y, mut sum) = (vec![X::from_f32(0.0); s.m * s.n], vec![X::from_f32(0.0); x.len()]);
        dense_gemv_norm(w, x, d, g, eps, s, &mut y, &mut sum).unwrap();
        (y, sum)
    }
    fn convert<A: DevElem, B: DevElem>(&self, x: &[A]) -> Vec<B> {
        x.iter().map(|v| B::from_f32(v.to_f32())).collect()
    }
    fn argmax<T: DevElem>(&self, _: ArgmaxVariant, logits: &[T], vocab: usize) -> Vec<i32> {
        let mut out = vec![0; logits.len() / vocab];
        argmax(logits, vocab, &mut out).unwrap();
        out
    }
    fn top_k_top_p<T: DevElem>(
        &self,
        _: TopKVariant,
        logits: &[T],
        vocab: usize,
        rows: &[RowSampling],
    ) -> Vec<Filtered> {
        logits.chunks(vocab).zip(rows).map(|(l, p)| top_k_top_p(l, p)).collect()
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use arqon_kernels::cuda::launch::{
        GemvBuffers, PackedRmsNormBuffers, PagedAttentionBuffers, RmsNormBuffers, RopeKvBuffers, SamplingOutputs,
        SamplingParams,
    };
    use arqon_kernels::cuda::CudaKernels;
    use arqon_kernels::reference::sampling::MAX_TOP_K;

    use super::*;

    pub struct Gpu(CudaKernels);

    impl Gpu {
        /// Device 0, or `None` (with the reason on stderr) when there is none.
        pub fn get() -> Option<Gpu> {
            match CudaKernels::new(0) {
                Ok(k) => Some(Gpu(k)),
                Err(e) => {
                    eprintln!("no CUDA device: {e}");
                    None
                }
            }
        }
    }

    impl Exec for Gpu {
        fn rms_norm<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> (Vec<T>, Vec<T>) {
            let s = self.0.stream();
            let (x, w) = (s.clone_htod(x).unwrap(), s.clone_htod(w).unwrap());
            let mut r = s.clone_htod(res).unwrap();
            let mut o = s.alloc_zeros::<T>(res.len()).unwrap();
            self.0.rms_norm(v, RmsNormBuffers { x: &x, residual: &mut r, weight: &w, out: &mut o }, eps).unwrap();
            (s.clone_dtoh(&r).unwrap(), s.clone_dtoh(&o).unwrap())
        }
        fn rms_norm_packed<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> Vec<T> {
            let s = self.0.stream();
            let (x, r, w) = (s.clone_htod(x).unwrap(), s.clone_htod(res).unwrap(), s.clone_htod(w).unwrap());
            let mut o = s.alloc_zeros::<T>(2 * res.len()).unwrap();
            let b = PackedRmsNormBuffers { x: x.slice(..), residual: r.slice(..), weight: w.slice(..), out: &mut o };
            self.0.add_rms_norm_packed(v, b, eps).unwrap();
            // The residual is read only.
            assert_eq!(to_f32_vec(&s.clone_dtoh(&r).unwrap()), to_f32_vec(res), "{v}: packed form wrote the residual");
            s.clone_dtoh(&o).unwrap()
        }
        fn rope_kv<T: DevElem>(
            &self,
            v: RopeKvVariant,
            shape: &RopeKvShape,
            inputs: &RopeKvInputs<'_, T>,
            (q, kc, vc): (&[T], &[T], &[T]),
        ) -> (Vec<T>, Vec<T>, Vec<T>) {
            let s = self.0.stream();
            let src = s.clone_htod(inputs.src).unwrap();
            let cs = s.clone_htod(inputs.cos_sin).unwrap();
            let (pos, slots) = (s.clone_htod(inputs.positions).unwrap(), s.clone_htod(inputs.slots).unwrap());
            // The three outputs in one allocation, as the KV cache's per-layer tensor holds them.
            let mut all = s.clone_htod(&[kc, vc, q].concat()).unwrap();
            let (k_cache, mut rest) = all.split_at_mut(kc.len());
            let (v_cache, q_out) = rest.split_at_mut(vc.len());
            let b = RopeKvBuffers {
                src: src.slice(..),
                q_out,
                cos_sin: cs.slice(..),
                positions: pos.slice(..),
                slots: slots.slice(..),
                k_cache,
                v_cache,
            };
            self.0.rope_kv_write(v, shape, b).unwrap();
            let all = s.clone_dtoh(&all).unwrap();
            let (kc, rest) = all.split_at(kc.len());
            let (vc, q) = rest.split_at(vc.len());
            (q.to_vec(), kc.to_vec(), vc.to_vec())
        }
        fn silu_mul<T: DevElem>(&self, v: SiluMulVariant, gate_up: &[T], inter: usize) -> Vec<T> {
            let s = self.0.stream();
            // The product at an offset inside a longer buffer, as a view of a tensor may be.
            let pad = s.clone_htod(&[&[T::from_f32(7.0); 3][..], gate_up].concat()).unwrap();
            let out = self.0.silu_mul_new(v, pad.slice(3..), inter).unwrap();
            s.clone_dtoh(&out).unwrap()
        }
        fn paged_attention<T: DevElem>(
            &self,
            v: PagedAttentionVariant,
            shape: &PagedAttentionShape,
            i: &PagedAttentionInputs<'_, T>,
        ) -> Vec<T> {
            let s = self.0.stream();
            let (q, kc, vc) =
                (s.clone_htod(i.q).unwrap(), s.clone_htod(i.k_cache).unwrap(), s.clone_htod(i.v_cache).unwrap());
            let (bt, cl) = (s.clone_htod(i.block_tables).unwrap(), s.clone_htod(i.context_lens).unwrap());
            let mut out = s.alloc_zeros::<T>(i.q.len()).unwrap();
            let b = PagedAttentionBuffers {
                q: q.as_view(),
                k_cache: kc.as_view(),
                v_cache: vc.as_view(),
                block_tables: &bt,
                context_lens: &cl,
                out: &mut out,
            };
            self.0.paged_attention(v, shape, b, i.scale).unwrap();
            s.clone_dtoh(&out).unwrap()
        }
        fn quant_gemv<T: DevElem>(
            &self,
            v: QuantGemvVariant,
            f: QuantFormat,
            w: &[u8],
            x: &[T],
            sh: GemvShape,
        ) -> Vec<T> {
            let s = self.0.stream();
            let (w, x) = (s.clone_htod(w).unwrap(), s.clone_htod(x).unwrap());
            let mut y = s.alloc_zeros::<T>(sh.m * sh.n).unwrap();
            self.0.quant_gemv(v, f, sh, GemvBuffers { w: w.as_view(), x: x.as_view(), y: &mut y }).unwrap();
            s.clone_dtoh(&y).unwrap()
        }
        fn dense_gemv<W: DevElem, X: DevElem, Y: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            x: &[X],
            sh: GemvShape,
            offset: usize,
        ) -> Vec<Y> {
            let s = self.0.stream();
            let w = s.clone_htod(&[&vec![W::from_f32(9.0); offset][..], w].concat()).unwrap();
            let x = s.clone_htod(&[&vec![X::from_f32(9.0); offset][..], x].concat()).unwrap();
            let y = self.0.dense_gemv_new::<W, X, Y>(v, sh, w.slice(offset..), x.slice(offset..)).unwrap();
            s.clone_dtoh(&y).unwrap()
        }
        fn dense_gemv_silu<W: DevElem, X: DevElem, Y: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            gate_up: &[X],
            sh: GemvShape,
        ) -> Vec<Y> {
            let s = self.0.stream();
            let (w, gu) = (s.clone_htod(w).unwrap(), s.clone_htod(gate_up).unwrap());
            let y = self.0.dense_gemv_silu_new::<W, X, Y>(v, sh, w.slice(..), gu.slice(..)).unwrap();
            s.clone_dtoh(&y).unwrap()
        }
        fn dense_gemv_norm<W: DevElem, X: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            x: &[X],
            d: &[X],
            g: &[X],
            eps: f32,
            sh: GemvShape,
        ) -> (Vec<X>, Vec<X>) {
            let s = self.0.stream();
            let (w, xd) = (s.clone_htod(w).unwrap(), s.clone_htod(x).unwrap());
            let (dd, gd) = (s.clone_htod(d).unwrap(), s.clone_htod(g).unwrap());
            let ins = (w.slice(..), xd.slice(..), dd.slice(..), gd.slice(..));
            let out = s.clone_dtoh(&self.0.dense_gemv_norm_new::<W, X>(v, sh, ins, eps).unwrap()).unwrap();
            let (sum, y) = out.split_at(x.len());
            (y.to_vec(), sum.to_vec())
        }
        fn convert<A: DevElem, B: DevElem>(&self, x: &[A]) -> Vec<B> {
            let s = self.0.stream();
            let xd = s.clone_htod(x).unwrap();
            let mut y = s.alloc_zeros::<B>(x.len()).unwrap();
            self.0.convert(xd.slice(..), &mut y).unwrap();
            s.clone_dtoh(&y).unwrap()
        }
        fn argmax<T: DevElem>(&self, v: ArgmaxVariant, logits: &[T], vocab: usize) -> Vec<i32> {
            let s = self.0.stream();
            let l = s.clone_htod(logits).unwrap();
            let mut t = s.alloc_zeros::<i32>(logits.len() / vocab).unwrap();
            self.0.argmax(v, &l, vocab, &mut t).unwrap();
            s.clone_dtoh(&t).unwrap()
        }
        fn top_k_top_p<T: DevElem>(
            &self,
            v: TopKVariant,
            logits: &[T],
            vocab: usize,
            rows: &[RowSampling],
        ) -> Vec<Filtered> {
            let s = self.0.stream();
            let n = rows.len();
            let l = s.clone_htod(logits).unwrap();
            let tk = s.clone_htod(&rows.iter().map(|r| r.top_k).collect::<Vec<_>>()).unwrap();
            let tp = s.clone_htod(&rows.iter().map(|r| r.top_p).collect::<Vec<_>>()).unwrap();
            let it = s.clone_htod(&rows.iter().map(|r| r.inv_temp).collect::<Vec<_>>()).unwrap();
            let u = s.clone_htod(&rows.iter().map(|r| r.uniform).collect::<Vec<_>>()).unwrap();
            let mut ids = s.alloc_zeros::<i32>(n * MAX_TOP_K).unwrap();
            let mut probs = s.alloc_zeros::<f32>(n * MAX_TOP_K).unwrap();
            let (mut count, mut token) = (s.alloc_zeros::<i32>(n).unwrap(), s.alloc_zeros::<i32>(n).unwrap());
            let params = SamplingParams { top_k: &tk, top_p: &tp, inv_temp: &it, uniform: &u };
            let out = SamplingOutputs { ids: &mut ids, probs: &mut probs, count: &mut count, token: &mut token };
            self.0.top_k_top_p(v, &l, vocab, params, out).unwrap();
            let (ids, probs) = (s.clone_dtoh(&ids).unwrap(), s.clone_dtoh(&probs).unwrap());
            let (count, token) = (s.clone_dtoh(&count).unwrap(), s.clone_dtoh(&token).unwrap());
            filtered(&ids, &probs, &count, &token)
        }
    }
}

/// The `.cu` sources on the host (`arqon-kernels-emu`), launched as the CUDA
/// wrappers launch them: `launches` gives the entry, grid, block and scalar
/// arguments; each call names the entry's parameter types as the source does.
/// Buffers start filled with 0xff bytes (NaN), so an unwritten output shows.
mod emu {
    use arqon_kernels::launches::{
        self, ArgmaxLaunch, DenseLaunch, Launch, PagedLaunch, PagedParams, RopeKvParams, TopKLens, TopKParams,
    };
    use arqon_kernels::reference::fused::RopeKvLens;
    use arqon_kernels::reference::paged::PagedAttentionLens;
    use arqon_kernels::reference::sampling::MAX_TOP_K;
    use arqon_kernels_emu::{Buffer, Emulator, Order, Plain};

    use super::*;

    type RmsFn<T> = unsafe extern "C" fn(*const T, *mut T, *const T, *mut T, i32, i32, f32);
    type PackedRmsFn<T> = unsafe extern "C" fn(*const T, *const T, *const T, *mut T, i32, i32, f32);
    type RopeFn<T> =
        unsafe extern "C" fn(*const T, *mut T, *const f32, *const i32, *const i32, *mut T, *mut T, RopeKvParams);
    type SiluFn<T> = unsafe extern "C" fn(*const T, *mut T, i64, i32);
    type DecodeFn<T> = unsafe extern "C" fn(*const T, *const T, *const T, *const i32, *const i32, *mut T, PagedParams);
    type SplitFn<T> =
        unsafe extern "C" fn(*const T, *const T, *const T, *const i32, *const i32, *mut f32, *mut f32, PagedParams);
    type ReduceFn<T> = unsafe extern "C" fn(*const f32, *const f32, *mut T, PagedParams);
    type QuantFn<T> = unsafe extern "C" fn(*const u8, *const T, *mut T, i32, i32, i32);
    type DenseFn<W, X, Y> = unsafe extern "C" fn(*const W, *const X, *mut Y, i32, i32, i32);
    type NormFn<W, X> =
        unsafe extern "C" fn(*const W, *const X, *const X, *const X, *mut X, *mut X, i32, i32, i32, f32);
    type ConvertFn<A, B> = unsafe extern "C" fn(*const A, *mut B, i64);
    type ArgmaxFn<T> = unsafe extern "C" fn(*const T, *mut i32, i32, i32);
    type ArgmaxSplitFn<T> = unsafe extern "C" fn(*const T, *mut f32, *mut i32, i32, i32);
    type ArgmaxReduceFn = unsafe extern "C" fn(*const f32, *const i32, *mut i32, i32, i32);
    type TopKFn<T> = unsafe extern "C" fn(
        *const T,
        *const i32,
        *const f32,
        *const f32,
        *const f32,
        *mut i32,
        *mut f32,
        *mut i32,
        *mut i32,
        TopKParams,
    );

    pub struct Emu {
        emu: &'static Emulator,
        order: Order,
    }

    impl Emu {
        pub fn new(order: Order) -> Emu {
            Emu { emu: Emulator::get().unwrap_or_else(|e| panic!("the kernel emulator: {e}")), order }
        }

        fn buf<T: Plain>(&self, host: &[T]) -> Buffer<T> {
            Buffer::from_slice(self.emu, host)
        }

        fn out<T: Plain>(&self, len: usize) -> Buffer<T> {
            Buffer::uninit(self.emu, len)
        }

        /// Runs `launch` with every thread calling `thread(entry)`. `F` must be
        /// the entry's signature: each caller names it from the `.cu` source
        /// (the alias types above).
        fn run<F: Copy>(&self, launch: &Launch, thread: impl Fn(F)) {
            // SAFETY: F is the entry's signature, per this function's contract with its callers.
            let f: F = unsafe { self.emu.entry(launch.module.name(), &launch.entry) }.unwrap();
            let name = format!("{} ({:?})", launch.entry, self.order);
            self.emu
                .launch(&name, launch.grid, launch.block, self.order, &|| thread(f))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    impl Exec for Emu {
        fn has_cublas(&self) -> bool {
            false
        }
        fn rms_norm<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> (Vec<T>, Vec<T>) {
            let (xb, rb, wb, ob) = (self.buf(x), self.buf(res), self.buf(w), self.out::<T>(res.len()));
            let lens = (x.len(), res.len(), w.len(), res.len());
            if let Some((l, rows, dim)) = launches::rms_norm(v, T::DTYPE, lens, 1).unwrap() {
                // SAFETY: lengths checked by `launches::rms_norm`; the buffers outlive the launch.
                self.run(&l, |f: RmsFn<T>| unsafe { f(xb.at(0), rb.at(0), wb.at(0), ob.at(0), rows, dim, eps) });
            }
            (rb.to_vec(), ob.to_vec())
        }
        fn rms_norm_packed<T: DevElem>(&self, v: RmsNormVariant, x: &[T], res: &[T], w: &[T], eps: f32) -> Vec<T> {
            let (xb, rb, wb, ob) = (self.buf(x), self.buf(res), self.buf(w), self.out::<T>(2 * res.len()));
            let lens = (x.len(), res.len(), w.len(), 2 * res.len());
            if let Some((l, rows, dim)) = launches::rms_norm(v, T::DTYPE, lens, 2).unwrap() {
                // SAFETY: as above.
                self.run(&l, |f: PackedRmsFn<T>| unsafe { f(xb.at(0), rb.at(0), wb.at(0), ob.at(0), rows, dim, eps) });
            }
            assert_eq!(to_f32_vec(&rb.to_vec()), to_f32_vec(res), "{v}: packed form wrote the residual");
            ob.to_vec()
        }
        fn rope_kv<T: DevElem>(
            &self,
            v: RopeKvVariant,
            shape: &RopeKvShape,
            i: &RopeKvInputs<'_, T>,
            (q, kc, vc): (&[T], &[T], &[T]),
        ) -> (Vec<T>, Vec<T>, Vec<T>) {
            let (src, cs) = (self.buf(i.src), self.buf(i.cos_sin));
            let (pos, slots) = (self.buf(i.positions), self.buf(i.slots));
            // The three outputs in one allocation, as the KV cache's per-layer tensor holds them.
            let all = self.buf(&[kc, vc, q].concat());
            let lens = RopeKvLens {
                src: i.src.len(),
                q_out: q.len(),
                cos_sin: i.cos_sin.len(),
                positions: i.positions.len(),
                slots: i.slots.len(),
                k_cache: kc.len(),
                v_cache: vc.len(),
            };
            if let Some((l, p)) = launches::rope_kv(v, T::DTYPE, shape, &lens).unwrap() {
                let (k0, v0, q0) = (all.at(0), all.at(kc.len()), all.at(kc.len() + vc.len()));
                // SAFETY: lengths checked by `launches::rope_kv`; the three outputs are disjoint parts of `all`.
                self.run(&l, |f: RopeFn<T>| unsafe { f(src.at(0), q0, cs.at(0), pos.at(0), slots.at(0), k0, v0, p) });
            }
            let all = all.to_vec();
            let (kc, rest) = all.split_at(kc.len());
            let (vc, q) = rest.split_at(vc.len());
            (q.to_vec(), kc.to_vec(), vc.to_vec())
        }
        fn silu_mul<T: DevElem>(&self, v: SiluMulVariant, gate_up: &[T], inter: usize) -> Vec<T> {
            // The product at an offset inside a longer buffer, as a view of a tensor may be.
            let pad = self.buf(&[&[T::from_f32(7.0); 3][..], gate_up].concat());
            let out = self.out::<T>(gate_up.len() / 2);
            if let Some((l, rows, inter)) = launches::silu_mul(v, T::DTYPE, gate_up.len(), inter, out.len()).unwrap() {
                // SAFETY: lengths checked by `launches::silu_mul`.
                self.run(&l, |f: SiluFn<T>| unsafe { f(pad.at(3), out.at(0), rows, inter) });
            }
            out.to_vec()
        }
        fn paged_attention<T: DevElem>(
            &self,
            v: PagedAttentionVariant,
            shape: &PagedAttentionShape,
            i: &PagedAttentionInputs<'_, T>,
        ) -> Vec<T> {
            let (q, kc, vc) = (self.buf(i.q), self.buf(i.k_cache), self.buf(i.v_cache));
            let (bt, cl) = (self.buf(i.block_tables), self.buf(i.context_lens));
            let out = self.out::<T>(i.q.len());
            let lens = PagedAttentionLens {
                q: i.q.len(),
                k_cache: i.k_cache.len(),
                v_cache: i.v_cache.len(),
                block_tables: i.block_tables.len(),
                context_lens: i.context_lens.len(),
                out: out.len(),
            };
            let Some((launch, p)) = launches::paged_attention(v, T::DTYPE, shape, &lens, i.scale).unwrap() else {
                return out.to_vec();
            };
            match launch {
                PagedLaunch::Plain(l) => {
                    // SAFETY: lengths checked by `launches::paged_attention`.
                    self.run(&l, |f: DecodeFn<T>| unsafe {
                        f(q.at(0), kc.at(0), vc.at(0), bt.at(0), cl.at(0), out.at(0), p)
                    });
                }
                PagedLaunch::Split { split, reduce, slots } => {
                    let (ml, acc) = (self.out::<f32>(2 * slots), self.out::<f32>(slots * shape.cache.head_dim));
                    // SAFETY: as above, and the scratch sized as `PagedLaunch::Split` says.
                    self.run(&split, |f: SplitFn<T>| unsafe {
                        f(q.at(0), kc.at(0), vc.at(0), bt.at(0), cl.at(0), ml.at(0), acc.at(0), p)
                    });
                    // SAFETY: as above.
                    self.run(&reduce, |f: ReduceFn<T>| unsafe { f(ml.at(0), acc.at(0), out.at(0), p) });
                }
            }
            out.to_vec()
        }
        fn quant_gemv<T: DevElem>(
            &self,
            v: QuantGemvVariant,
            fmt: QuantFormat,
            w: &[u8],
            x: &[T],
            s: GemvShape,
        ) -> Vec<T> {
            let (wb, xb, y) = (self.buf(w), self.buf(x), self.out::<T>(s.m * s.n));
            if let Some((l, [m, n, k])) =
                launches::quant_gemv(v, fmt, T::DTYPE, s, (w.len(), x.len(), y.len())).unwrap()
            {
                // SAFETY: lengths checked by `launches::quant_gemv`.
                self.run(&l, |f: QuantFn<T>| unsafe { f(wb.at(0), xb.at(0), y.at(0), m, n, k) });
            }
            y.to_vec()
        }
        fn dense_gemv<W: DevElem, X: DevElem, Y: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            x: &[X],
            s: GemvShape,
            offset: usize,
        ) -> Vec<Y> {
            let wb = self.buf(&[&vec![W::from_f32(9.0); offset][..], w].concat());
            let xb = self.buf(&[&vec![X::from_f32(9.0); offset][..], x].concat());
            self.dense(v, false, (&wb, offset), (&xb, offset), s)
        }
        fn dense_gemv_silu<W: DevElem, X: DevElem, Y: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            gate_up: &[X],
            s: GemvShape,
        ) -> Vec<Y> {
            self.dense(v, true, (&self.buf(w), 0), (&self.buf(gate_up), 0), s)
        }
        fn dense_gemv_norm<W: DevElem, X: DevElem>(
            &self,
            v: DenseGemvVariant,
            w: &[W],
            x: &[X],
            d: &[X],
            g: &[X],
            eps: f32,
            s: GemvShape,
        ) -> (Vec<X>, Vec<X>) {
            let (wb, xb, db, gb) = (self.buf(w), self.buf(x), self.buf(d), self.buf(g));
            let (y, sum) = (self.out::<X>(s.m * s.n), self.out::<X>(x.len()));
            let lens = (w.len(), x.len(), d.len(), g.len(), y.len(), sum.len());
            if let Some((l, [m, n, k])) = launches::dense_gemv_norm(v, (W::DTYPE, X::DTYPE), s, lens).unwrap() {
                // SAFETY: lengths checked by `launches::dense_gemv_norm`.
                self.run(&l, |f: NormFn<W, X>| unsafe {
                    f(wb.at(0), xb.at(0), db.at(0), gb.at(0), y.at(0), sum.at(0), m, n, k, eps)
                });
            }
            (y.to_vec(), sum.to_vec())
        }
        fn convert<A: DevElem, B: DevElem>(&self, x: &[A]) -> Vec<B> {
            let (xb, y) = (self.buf(x), self.out::<B>(x.len()));
            if let Some((l, n)) = launches::convert(A::DTYPE, B::DTYPE, x.len(), y.len()).unwrap() {
                // SAFETY: lengths checked by `launches::convert`.
                self.run(&l, |f: ConvertFn<A, B>| unsafe { f(xb.at(0), y.at(0), n) });
            }
            y.to_vec()
        }
        fn argmax<T: DevElem>(&self, v: ArgmaxVariant, logits: &[T], vocab: usize) -> Vec<i32> {
            let (lb, t) = (self.buf(logits), self.out::<i32>(logits.len() / vocab));
            let Some((launch, rows, vocab_i)) = launches::argmax(v, T::DTYPE, logits.len(), vocab, t.len()).unwrap()
            else {
                return t.to_vec();
            };
            match launch {
                ArgmaxLaunch::Block(l) => {
                    // SAFETY: lengths checked by `launches::argmax`.
                    self.run(&l, |f: ArgmaxFn<T>| unsafe { f(lb.at(0), t.at(0), rows, vocab_i) });
                }
                ArgmaxLaunch::Split { split, reduce, chunks } => {
                    let parts = t.len() * chunks as usize;
                    let (pv, pi) = (self.out::<f32>(parts), self.out::<i32>(parts));
                    // SAFETY: as above, the partial results sized as `ArgmaxLaunch::Split` says.
                    self.run(&split, |f: ArgmaxSplitFn<T>| unsafe { f(lb.at(0), pv.at(0), pi.at(0), rows, vocab_i) });
                    // SAFETY: as above.
                    self.run(&reduce, |f: ArgmaxReduceFn| unsafe { f(pv.at(0), pi.at(0), t.at(0), rows, chunks) });
                }
            }
            t.to_vec()
        }
        fn top_k_top_p<T: DevElem>(
            &self,
            v: TopKVariant,
            logits: &[T],
            vocab: usize,
            rows: &[RowSampling],
        ) -> Vec<Filtered> {
            let n = rows.len();
            let lb = self.buf(logits);
            let tk = self.buf(&rows.iter().map(|r| r.top_k).collect::<Vec<_>>());
            let tp = self.buf(&rows.iter().map(|r| r.top_p).collect::<Vec<_>>());
            let it = self.buf(&rows.iter().map(|r| r.inv_temp).collect::<Vec<_>>());
            let u = self.buf(&rows.iter().map(|r| r.uniform).collect::<Vec<_>>());
            let (ids, probs) = (self.out::<i32>(n * MAX_TOP_K), self.out::<f32>(n * MAX_TOP_K));
            let (count, token) = (self.out::<i32>(n), self.out::<i32>(n));
            let lens = TopKLens {
                logits: logits.len(),
                top_k: n,
                top_p: n,
                inv_temp: n,
                uniform: n,
                ids: ids.len(),
                probs: probs.len(),
                count: n,
                token: n,
            };
            if let Some((l, p)) = launches::top_k_top_p(v, T::DTYPE, vocab, &lens).unwrap() {
                // SAFETY: lengths checked by `launches::top_k_top_p`.
                self.run(&l, |f: TopKFn<T>| unsafe {
                    f(
                        lb.at(0),
                        tk.at(0),
                        tp.at(0),
                        it.at(0),
                        u.at(0),
                        ids.at(0),
                        probs.at(0),
                        count.at(0),
                        token.at(0),
                        p,
                    )
                });
            }
            filtered(&ids.to_vec(), &probs.to_vec(), &count.to_vec(), &token.to_vec())
        }
    }

    impl Emu {
        fn dense<W: DevElem, X: DevElem, Y: DevElem>(
            &self,
            v: DenseGemvVariant,
            silu: bool,
            (w, wo): (&Buffer<W>, usize),
            (x, xo): (&Buffer<X>, usize),
            s: GemvShape,
        ) -> Vec<Y> {
            let y = self.out::<Y>(s.m * s.n);
            let lens = (w.len() - wo, x.len() - xo, y.len());
            let types = (W::DTYPE, X::DTYPE, Y::DTYPE);
            match launches::dense_gemv(v, silu, types, s, lens).unwrap() {
                Some((DenseLaunch::Kernel(l), [m, n, k])) => {
                    // SAFETY: lengths (past the offsets) checked by `launches::dense_gemv`.
                    self.run(&l, |f: DenseFn<W, X, Y>| unsafe { f(w.at(wo), x.at(xo), y.at(0), m, n, k) });
                }
                Some((DenseLaunch::Cublas, _)) => panic!("no cuBLAS in the emulator"),
                None => {}
            }
            y.to_vec()
        }
    }
}

/// Runs a body on the CPU references, on the emulated CUDA sources (both
/// thread orders), and on CUDA device 0 under the feature.
macro_rules! backend_test {
    ($body:ident) => {
        mod $body {
            #[test]
            fn cpu() {
                super::$body(&super::Cpu);
            }
            #[test]
            fn emulated() {
                super::$body(&super::emu::Emu::new(arqon_kernels_emu::Order::Forward));
            }
            #[test]
            fn emulated_reverse() {
                super::$body(&super::emu::Emu::new(arqon_kernels_emu::Order::Reverse));
            }
            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                match super::gpu::Gpu::get() {
                    Some(g) => super::$body(&g),
                    None => eprintln!("skipped {} on cuda: no device", stringify!($body)),
                }
            }
        }
    };
}

/// `|got - want| <= tol * (scale + |want|)`, tol by storage type: f32 results
/// differ by reassociation and FMA contraction only; bf16/f16 results by those
/// plus one rounding that may land on the other side.
fn assert_close<T: Elem>(what: &str, got: &[T], want: &[T], scale: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = match T::DTYPE {
        DType::F32 => 1e-4,
        DType::Bf16 => 2.0 * DType::Bf16.epsilon(),
        DType::F16 => 4.0 * DType::F16.epsilon(),
    };
    for (i, (g, w)) in to_f32_vec(got).iter().zip(to_f32_vec(want)).enumerate() {
        assert!((g - w).abs() <= tol * (scale + w.abs()), "{what} [{i}]: {g} vs {w} ({:?})", T::DTYPE);
    }
}

fn for_each_dtype(f: &mut dyn FnMut(DType)) {
    for d in [DType::F32, DType::Bf16, DType::F16] {
        f(d)
    }
}

/// Calls `$f::<T, _>($e)` for T in f32, bf16, f16.
macro_rules! all_dtypes {
    ($f:ident, $e:expr) => {
        for_each_dtype(&mut |d| match d {
            DType::F32 => $f::<f32, _>($e),
            DType::Bf16 => $f::<bf16, _>($e),
            DType::F16 => $f::<f16, _>($e),
        })
    };
}

fn rms_norm_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(rms_case, e);
}

fn rms_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(11);
    // SmolLM2's hidden size at batch 32 among them.
    for (rows, dim) in [(1, 64), (7, 896), (32, 576), (3, 4096), (5, 100), (9, 33)] {
        let x: Vec<T> = from_f32_slice(&rng.vec(rows * dim, -2.0, 2.0));
        let res: Vec<T> = from_f32_slice(&rng.vec(rows * dim, -2.0, 2.0));
        let w: Vec<T> = from_f32_slice(&rng.vec(dim, 0.5, 1.5));
        let (mut want_r, mut want_o) = (res.clone(), res.clone());
        fused_add_rms_norm(&x, &mut want_r, &w, 1e-5, &mut want_o).unwrap();
        for v in RmsNormVariant::ALL {
            let (r, o) = e.rms_norm(*v, &x, &res, &w, 1e-5);
            // The residual sum is one f32 add and one rounding: bit-exact everywhere.
            assert_eq!(to_f32_vec(&r), to_f32_vec(&want_r), "{v} residual");
            assert_close(&format!("{v} {rows}x{dim}"), &o, &want_o, 1.0);
            let packed = e.rms_norm_packed(*v, &x, &res, &w, 1e-5);
            assert_eq!(packed.len(), 2 * rows * dim, "{v} packed");
            let (sums, normed) = packed.split_at(rows * dim);
            assert_eq!(to_f32_vec(sums), to_f32_vec(&want_r), "{v} packed sums");
            assert_close(&format!("{v} packed {rows}x{dim}"), normed, &want_o, 1.0);
        }
    }
}
backend_test!(rms_norm_matches_reference);

fn silu_mul_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(silu_case, e);
}

fn silu_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(13);
    for (rows, inter) in [(1usize, 1536), (8, 1536), (3, 100), (33, 14336), (2, 1)] {
        let gate_up: Vec<T> = from_f32_slice(&rng.vec(rows * 2 * inter, -8.0, 8.0));
        let want = Cpu.silu_mul(SiluMulVariant::default(), &gate_up, inter);
        for v in SiluMulVariant::ALL {
            let got = e.silu_mul(*v, &gate_up, inter);
            // In T's arithmetic four roundings deep (exp, sum, quotient,
            // product), and a GPU's exp is not the CPU's: a few ulps, relative.
            let tol = match T::DTYPE {
                DType::F32 => 1e-5,
                d => 8.0 * d.epsilon(),
            };
            for (i, (g, w)) in to_f32_vec(&got).iter().zip(to_f32_vec(&want)).enumerate() {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "{v} {rows}x{inter} [{i}]: {g} vs {w} ({:?})",
                    T::DTYPE
                );
            }
        }
    }
}
backend_test!(silu_mul_matches_reference);

fn rope_kv_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(rope_case, e);
}

fn rope_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(12);
    // SmolLM2's heads (9 q, 3 kv, 64 wide) at a 32-token prompt among them.
    for (tokens, q_heads, kv_heads, head_dim) in
        [(1usize, 4, 2, 64), (37, 14, 2, 64), (32, 9, 3, 64), (5, 8, 8, 128), (3, 32, 8, 96)]
    {
        for pairs in [RopePairs::Interleaved, RopePairs::HalfSplit] {
            let cache = PagedKvShape { num_blocks: tokens.div_ceil(16) + 2, kv_heads, block_size: 16, head_dim };
            let shape = RopeKvShape { tokens, q_heads, cache, max_pos: 4096, pairs };
            let inv: Vec<f32> = (0..head_dim / 2).map(|i| 10000f32.powf(-(2.0 * i as f32) / head_dim as f32)).collect();
            let cos_sin = cos_sin_cache(&inv, shape.max_pos);
            let q: Vec<T> = from_f32_slice(&rng.vec(tokens * q_heads * head_dim, -1.0, 1.0));
            let k: Vec<T> = from_f32_slice(&rng.vec(tokens * kv_heads * head_dim, -1.0, 1.0));
            let v: Vec<T> = from_f32_slice(&rng.vec(tokens * kv_heads * head_dim, -1.0, 1.0));
            let positions: Vec<i32> = (0..tokens).map(|_| rng.below(shape.max_pos) as i32).collect();
            let mut slots: Vec<i32> = (0..(cache.num_blocks * 16) as i32).collect();
            rng.shuffle(&mut slots);
            slots.truncate(tokens);
            if tokens > 2 {
                slots[1] = -1; // padding
            }
            let kc: Vec<T> = from_f32_slice(&rng.vec(cache.len(), -1.0, 1.0));
            let vc: Vec<T> = from_f32_slice(&rng.vec(cache.len(), -1.0, 1.0));
            let q_out: Vec<T> = from_f32_slice(&rng.vec(q.len(), -1.0, 1.0));
            let src = pack_qkv(&shape, &q, &k, &v);
            let inputs = RopeKvInputs { src: &src, cos_sin: &cos_sin, positions: &positions, slots: &slots };
            let want = Cpu.rope_kv(RopeKvVariant::default(), &shape, &inputs, (&q_out, &kc, &vc));
            for variant in RopeKvVariant::ALL {
                let got = e.rope_kv(*variant, &shape, &inputs, (&q_out, &kc, &vc));
                let what = format!("{variant} {pairs:?} t{tokens} h{q_heads}/{kv_heads} d{head_dim}");
                assert_close(&format!("{what} q"), &got.0, &want.0, 1.0);
                assert_close(&format!("{what} k_cache"), &got.1, &want.1, 1.0);
                assert_eq!(to_f32_vec(&got.2), to_f32_vec(&want.2), "{what} v_cache is a copy");
            }
        }
    }
}
backend_test!(rope_kv_matches_reference);

fn paged_attention_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(paged_case, e);
}

fn paged_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(13);
    let variants = [
        PagedAttentionVariant::Plain,
        PagedAttentionVariant::SplitK(PartitionTokens::new(64).unwrap()),
        PagedAttentionVariant::SplitK(PartitionTokens::new(512).unwrap()),
    ];
    for (seqs, q_heads, kv_heads, d, max_ctx) in [
        (3, 8, 2, 64, 300),
        (32, 9, 3, 64, 160),
        (1, 32, 8, 128, 1100),
        (4, 4, 4, 32, 40),
        (2, 14, 2, 64, 17),
        (2, 16, 2, 256, 200),
    ] {
        let case = RandomPagedCase::draw(&mut rng, seqs, q_heads, kv_heads, d, max_ctx);
        let (q, kc, vc): (Vec<T>, Vec<T>, Vec<T>) =
            (from_f32_slice(&case.q), from_f32_slice(&case.k_cache), from_f32_slice(&case.v_cache));
        let inputs = PagedAttentionInputs {
            q: &q,
            k_cache: &kc,
            v_cache: &vc,
            block_tables: &case.block_tables,
            context_lens: &case.context_lens,
            scale: case.inputs().scale,
        };
        let mut want = q.clone();
        paged_decode_attention(&case.shape, &inputs, &mut want).unwrap();
        for v in variants {
            let got = e.paged_attention(v, &case.shape, &inputs);
            assert_close(
                &format!("{v} s{seqs} h{q_heads}/{kv_heads} d{d} ctx{:?}", case.context_lens),
                &got,
                &want,
                0.1,
            );
        }
    }
}
backend_test!(paged_attention_matches_reference);

fn quant_gemv_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(gemv_case, e);
}

fn gemv_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(14);
    for (m, n, k) in [(1, 1, 32), (1, 256, 4096), (3, 37, 576), (8, 64, 2048), (5, 9, 1024 + 32)] {
        let wf = rng.vec(n * k, -1.0, 1.0);
        let x: Vec<T> = from_f32_slice(&rng.vec(m * k, -1.0, 1.0));
        let shape = GemvShape { m, n, k };
        for f in QuantFormat::ALL {
            let w: Vec<u8> = wf.chunks(k).flat_map(|r| quantize_row(f, r)).collect();
            let mut want = vec![T::from_f32(0.0); m * n];
            quant_gemv(f, &w, &x, shape, &mut want).unwrap();
            for v in QuantGemvVariant::ALL {
                let got = e.quant_gemv(*v, f, &w, &x, shape);
                assert_close(&format!("{v} {f:?} {m}x{n}x{k}"), &got, &want, (k as f32).sqrt() * 0.1);
            }
        }
    }
}
backend_test!(quant_gemv_matches_reference);

fn dense_gemv_matches_reference<E: Exec>(e: &E) {
    dense_case::<f32, f32, f32, E>(e);
    for_half::<bf16, E>(e);
    for_half::<f16, E>(e);
}

/// Every combination the kernels take for a half-precision matrix.
fn for_half<W: DevElem, E: Exec>(e: &E) {
    dense_case::<W, W, W, E>(e);
    dense_case::<W, W, f32, E>(e);
    dense_case::<W, f32, W, E>(e);
    dense_case::<W, f32, f32, E>(e);
}

fn dense_case<W: DevElem, X: DevElem, Y: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(17);
    // SmolLM2's down projection and one of its square ones; odd widths (the
    // element-wise path), rows placed off a 16-byte boundary, and more rows
    // than a tile: 17 (8 + 8 + 1) and 32 (a batch of 32).
    for (m, n, k, offset) in [
        (1, 1, 8, 0),
        (1, 576, 576, 0),
        (8, 64, 1536, 0),
        (3, 37, 577, 0),
        (5, 300, 1024, 1),
        (2, 9, 100, 3),
        (17, 70, 576, 0),
        (32, 576, 576, 0),
        (11, 23, 99, 1),
    ] {
        let w: Vec<W> = from_f32_slice(&rng.vec(n * k, -1.0, 1.0));
        let x: Vec<X> = from_f32_slice(&rng.vec(m * k, -1.0, 1.0));
        let shape = GemvShape { m, n, k };
        let mut want = vec![Y::from_f32(0.0); m * n];
        dense_gemv(&w, &x, shape, &mut want).unwrap();
        for v in DenseGemvVariant::ALL {
            if *v == DenseGemvVariant::Cublas && (X::DTYPE != W::DTYPE || !e.has_cublas()) {
                continue; // cuBLAS takes x in the matrix's type only
            }
            let got = e.dense_gemv::<W, X, Y>(*v, &w, &x, shape, offset);
            let what = format!("{v} {m}x{n}x{k}+{offset} {:?}·{:?}→{:?}", W::DTYPE, X::DTYPE, Y::DTYPE);
            assert_close(&what, &got, &want, (k as f32).sqrt() * 0.1);
        }
        // The activation fused in (ours only): rows of [gate | up].
        let gate_up: Vec<X> = from_f32_slice(&rng.vec(m * 2 * k, -4.0, 4.0));
        let mut want = vec![Y::from_f32(0.0); m * n];
        dense_gemv_silu(&w, &gate_up, shape, &mut want).unwrap();
        // Each activation may differ by the silu_mul body's tolerance (a GPU's exp is not the CPU's),
        // so the product by that much of Σ|w x|; then the output's rounding.
        let mut acts = vec![X::from_f32(0.0); m * k];
        silu_mul(&gate_up, k, &mut acts).unwrap();
        let (wf, af) = (to_f32_vec(&w), to_f32_vec(&acts));
        let act_tol = if X::DTYPE == DType::F32 { 1e-5 } else { 8.0 * X::DTYPE.epsilon() };
        let out_tol = if Y::DTYPE == DType::F32 { 1e-4 } else { 2.0 * Y::DTYPE.epsilon() };
        for v in DenseGemvVariant::ALL.iter().filter(|v| v.is_ours()) {
            let got = e.dense_gemv_silu::<W, X, Y>(*v, &w, &gate_up, shape);
            for (i, (g, t)) in to_f32_vec(&got).iter().zip(to_f32_vec(&want)).enumerate() {
                let (r, o) = (i / n, i % n);
                let abs: f32 = (0..k).map(|j| (wf[o * k + j] * af[r * k + j]).abs()).sum();
                let tol = act_tol * abs + out_tol * ((k as f32).sqrt() * 0.1 + t.abs());
                assert!(
                    (g - t).abs() <= tol,
                    "{v} silu {m}x{n}x{k} {:?}·{:?}→{:?} [{i}]: {g} vs {t}",
                    W::DTYPE,
                    X::DTYPE,
                    Y::DTYPE
                );
            }
        }
    }
}
backend_test!(dense_gemv_matches_reference);

/// The residual add and RMSNorm fused into the GEMV: the sums bit for bit,
/// the product within what the norm's own rounding (its mean's f32 sum in
/// another order may move a normed row by one ulp of `X`) and the GEMV's allow.
fn dense_gemv_norm_matches_reference<E: Exec>(e: &E) {
    norm_case::<f32, f32, E>(e);
    norm_case::<bf16, bf16, E>(e);
    norm_case::<bf16, f32, E>(e);
    norm_case::<f16, f16, E>(e);
    norm_case::<f16, f32, E>(e);
}

fn norm_case<W: DevElem, X: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(19);
    // SmolLM2's q/k/v and gate/up stacks over its hidden size, odd widths (the element-wise path), and
    // more rows than a tile.
    for (m, n, k) in [(1, 960, 576), (8, 3072, 576), (3, 37, 577), (2, 9, 100), (32, 960, 576), (13, 37, 577)] {
        let w: Vec<W> = from_f32_slice(&rng.vec(n * k, -1.0, 1.0));
        let x: Vec<X> = from_f32_slice(&rng.vec(m * k, -2.0, 2.0));
        let d: Vec<X> = from_f32_slice(&rng.vec(m * k, -2.0, 2.0));
        let g: Vec<X> = from_f32_slice(&rng.vec(k, 0.5, 1.5));
        let shape = GemvShape { m, n, k };
        let (want, want_sum) = Cpu.dense_gemv_norm(DenseGemvVariant::WarpPerRow, &w, &x, &d, &g, 1e-5, shape);
        // The normed rows, for the tolerance's Σ|w a|.
        let mut res = x.clone();
        let mut normed = vec![X::from_f32(0.0); m * k];
        fused_add_rms_norm(&d, &mut res, &g, 1e-5, &mut normed).unwrap();
        let (wf, af) = (to_f32_vec(&w), to_f32_vec(&normed));
        let ulp = if X::DTYPE == DType::F32 { 1e-6 } else { X::DTYPE.epsilon() };
        let out_tol = if X::DTYPE == DType::F32 { 1e-4 } else { 2.0 * X::DTYPE.epsilon() };
        for v in DenseGemvVariant::ALL.iter().filter(|v| v.is_ours()) {
            let (got, sum) = e.dense_gemv_norm::<W, X>(*v, &w, &x, &d, &g, 1e-5, shape);
            let what = format!("{v} norm {m}x{n}x{k} {:?}·{:?}", W::DTYPE, X::DTYPE);
            assert_eq!(to_f32_vec(&sum), to_f32_vec(&want_sum), "{what}: the sums");
            for (i, (gv, t)) in to_f32_vec(&got).iter().zip(to_f32_vec(&want)).enumerate() {
                let (r, o) = (i / n, i % n);
                let abs: f32 = (0..k).map(|j| (wf[o * k + j] * af[r * k + j]).abs()).sum();
                let tol = ulp * abs + out_tol * ((k as f32).sqrt() * 0.1 + t.abs());
                assert!((gv - t).abs() <= tol, "{what} [{i}]: {gv} vs {t}");
            }
        }
    }
}
backend_test!(dense_gemv_norm_matches_reference);

/// The conversions timed around cuBLAS round to nearest even, as `half` does: bit for bit.
fn convert_matches_reference<E: Exec>(e: &E) {
    let mut rng = TestRng::new(18);
    let mut x = rng.vec(70_000, -300.0, 300.0);
    x.extend([0.0, -0.0, 1e-8, 65504.0, 1e30, f32::INFINITY, f32::NEG_INFINITY]);
    fn check<T: DevElem, E: Exec>(e: &E, x: &[f32]) {
        let half: Vec<T> = e.convert(x);
        assert_eq!(to_f32_vec(&half), to_f32_vec(&from_f32_slice::<T>(x)), "f32 → {:?}", T::DTYPE);
        let back: Vec<f32> = e.convert(&half);
        assert_eq!(back, to_f32_vec(&half), "{:?} → f32", T::DTYPE);
    }
    check::<bf16, E>(e, &x);
    check::<f16, E>(e, &x);
}
backend_test!(convert_matches_reference);

fn argmax_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(argmax_case, e);
}

fn argmax_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(15);
    for (rows, vocab) in [(1, 1), (4, 1000), (2, 32000), (8, 49_152), (3, 151_936), (1, 4097)] {
        let mut l = rng.vec(rows * vocab, -10.0, 10.0);
        if vocab > 10 {
            l[3] = f32::NAN; // never chosen
            l[5] = 50.0; // a tie at the top of row 0: index 5 wins over 9
            l[9] = 50.0;
        }
        if rows > 1 {
            l[vocab..2 * vocab].fill(f32::NEG_INFINITY); // all -inf: index 0
        }
        let l: Vec<T> = from_f32_slice(&l);
        let want = Cpu.argmax(ArgmaxVariant::default(), &l, vocab);
        for v in ArgmaxVariant::ALL {
            assert_eq!(e.argmax(*v, &l, vocab), want, "{v} {rows}x{vocab}");
        }
    }
}
backend_test!(argmax_matches_reference);

fn top_k_top_p_matches_reference<E: Exec>(e: &E) {
    all_dtypes!(top_k_case, e);
}

fn top_k_case<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(16);
    let params = |rng: &mut TestRng| {
        [(1, 1.0, 1.0), (40, 0.9, 1.0), (0, 0.95, 1.0 / 0.7), (128, 0.5, 1.0), (500, 1.0, 2.0), (8, 0.0, 0.0)]
            .map(|(top_k, top_p, inv_temp)| RowSampling { top_k, top_p, inv_temp, uniform: rng.unit() })
    };
    // SmolLM2's vocabulary among them.
    for vocab in [50, 1000, 32000, 49152] {
        let rows = params(&mut rng);
        let l: Vec<T> = from_f32_slice(&rng.vec(rows.len() * vocab, -5.0, 5.0));
        check_top_k(e, &l, vocab, &rows);
    }
}

/// The kernels' top-k/top-p against the reference's on `logits`, one row per entry of `rows`.
fn check_top_k<T: DevElem, E: Exec>(e: &E, logits: &[T], vocab: usize, rows: &[RowSampling]) {
    let want = Cpu.top_k_top_p(TopKVariant::default(), logits, vocab, rows);
    for v in TopKVariant::ALL {
        let got = e.top_k_top_p(*v, logits, vocab, rows);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!("{v} {:?} vocab {vocab} row {r} {:?}", T::DTYPE, rows[r]);
            // The selection is exact (same order, same f32 products); the top-p cut may move by
            // one where the running sum meets top_p within float noise.
            let n = g.ids.len().min(w.ids.len());
            assert_eq!(g.ids[..n], w.ids[..n], "{what}: ids");
            assert!(g.ids.len().abs_diff(w.ids.len()) <= 1, "{what}: kept {} vs {}", g.ids.len(), w.ids.len());
            if g.ids.len() == w.ids.len() {
                assert_close(&format!("{what}: probs"), &g.probs, &w.probs, 0.01);
                let mut c = 0.0f32;
                let near_edge = w.probs.iter().any(|p| {
                    c += p;
                    (c - rows[r].uniform).abs() < 1e-4
                });
                assert!(near_edge || g.token == w.token, "{what}: token {} vs {}", g.token, w.token);
            }
        }
    }
}

/// Rows that stress the selection's ties and specials: one value everywhere (the lowest indices
/// win), a few levels (ties at the cut), NaN among numbers, fewer numbers than k, no number at
/// all, ±0 (which tie) beside -inf, and the largest and smallest finite f16.
fn top_k_edges_match_reference<E: Exec>(e: &E) {
    all_dtypes!(top_k_edges, e);
}

fn top_k_edges<T: DevElem, E: Exec>(e: &E) {
    let mut rng = TestRng::new(19);
    for vocab in [300, 5000, 49152] {
        let mut rows: Vec<(Vec<f32>, i32, f32)> = Vec::new();
        rows.push((vec![1.5; vocab], 40, 1.0));
        rows.push((vec![-2.0; vocab], 0, 0.9));
        let levels: Vec<f32> = rng.vec(vocab, -3.0, 3.0).iter().map(|x| (x * 2.0).round() / 2.0).collect();
        rows.push((levels.clone(), 100, 1.0));
        rows.push((levels, 0, 0.99));
        let nan_mix: Vec<f32> =
            rng.vec(vocab, -4.0, 4.0).iter().enumerate().map(|(i, x)| if i % 3 == 0 { f32::NAN } else { *x }).collect();
        rows.push((nan_mix, 64, 1.0));
        let mut few = vec![f32::NAN; vocab];
        for (j, i) in [7, vocab / 2, vocab - 1, 3, vocab / 3].iter().enumerate() {
            few[*i] = j as f32 * 0.25 - 0.5;
        }
        few[vocab / 3] = f32::NEG_INFINITY;
        rows.push((few, 0, 1.0));
        rows.push((vec![f32::NAN; vocab], 10, 0.5));
        let mut zeros: Vec<f32> = (0..vocab)
            .map(|i| match i % 5 {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NEG_INFINITY,
                _ => -1e-3 * (i % 7) as f32,
            })
            .collect();
        zeros[vocab / 2] = 3.0;
        rows.push((zeros, 30, 1.0));
        let mut extremes = rng.vec(vocab, -1.0, 1.0);
        extremes[vocab / 4] = 65504.0; // f16's largest
        extremes[vocab / 5] = -65504.0;
        extremes[1] = f32::MIN_POSITIVE;
        rows.push((extremes, 5, 1.0));
        let params: Vec<RowSampling> = rows
            .iter()
            .map(|(_, top_k, top_p)| RowSampling { top_k: *top_k, top_p: *top_p, inv_temp: 1.0, uniform: rng.unit() })
            .collect();
        let l: Vec<f32> = rows.into_iter().flat_map(|(row, _, _)| row).collect();
        check_top_k(e, &from_f32_slice::<T>(&l), vocab, &params);
    }
}
backend_test!(top_k_edges_match_reference);

backend_test!(top_k_top_p_matches_reference);
