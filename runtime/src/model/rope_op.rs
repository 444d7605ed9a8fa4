//! RoPE fused with the paged KV-cache write, as one in-place candle op on a
//! layer's KV tensor (`[keys | values | queries]`, see [`super::kv`]): on a
//! CUDA device our `rope_kv_write` kernel (`kernels/cuda/rope_kv.cu`) on
//! candle's stream, on the CPU its reference. Both rotate in the storage
//! type's arithmetic, as candle's RoPE kernels do.
//!
//! The op reads a step's stacked q/k/v projection as the matmul leaves it
//! (`[rows, (q_heads + 2 * kv_heads) * head_dim]`), rotates its queries into
//! the layer's room for them and its keys into the key cache, and copies its
//! values into the value cache. The unfused step takes six launches for the
//! same work (a head-first copy, RoPE on the queries and on the keys, a
//! scatter per cache, the queries back to rows); this takes one. Candle's
//! in-place ops mutate one tensor, which is why the layer's caches and its
//! query rows share one.

use arqon_kernels::reference::fused::{rope_kv_write, RopeKvInputs, RopeKvShape};
use arqon_kernels::reference::RopePairs;
use arqon_kernels::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Storage, Tensor};

use super::op_layout::span;
use crate::error::Result;

/// A step's rotations, one row per step row: `cos_sin` `[rows, head_dim]`
/// f32 (row `r` holds the cosines of its pairs, then their sines: the
/// kernel's table layout) and `positions` `[rows]` i32, row `r`'s row of
/// the table (`r`). Built with the step's other inputs, so that a captured
/// step replays with new ones.
#[derive(Debug)]
pub(crate) struct RopeRows {
    pub(crate) rows: usize,
    pub(crate) pairs: RopePairs,
    pub(crate) cos_sin: Tensor,
    pub(crate) positions: Tensor,
}

impl RopeRows {
    /// The rows of `cos` and `sin` (`[rows, half]` f32 each, row-major, as
    /// [`crate::model::Llama`] computes them), uploaded to `device` as one table.
    pub fn new(cos: &[f32], sin: &[f32], half: usize, pairs: RopePairs, device: &Device) -> Result<Self> {
        let rows = cos.len() / half.max(1);
        let table: Vec<f32> =
            cos.chunks(half).zip(sin.chunks(half)).flat_map(|(c, s)| c.iter().chain(s)).copied().collect();
        let positions: Vec<i32> = (0..rows as i32).collect();
        Ok(RopeRows {
            rows,
            pairs,
            cos_sin: Tensor::from_vec(table, (rows, 2 * half), device)?,
            positions: Tensor::from_vec(positions, rows, device)?,
        })
    }

    /// Takes `fresh`'s tables (the same shape) into these buffers, in place.
    pub fn refill(&self, fresh: &RopeRows) -> Result<()> {
        self.cos_sin.slice_set(&fresh.cos_sin, 0, 0)?;
        Ok(())
    }
}

/// The op, for one layer and step: see [`super::kv::KvCache::rope_write`].
pub(crate) struct RopeKvWrite<'a> {
    shape: RopeKvShape,
    src: &'a Tensor,
    cos_sin: &'a Tensor,
    positions: &'a Tensor,
    slots: &'a Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    variant: arqon_kernels::plan::RopeKvVariant,
}

impl<'a> RopeKvWrite<'a> {
    /// The op over `shape`, reading the stacked projection, the table, the
    /// rows' positions in it and their cache slots, in the SKU's measured variant.
    pub fn new(
        shape: RopeKvShape,
        (src, cos_sin, positions, slots): (&'a Tensor, &'a Tensor, &'a Tensor, &'a Tensor),
    ) -> Self {
        let variant = super::plan::kernel_plan().map(|p| p.rope_kv_write).unwrap_or_default();
        RopeKvWrite { shape, src, cos_sin, positions, slots, variant }
    }

    /// Lengths of the layer tensor's three parts: keys, values, queries.
    fn parts(&self, total: usize) -> candle_core::Result<(usize, usize)> {
        let cache = self.shape.cache.len();
        let q = self.shape.tokens * self.shape.q_heads * self.shape.cache.head_dim;
        if total < 2 * cache + q {
            candle_core::bail!(
                "RoPE + KV write: a layer tensor of {total} elements holds no {cache}-element caches and {q} queries"
            )
        }
        Ok((cache, q))
    }

    /// The CPU arm: the kernel's reference ([`rope_kv_write`]), which
    /// rotates in `T`'s arithmetic as candle's CPU RoPE does (the table
    /// rounded to `T`, each product and sum rounded to `T`), so that on the
    /// CPU the fused step gives the unfused one's numbers bit for bit (the
    /// quantized matmuls after it would turn a last-bit difference into a
    /// visible one; see [`super::norm_op`]).
    fn cpu<T: Elem>(
        &self,
        layer: &mut [T],
        src: &[T],
        cos_sin: &[f32],
        positions: &[i32],
        slots: &[i32],
    ) -> candle_core::Result<()> {
        let (cache, q) = self.parts(layer.len())?;
        let (k_cache, rest) = layer.split_at_mut(cache);
        let (v_cache, rest) = rest.split_at_mut(cache);
        let inputs = RopeKvInputs { src, cos_sin, positions, slots };
        rope_kv_write(&self.shape, &inputs, &mut rest[..q], k_cache, v_cache).map_err(candle_core::Error::wrap)
    }

