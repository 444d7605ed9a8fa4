//! Decode attention as one candle op over the paged KV cache's pools: on a
//! CUDA device our `paged_attention` kernel (`kernels/cuda/paged_attention.cu`)
//! on candle's stream, on the CPU the kernel's reference
//! ([`arqon_kernels::reference::paged`]). The CPU arm is what lets the op's
//! wiring (query rows, block tables, context lengths, output rows) be tested
//! without a GPU; the kernel itself is tested against the same reference on
//! the GPU (`kernels/tests/backends.rs`).
//!
//! Off by default on a GPU, where candle's matmul attention runs, until a GPU
//! run has checked it: `ARQON_CUDA_ATTENTION=paged` turns it on (see
//! [`enabled_on`]).

use arqon_kernels::plan::PagedAttentionVariant;
use arqon_kernels::reference::paged::{
    paged_decode_attention, PagedAttentionInputs, PagedAttentionShape, PagedKvShape, MAX_HEAD_DIM,
};
use arqon_kernels::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};

use super::kv::{KvCache, SeqId, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Whether decode rows on `device` go through the paged op: on a GPU when
/// `ARQON_CUDA_ATTENTION=paged`; never on the CPU, whose own decode kernel
/// reads the blocks in place (tests force it with [`crate::model::Llama::with_paged_attention`]).
pub fn enabled_on(device: &Device) -> bool {
    !device.is_cpu() && std::env::var("ARQON_CUDA_ATTENTION").is_ok_and(|v| v == "paged")
}

/// Whether the kernel takes this head geometry (a multiple of 32 up to 256).
pub fn supports(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(32) && head_dim <= MAX_HEAD_DIM
}

/// Decode attention for `seqs` (one query row each): the block tables and
/// lengths are built once per step and serve every layer that runs the
/// whole batch.
#[derive(Debug)]
pub(crate) struct PagedDecode {
    shape: PagedAttentionShape,
    tables: Vec<i32>,
    lens: Vec<i32>,
    scale: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: PagedAttentionVariant,
    /// The tables and lengths on the device (CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_device: Option<(Tensor, Tensor)>,
}

impl PagedDecode {
    /// The op for rows of `seqs`, each attending over `lens[i]` cached tokens
    /// (its own included), with `q_heads` query heads.
    pub fn new(kv: &KvCache, seqs: &[(SeqId, usize)], q_heads: usize, scale: f32, device: &Device) -> Result<Self> {
        Self::with_width(kv, seqs, q_heads, scale, 1, device)
    }

    /// [`PagedDecode::new`] with block tables at least `width` blocks wide
    /// (a captured step's: its tables keep their shape while its sequences
    /// grow). The result of a row does not depend on the width.
    pub fn with_width(
        kv: &KvCache,
        seqs: &[(SeqId, usize)],
        q_heads: usize,
        scale: f32,
        width: usize,
        device: &Device,
    ) -> Result<Self> {
        let s = kv.shape();
        let max_blocks = seqs.iter().map(|(_, len)| len.div_ceil(BLOCK_SIZE)).max().unwrap_or(1).max(width.max(1));
        let mut tables = vec![0i32; seqs.len() * max_blocks];
        for ((seq, len), row) in seqs.iter().zip(tables.chunks_exact_mut(max_blocks)) {
            let table = kv.block_table(*seq)?;
            let used = len.div_ceil(BLOCK_SIZE);
            if table.len() < used {
                return Err(Error::InvalidRequest(format!("sequence {}: {len} tokens are not cached", seq.0)));
            }
            for (r, b) in row.iter_mut().zip(&table[..used]) {
                *r = *b as i32;
            }
        }
        let lens: Vec<i32> = seqs.iter().map(|(_, len)| *len as i32).collect();
        let shape = PagedAttentionShape {
            num_seqs: seqs.len(),
            q_heads,
            cache: PagedKvShape {
                num_blocks: kv.blocks_total(),
                kv_heads: s.kv_heads,
                block_size: BLOCK_SIZE,
                head_dim: s.head_dim,
            },
            max_blocks_per_seq: max_blocks,
        };
        // One variant for every call, the SKU's measured plan's: a row's
        // result must not depend on the rest of the batch (the engine's
        // guarantee), nor differ between a decode step and a speculative
        // step's per-row verification. Split-K keeps that: a row's partitions
        // depend only on its own length.
        let variant = super::plan::kernel_plan().map_or(PagedAttentionVariant::Plain, |p| p.paged_attention);
        let on_device = if device.is_cpu() {
            None
        } else {
            let t = Tensor::from_slice(&tables, tables.len(), device)?;
            Some((t, Tensor::from_slice(&lens, lens.len(), device)?))
        };
        Ok(PagedDecode { shape, tables, lens, scale, variant, on_device })
    }

    /// Takes `fresh`'s block tables and lengths (the same shape) into this
    /// op's own buffers, in place: what a captured step reads is where it was.
    pub fn refill(&mut self, fresh: PagedDecode) -> Result<()> {
        if fresh.shape != self.shape {
            return Err(Error::InvalidRequest(format!(
                "paged attention: tables for {:?} refilled with {:?}",
                self.shape, fresh.shape
            )));
        }
        if let (Some((t, l)), Some((ft, fl))) = (&self.on_device, &fresh.on_device) {
            t.slice_set(ft, 0, 0)?;
            l.slice_set(fl, 0, 0)?;
        }
        (self.tables, self.lens) = (fresh.tables, fresh.lens);
        Ok(())
    }

    /// Attention of `q` (`[rows, q_heads * head_dim]`) over the pools of one
    /// layer; returns `[rows, q_heads * head_dim]` in `q`'s dtype. The op
    /// runs in the pools' dtype (accumulating in f32): queries in another
    /// are converted on the way in and the rows on the way out.
    pub fn forward(&self, q: &Tensor, (k, v): (&Tensor, &Tensor)) -> Result<Tensor> {
        let rows = q.to_dtype(k.dtype())?.contiguous()?.apply_op3_no_bwd(k, v, self)?;
        Ok(rows.to_dtype(q.dtype())?)
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.shape.num_seqs, self.shape.q_heads * self.shape.cache.head_dim))
    }
}