    /// The CUDA arm in element type `T`.
    #[cfg(feature = "cuda")]
    fn cuda<T: arqon_kernels::cuda::launch::DeviceElem + candle_core::cuda::CudaDType>(
        &self,
        layer: &mut candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<()> {
        use arqon_kernels::cuda::launch::RopeKvBuffers;
        let dev = layer.device.clone();
        let kernels = super::paged_op::kernels_for(&dev)?;
        let all = span(l, OP, "the layer tensor")?;
        let (cache, q) = self.parts(all.len())?;
        let reads = [self.src, self.cos_sin, self.positions, self.slots].map(|t| t.storage_and_layout());
        let cuda = |i: usize, what: &str| -> candle_core::Result<(&candle_core::CudaStorage, std::ops::Range<usize>)> {
            match &*reads[i].0 {
                Storage::Cuda(s) => Ok((s, span(reads[i].1, OP, what)?)),
                _ => candle_core::bail!("{OP}: {what} is not on the device"),
            }
        };
        let ((src, ss), (cs, cr), (pos, pr), (slots, lr)) =
            (cuda(0, "the projection")?, cuda(1, "the table")?, cuda(2, "the positions")?, cuda(3, "the slots")?);
        let mut all = layer.as_cuda_slice_mut::<T>()?.slice_mut(all);
        let (k_cache, mut rest) = all.split_at_mut(cache);
        let (v_cache, mut rest) = rest.split_at_mut(cache);
        let b = RopeKvBuffers {
            src: src.as_cuda_slice::<T>()?.slice(ss),
            q_out: rest.slice_mut(..q),
            cos_sin: cs.as_cuda_slice::<f32>()?.slice(cr),
            positions: pos.as_cuda_slice::<i32>()?.slice(pr),
            slots: slots.as_cuda_slice::<i32>()?.slice(lr),
            k_cache,
            v_cache,
        };
        kernels.rope_kv_write(self.variant, &self.shape, b).map_err(candle_core::Error::wrap)
    }
}

const OP: &str = "RoPE + KV write";

/// A read-only CPU input of the op, as a slice of `T`.
fn host<'a, T: candle_core::WithDType>(s: &'a Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(c) = s else { candle_core::bail!("{OP}: {what} is not on the host") };
    Ok(&c.as_slice::<T>()?[span(l, OP, what)?])
}

impl InplaceOp1 for RopeKvWrite<'_> {
    fn name(&self) -> &'static str {
        "rope-kv-write"
    }

    fn cpu_fwd(&self, layer: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let all = span(l, OP, "the layer tensor")?;
        let (src, sl) = self.src.storage_and_layout();
        let (cs, cl) = self.cos_sin.storage_and_layout();
        let (pos, pl) = self.positions.storage_and_layout();
        let (slots, ll) = self.slots.storage_and_layout();
        let (cs, pos, slots) = (
            host::<f32>(&cs, cl, "the table")?,
            host::<i32>(&pos, pl, "the positions")?,
            host::<i32>(&slots, ll, "the slots")?,
        );
        let src_dtype = self.src.dtype();
        let Storage::Cpu(src) = &*src else { candle_core::bail!("{OP}: the projection is not on the host") };
        let ss = span(sl, OP, "the projection")?;
        macro_rules! arm {
            ($all:expr, $src:expr) => {
                self.cpu(&mut $all[all], &$src[ss], cs, pos, slots)
            };
        }
        match (layer, src) {
            (CpuStorage::F32(all), CpuStorage::F32(src)) => arm!(all, src),
            (CpuStorage::BF16(all), CpuStorage::BF16(src)) => arm!(all, src),
            (CpuStorage::F16(all), CpuStorage::F16(src)) => arm!(all, src),
            (layer, _) => candle_core::bail!(
                "{OP}: the caches ({:?}) and the projection ({src_dtype:?}) must share one of f32, bf16, f16",
                layer.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, layer: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        use candle_core::DType;
        match (layer.dtype(), self.src.dtype()) {
            (DType::F32, DType::F32) => self.cuda::<f32>(layer, l),
            (DType::BF16, DType::BF16) => self.cuda::<half::bf16>(layer, l),
            (DType::F16, DType::F16) => self.cuda::<half::f16>(layer, l),
            (a, b) => candle_core::bail!(
                "RoPE + KV write: the caches ({a:?}) and the projection ({b:?}) must share one of f32, bf16, f16"
            ),
        }
    }
}