/// The span of a contiguous input (the pools are views of their layer's
/// tensor, the queries may be too).
fn span(l: &Layout, what: &str) -> candle_core::Result<std::ops::Range<usize>> {
    super::op_layout::span(l, "paged attention", what)
}

impl PagedDecode {
    /// The CPU arm: the kernel's reference, in the pools' element type.
    fn cpu<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<Vec<T>> {
        let inputs = PagedAttentionInputs {
            q,
            k_cache: k,
            v_cache: v,
            block_tables: &self.tables,
            context_lens: &self.lens,
            scale: self.scale,
        };
        let mut out = vec![T::from_f32(0.0); q.len()];
        paged_decode_attention(&self.shape, &inputs, &mut out).map_err(candle_core::Error::wrap)?;
        Ok(out)
    }

    /// The CUDA arm in element type `T`.
    #[cfg(feature = "cuda")]
    fn cuda<T: arqon_kernels::cuda::launch::DeviceElem + candle_core::cuda::CudaDType>(
        &self,
        [(q, lq), (k, lk), (v, lv)]: [(&candle_core::CudaStorage, std::ops::Range<usize>); 3],
        (tables, lens): (&candle_core::CudaStorage, &candle_core::CudaStorage),
    ) -> candle_core::Result<candle_core::CudaStorage> {
        let dev = q.device.clone();
        let kernels = kernels_for(&dev)?;
        let reads = (
            q.as_cuda_slice::<T>()?.slice(lq),
            k.as_cuda_slice::<T>()?.slice(lk),
            v.as_cuda_slice::<T>()?.slice(lv),
            tables.as_cuda_slice::<i32>()?,
            lens.as_cuda_slice::<i32>()?,
        );
        let out = kernels
            .paged_attention_new(self.variant, &self.shape, reads, self.scale)
            .map_err(candle_core::Error::wrap)?;
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (sq, sk, sv) = (span(lq, "q")?, span(lk, "the key pool")?, span(lv, "the value pool")?);
        macro_rules! arm {
            ($v:ident, $q:expr, $k:expr, $v_:expr) => {
                CpuStorage::$v(self.cpu(&$q[sq], &$k[sk], &$v_[sv])?)
            };
        }
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => arm!(F32, q, k, v),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => arm!(BF16, q, k, v),
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => arm!(F16, q, k, v),
            _ => candle_core::bail!(
                "paged attention: q ({:?}) and the pools ({:?}, {:?}) must share one of f32, bf16, f16",
                q.dtype(),
                k.dtype(),
                v.dtype()
            ),
        };
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::{DType, Storage};
        let spans = [(q, span(lq, "q")?), (k, span(lk, "the key pool")?), (v, span(lv, "the value pool")?)];
        let Some((tables, lens)) = &self.on_device else {
            candle_core::bail!("paged attention: the block tables are not on the device")
        };
        let (ts, _) = tables.storage_and_layout();
        let (ls, _) = lens.storage_and_layout();
        let (Storage::Cuda(ts), Storage::Cuda(ls)) = (&*ts, &*ls) else {
            candle_core::bail!("paged attention: the block tables are not on the device")
        };
        let dtypes = (q.dtype(), k.dtype(), v.dtype());
        let out = match dtypes {
            (DType::F32, DType::F32, DType::F32) => self.cuda::<f32>(spans, (ts, ls))?,
            (DType::BF16, DType::BF16, DType::BF16) => self.cuda::<half::bf16>(spans, (ts, ls))?,
            (DType::F16, DType::F16, DType::F16) => self.cuda::<half::f16>(spans, (ts, ls))?,
            _ => candle_core::bail!("paged attention: q and the pools ({dtypes:?}) must share one of f32, bf16, f16"),
        };
        Ok((out, self.out_shape()))
    }
}

/// Our kernels loaded on the stream of candle's device (once per process:
/// one GPU serves).
#[cfg(feature = "cuda")]
pub(crate) fn kernels_for(
    dev: &candle_core::CudaDevice,
) -> candle_core::Result<&'static arqon_kernels::cuda::CudaKernels> {
    use std::sync::OnceLock;
    static KERNELS: OnceLock<std::result::Result<arqon_kernels::cuda::CudaKernels, String>> = OnceLock::new();
    let kernels = KERNELS
        .get_or_init(|| arqon_kernels::cuda::CudaKernels::on_stream(dev.cuda_stream()).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| candle_core::Error::Msg(format!("loading our CUDA kernels: {e}")))?;
    // Modules of one context launched in another fault the device: refuse instead.
    if kernels.stream().context().cu_ctx() != dev.cuda_stream().context().cu_ctx() {
        candle_core::bail!("our CUDA kernels are loaded for another CUDA context (one GPU per process)");
    }
    Ok(kernels)
}
