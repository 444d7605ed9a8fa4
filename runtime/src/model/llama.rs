//! One generic Llama-family decoder, batch-first.
//!
//! [`Llama::forward`] runs one engine step over a batch of [`SeqChunk`]s: each
//! chunk is a sequence's new tokens — a whole prompt for a newcomer (prefill),
//! one token for a running sequence (decode), or anything between (chunked
//! prefill). All tokens of all chunks are flattened into one `[tokens, hidden]`
//! matrix, so every projection and the MLP run as one matmul over the whole
//! batch; only attention is per sequence, against that sequence's own KV
//! history. A sequence's result therefore does not depend on what it is
//! batched with (up to matmul summation order, which the quantized CPU kernels
//! keep per row).
//!
//! Each chunk may name a LoRA adapter ([`SeqChunk::adapter`]): all seven
//! projections of a layer go through one helper ([`Llama::proj`]) that adds
//! each adapter's low-rank update to its own rows (see [`super::lora`]). A
//! batch without adapters runs exactly the base path.

use arqon_kernels::attention::CacheView;
use arqon_kernels::plan::AttentionVariant;
use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeStyle};
use super::exit::{select, Attention, Depth, ExitState, StepOutput, StepPlan};
use super::graph::FixedInputs;
use super::kv::{KvCache, KvShape, SeqId, StepSlots};
use super::lora::{BatchAdapters, LoraAdapter, LoraTarget};
use super::norm_op::AddRmsNorm;
use super::paged_op::PagedDecode;
use super::rope_op::RopeRows;
use super::silu_op::SiluMul;
use super::weights::{Linear, Weights};
use crate::error::{Error, Result};

/// A sequence's new tokens for one step.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The sequence (must be registered in the KV cache).
    pub seq: SeqId,
    /// Its tokens to run this step, following those already cached.
    pub tokens: &'a [u32],
    /// The LoRA adapter applied to this sequence's rows, if any (loaded for
    /// this model: checked before the step).
    pub adapter: Option<&'a LoraAdapter>,
}

/// Which positions' logits a step returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last position of each chunk: `[chunks, vocab]` (generation).
    LastOfEachChunk,
    /// Every position: `[total tokens, vocab]` (scoring, tests).
    AllPositions,
}

/// A Llama-family decoder and its weights.
#[derive(Debug)]
pub struct Llama {
    cfg: ModelConfig,
    w: Weights,
    inv_freq: Vec<f32>,
    device: Device,
    /// Decode rows run as one [`super::paged_op`] call per layer.
    paged_attention: bool,
    /// This decoder among the process's (captured steps name their model by it).
    id: u64,
    /// Held while the model lives: captured steps keep a weak handle, so
    /// those of a dropped model go ([`super::graph`]).
    alive: std::sync::Arc<()>,
    /// The norm weights in the dense matrices' dtype, when every layer
    /// matrix is dense bf16 or f16 (a GPU's): a fixed-buffer decode step
    /// over a KV cache of that dtype computes in it ([`Llama::step_dtype`]).
    low: Option<LowNorms>,
}

/// Norm weights in a 16-bit dtype (see [`Llama::step_dtype`]).
#[derive(Debug)]
struct LowNorms {
    dtype: DType,
    attn: Vec<Tensor>,
    ffn: Vec<Tensor>,
    last: Tensor,
}

impl LowNorms {
    /// The norms of `w` in its layer matrices' common dtype, if that is a
    /// 16-bit one.
    fn of(w: &Weights) -> Result<Option<LowNorms>> {
        let dtype = w.layers.first().and_then(|l| l.wq.dense_dtype());
        let Some(dtype) = dtype.filter(|d| matches!(d, DType::BF16 | DType::F16)) else { return Ok(None) };
        let all = w.layers.iter().all(|l| LoraTarget::ALL.iter().all(|t| l.linear(*t).dense_dtype() == Some(dtype)));
        if !all {
            return Ok(None);
        }
        let attn = w.layers.iter().map(|l| l.attn_norm.to_dtype(dtype)).collect::<candle_core::Result<_>>()?;
        let ffn = w.layers.iter().map(|l| l.ffn_norm.to_dtype(dtype)).collect::<candle_core::Result<_>>()?;
        Ok(Some(LowNorms { dtype, attn, ffn, last: w.norm.to_dtype(dtype)? }))
    }
}

/// The residual stream between the blocks of a layer: summed, or with a
/// block's output not yet added (for the fused add + RMSNorm after it).
enum Residual {
    Summed(Tensor),
    /// The stream and the block output to add to it.
    Pending(Tensor, Tensor),
}

impl Residual {
    /// `x + delta`: now, or with `fuse` left for the next norm.
    fn pending(x: Tensor, delta: Tensor, fuse: bool) -> Result<Residual> {
        Ok(if fuse { Residual::Pending(x, delta) } else { Residual::Summed((x + delta)?) })
    }

    /// The stream's dtype.
    fn dtype(&self) -> DType {
        match self {
            Residual::Summed(x) | Residual::Pending(x, _) => x.dtype(),
        }
    }

    /// The stream with any pending add done.
    fn summed(self) -> Result<Tensor> {
        Ok(match self {
            Residual::Summed(x) => x,
            Residual::Pending(x, delta) => (x + delta)?,
        })
    }
}

/// What a layer's attention starts from ([`Llama::layer`]'s `attend`).
enum AttnIn {
    /// The normed rows `[tokens, hidden]`.
    Normed(Tensor),
    /// The stacked q/k/v product of the normed rows, `[tokens, (q_heads + 2
    /// kv_heads) * head_dim]`: the norm was fused into it
    /// ([`Linear::forward_stacked_norm`]).
    Qkv(Tensor),
}

/// What a layer's MLP starts from.
enum FfnIn {
    /// The normed rows.
    Normed(Tensor),
    /// The stacked gate/up product of the normed rows, `[tokens, 2 inter]`
    /// (with the norm fused in, or after it).
    GateUp(Tensor),
}

/// Which RMSNorm ([`Llama::rms`]).
#[derive(Debug, Clone, Copy)]
enum Norm {
    Attn(usize),
    Ffn(usize),
    Last,
}

impl Llama {
    /// Builds the decoder; `cfg` must describe `w` (the loaders check shapes).
    pub fn new(cfg: ModelConfig, w: Weights, device: Device) -> Result<Self> {
        if w.layers.len() != cfg.num_layers {
            return Err(Error::InvalidRequest(format!(
                "{} layers of weights for a {}-layer config",
                w.layers.len(),
                cfg.num_layers
            )));
        }
        let inv_freq = cfg.rope_inv_freq().into_iter().map(|f| f as f32).collect();
        // `ARQON_CUDA_ATTENTION=paged` on a GPU, or the process's kernel plan.
        let planned = super::plan::kernel_plan().is_some_and(|p| p.attention == AttentionVariant::Paged);
        let paged_attention =
            (super::paged_op::enabled_on(&device) || planned) && super::paged_op::supports(cfg.head_dim);
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let low = LowNorms::of(&w)?;
        Ok(Llama { cfg, w, inv_freq, device, paged_attention, id, alive: std::sync::Arc::new(()), low })
    }

    /// This model with decode rows on the paged attention op (`on`) or on
    /// the device's default path. On the CPU the op runs the kernel's
    /// reference, so tests check the op's wiring without a GPU. The KV
    /// caches it makes afterwards hold their pools as tensors.
    pub fn with_paged_attention(mut self, on: bool) -> Result<Self> {
        if on && !super::paged_op::supports(self.cfg.head_dim) {
            return Err(Error::InvalidRequest(format!(
                "the paged attention kernel takes head_dim a multiple of 32 up to 256, not {}",
                self.cfg.head_dim
            )));
        }
        self.paged_attention = on;
        Ok(self)
    }

    /// The dtype every layer matrix is dense in, when that is bf16 or f16
    /// (a GPU's dense variants); `None` for f32 or quantized ones.
    pub fn dense_dtype(&self) -> Option<DType> {
        self.low.as_ref().map(|n| n.dtype)
    }

    /// Why a decode step of `rows` rows of this model must not be captured
    /// as a CUDA graph, if it must not: a matrix on candle's quantized
    /// kernels (a GGUF format on a GPU, unless our quantized GEMV takes the
    /// rows: `quantized=ours`, up to 8 rows). candle's keep one scratch
    /// buffer per device and replace it (freeing the old one) when a larger
    /// product needs more, so a graph would go on reading and writing the
    /// freed buffer. Such steps run on their fixed buffers eagerly.
    pub fn not_capturable(&self, rows: usize) -> Option<String> {
        self.not_capturable_under(rows, super::plan::kernel_plan())
    }

    /// [`Llama::not_capturable`] under `plan`.
    fn not_capturable_under(&self, rows: usize, plan: Option<arqon_kernels::KernelPlan>) -> Option<String> {
        let candle = |l: &&Linear| l.is_candle_quantized() && !l.quantized_by_ours(rows, plan, &self.device);
        let n = self.w.linears().filter(candle).count();
        (n > 0).then(|| {
            format!(
                "{n} matrices run on candle's quantized kernels at {rows} rows, whose scratch buffer moves as it \
                 grows (a graph would keep the old one): such decode steps run eagerly on fixed buffers"
            )
        })
    }

    /// Whether decode rows run on the paged attention op.
    pub fn paged_attention(&self) -> bool {
        self.paged_attention
    }

    /// This decoder's number, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A handle that dies with the model.
    pub(crate) fn liveness(&self) -> std::sync::Weak<()> {
        std::sync::Arc::downgrade(&self.alive)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model's weights.
    pub fn weights(&self) -> &Weights {
        &self.w
    }

    /// This model with `adapter` merged into its weights: a variant of its own
    /// (see [`LoraAdapter::merge`]). Shares every untargeted tensor with `self`.
    pub fn merged(&self, adapter: &LoraAdapter) -> Result<Llama> {
        let merged = Llama::new(self.cfg.clone(), adapter.merge(&self.w, &self.cfg)?, self.device.clone())?;
        Ok(Llama { paged_attention: self.paged_attention, ..merged })
    }

    /// This model with the `targets` matrices of every layer dense f32 (what
    /// merging makes of them) and no update: the base that a merged variant's
    /// arithmetic is comparable with. The rest is shared with `self`.
    pub fn dequantized(&self, targets: &[LoraTarget]) -> Result<Llama> {
        let mut w = self.w.clone();
        for layer in &mut w.layers {
            for &t in targets {
                let dense = layer.linear(t).to_dense()?;
                *layer.linear_mut(t) = super::weights::Linear::from_dense(dense)?;
            }
        }
        let model = Llama::new(self.cfg.clone(), w, self.device.clone())?;
        Ok(Llama { paged_attention: self.paged_attention, ..model })
    }

    /// This model with every layer matrix (q/k/v, output, gate, up, down)
    /// quantized to `format` (a GGML block format candle quantizes to: `Q8_0`,
    /// `Q4_0`, `Q4_1`, …), as `llama-quantize` would leave them, on the
    /// model's device; the embedding, the LM head and the norms stay as they
    /// are. For benchmarks of the quantized paths on a Hugging Face
    /// checkpoint (`engine-bench --quantize`): a GGUF file is what serving
    /// loads.
    pub fn requantized(&self, format: candle_core::quantized::GgmlDType) -> Result<Llama> {
        use candle_core::quantized::QTensor;
        let mut w = self.w.clone();
        for layer in &mut w.layers {
            for t in LoraTarget::ALL {
                let dense = layer.linear(t).to_dense()?.to_device(&Device::Cpu)?;
                // A storage of its own: a stacked matrix's rows are a view, and candle quantizes a view's
                // whole storage.
                let own = Tensor::from_vec(dense.flatten_all()?.to_vec1::<f32>()?, dense.shape(), &Device::Cpu)?;
                let q = QTensor::quantize(&own, format)?;
                *layer.linear_mut(t) = Linear::from_qtensor_on(std::sync::Arc::new(q), &self.device)?;
            }
        }
        crate::device::settle(&self.device)?;
        let model = Llama::new(self.cfg.clone(), w, self.device.clone())?;
        Ok(Llama { paged_attention: self.paged_attention, ..model })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shape of this model's KV cache.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            q_heads: self.cfg.num_heads,
            head_dim: self.cfg.head_dim,
            max_len: self.cfg.max_position_embeddings,
            dtype: DType::F32,
        }
    }

    /// An empty, growable KV cache shaped for this model (the server sizes
    /// a fixed one instead, [`KvCache::new`]).
    pub fn new_kv_cache(&self) -> KvCache {
        self.growable_kv(self.kv_shape())
    }

    /// [`Llama::new_kv_cache`] holding `dtype` (f32, or bf16/f16 where
    /// [`Llama::kv_in_tensors`]).
    pub fn new_kv_cache_in(&self, dtype: DType) -> Result<KvCache> {
        if dtype != DType::F32 && !self.kv_in_tensors() {
            return Err(Error::InvalidRequest(format!(
                "a {} KV cache on the CPU needs the paged attention op; host pools are f32",
                dtype.as_str()
            )));
        }
        Ok(self.growable_kv(KvShape { dtype, ..self.kv_shape() }))
    }

    /// Whether this model's KV caches hold their pools as tensors (on a GPU,
    /// or on the CPU for the paged attention op), which a 16-bit cache needs.
    pub fn kv_in_tensors(&self) -> bool {
        !self.device.is_cpu() || self.paged_attention
    }

    fn growable_kv(&self, shape: KvShape) -> KvCache {
        if self.paged_attention {
            KvCache::growable_tensors(shape, self.device.clone())
        } else {
            KvCache::growable(shape, self.device.clone())
        }
    }

    /// Runs one step at full depth and returns logits (see [`LogitsFor`]),
    /// appending the chunks' keys and values to `kv`. On error `kv` is unchanged.
    pub fn forward(&self, batch: &[SeqChunk<'_>], kv: &mut KvCache, which: LogitsFor) -> Result<Tensor> {
        Ok(self.forward_with(batch, kv, which, StepPlan::FULL)?.logits)
    }

    /// [`Llama::forward`] at the depth and attention order of `plan` (see
    /// [`super::exit`]): static exit runs only the first layers, dynamic exit
    /// lets confident decode tokens leave early (their skipped layers' KV
    /// filled by state propagation), and [`Attention::PerRow`] computes a
    /// multi-token chunk exactly as one-token decode steps would.
    ///
    /// On the CPU the step runs on a thread of the kernels' worker pool (see
    /// [`arqon_kernels::threads`]), so its parallel passes do not each hand
    /// off to the pool and wait.
    pub fn forward_with(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &mut KvCache,
        which: LogitsFor,
        plan: StepPlan,
    ) -> Result<StepOutput> {
        if self.device.is_cpu() {
            arqon_kernels::threads::install(|| self.step(batch, kv, which, plan))
        } else {
            self.step(batch, kv, which, plan)
        }
    }

    /// The body of [`Llama::forward_with`].
    fn step(&self, batch: &[SeqChunk<'_>], kv: &mut KvCache, which: LogitsFor, plan: StepPlan) -> Result<StepOutput> {
        self.check_batch(batch, kv)?;
        let lora = BatchAdapters::new(batch, &self.device)?;
        lora.check(&self.cfg, &self.device)?;
        let run_layers = plan.depth.max_layers(self.cfg.num_layers)?;
        if matches!(plan.depth, Depth::Dynamic { .. }) && batch.iter().any(|c| c.adapter.is_some()) {
            // Exited rows leave the sub-batch and their skipped layers' K/V
            // are propagated through the base projections: with run-time
            // adapters both would need per-row adapter bookkeeping. Refused
            // rather than approximated; a merged adapter works.
            return Err(Error::InvalidRequest(
                "dynamic early exit does not combine with run-time LoRA adapters: merge the adapter instead".into(),
            ));
        }
        let chunks: Vec<(SeqId, usize)> = batch.iter().map(|c| (c.seq, c.tokens.len())).collect();
        kv.reserve(&chunks)?;
        let per_row = plan.attention == Attention::PerRow;
        let starts: Vec<usize> = batch.iter().map(|c| kv.len(c.seq)).collect::<Result<_>>()?;
        let lens: Vec<usize> = batch.iter().map(|c| c.tokens.len()).collect();
        let total: usize = lens.iter().sum();
        let ids: Vec<u32> = batch.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let (cos, sin) = self.rope_tables(batch, &starts)?;
        let prepared = self.prepare_attention(batch, &starts, per_row, kv)?;

        let mut exits = ExitState::new(&lens, &starts);
        let mut x = self.w.embed.forward(&ids)?;
        for l in 0..run_layers {
            let _span = tracing::trace_span!("layer", l).entered();
            if exits.any_exited() {
                self.propagate_exited(l, &exits, batch, (&cos, &sin), kv)?;
            }
            if exits.active.is_empty() {
                continue;
            }
            // The sub-batch of chunks still running (all of them unless some
            // exited, which only dynamic exit does, and never with adapters).
            let (sub, sub_starts, sub_cos, sub_sin);
            let (b, s, rc, rs) = if exits.any_exited() {
                sub = exits.active.iter().map(|c| batch[*c]).collect::<Vec<_>>();
                sub_starts = exits.active.iter().map(|c| starts[*c]).collect::<Vec<_>>();
                sub_cos = select(&cos, &exits.active_rows, &self.device)?;
                sub_sin = select(&sin, &exits.active_rows, &self.device)?;
                (&sub[..], &sub_starts[..], &sub_cos, &sub_sin)
            } else {
                (batch, &starts[..], &cos, &sin)
            };
            let before = x.clone();
            // What the step prepared serves every layer that runs the whole batch.
            let prep = (!exits.any_exited()).then_some(&prepared);
            x = self
                .layer(&lora, l, Residual::Summed(x), false, |input| {
                    let qkv = self.qkv_heads_first(&lora, l, input)?;
                    self.attention((l, per_row), qkv, b, s, (rc, rs), (kv, prep))
                })?
                .summed()?;
            exits.ran_layer();
            if let Depth::Dynamic { min_layers, threshold } = plan.depth {
                if l + 1 >= min_layers && l + 1 < run_layers {
                    x = exits.exit_confident(&before, &x, threshold)?;
                }
            }
        }
        for c in batch {
            kv.advance(c.seq, c.tokens)?;
        }
        let want: Vec<u32> = match which {
            LogitsFor::AllPositions => (0..total as u32).collect(),
            LogitsFor::LastOfEachChunk => {
                let mut off = 0u32;
                lens.iter()
                    .map(|n| {
                        off += *n as u32;
                        off - 1
                    })
                    .collect()
            }
        };
        let x = if !exits.any_exited() && which == LogitsFor::AllPositions {
            x
        } else {
            exits.gather(&x, &want, &self.device)?
        };
        Ok(StepOutput { logits: self.logits_of(Residual::Summed(x))?, layers_run: exits.layers_run })
    }

    /// Layer `l`'s queries, keys and values of `h` (`[tokens, hidden]`),
    /// head-first (`[heads, tokens, head_dim]`, contiguous; not yet rotated).
    /// Stacked q/k/v matrices without an adapter update on them this step
    /// take one product and one head-first copy for all three.
    fn qkv_heads_first(&self, lora: &BatchAdapters<'_>, l: usize, input: AttnIn) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let targets = [LoraTarget::Q, LoraTarget::K, LoraTarget::V];
        let layer = &self.w.layers[l];
        let (y, dtype) = match input {
            // In the residual stream's dtype already (the fused op writes it so).
            AttnIn::Qkv(y) => {
                let dtype = y.dtype();
                (y, dtype)
            }
            AttnIn::Normed(h) => {
                let stacked = if lora.touches(l, &targets) {
                    None
                } else {
                    Linear::forward_stacked(&[&layer.wq, &layer.wk, &layer.wv], &h)?
                };
                match stacked {
                    Some(y) => (y, h.dtype()),
                    None => {
                        let [q, k, v] = self.proj_many(lora, l, targets, &h)?;
                        return Ok((self.heads_first(q, nh)?, self.heads_first(k, nkv)?, self.heads_first(v, nkv)?));
                    }
                }
            }
        };
        // One copy to head-first order, in the rows' dtype (a bf16 product
        // of f32 rows is converted by that copy).
        let total = y.dim(0)?;
        let all = y.reshape((1, total, nh + 2 * nkv, hd))?.transpose(1, 2)?;
        let all = if all.dtype() == dtype { all.contiguous()? } else { all.to_dtype(dtype)? };
        let all = all.squeeze(0)?;
        Ok((all.narrow(0, 0, nh)?, all.narrow(0, nh, nkv)?, all.narrow(0, nh + nkv, nkv)?))
    }

    /// Layer `l`'s queries, keys and values of `h` (`[tokens, hidden]`, no
    /// adapters) as one stacked projection, `[tokens, (q_heads + 2 *
    /// kv_heads) * head_dim]`, contiguous: the one product of stacked
    /// matrices, or the three products side by side.
    fn qkv_rows(&self, l: usize, input: AttnIn) -> Result<Tensor> {
        let layer = &self.w.layers[l];
        let h = match input {
            AttnIn::Qkv(y) => return Ok(y.contiguous()?),
            AttnIn::Normed(h) => h,
        };
        if let Some(y) = Linear::forward_stacked(&[&layer.wq, &layer.wk, &layer.wv], &h)? {
            return Ok(y.contiguous()?);
        }
        let none = BatchAdapters::default();
        let [q, k, v] = self.proj_many(&none, l, [LoraTarget::Q, LoraTarget::K, LoraTarget::V], &h)?;
        let dtype = q.dtype();
        Ok(Tensor::cat(&[q, k.to_dtype(dtype)?, v.to_dtype(dtype)?], 1)?)
    }

    /// `[tokens, heads * head_dim]` projections as `[heads, tokens, head_dim]`, contiguous.
    fn heads_first(&self, t: Tensor, heads: usize) -> Result<Tensor> {
        let total = t.dim(0)?;
        Ok(t.reshape((1, total, heads, self.cfg.head_dim))?.transpose(1, 2)?.contiguous()?.squeeze(0)?)
    }

    /// Decoder layer `l` over the residual stream `x` (`[tokens, hidden]`):
    /// `attend` turning the normed rows into attention rows (its q/k/v
    /// projections, for instance [`Llama::qkv_heads_first`], and the
    /// attention), the output projection and the MLP with `lora`'s updates,
    /// and both residual adds. With `fuse`, each add is left
    /// for the norm after it to take ([`Llama::add_norm`]: one fused op), so
    /// the layer returns its MLP output not yet added, and a stacked gate/up
    /// product takes its activation as one op ([`SiluMul`]). The one layer
    /// body of every step.
    fn layer(
        &self,
        lora: &BatchAdapters<'_>,
        l: usize,
        x: Residual,
        fuse: bool,
        attend: impl FnOnce(AttnIn) -> Result<Tensor>,
    ) -> Result<Residual> {
        let layer = &self.w.layers[l];
        let qkv = [LoraTarget::Q, LoraTarget::K, LoraTarget::V];
        let (x, input) = match self.norm_into((lora, l), &x, Norm::Attn(l), &qkv, &[&layer.wq, &layer.wk, &layer.wv])? {
            Some((x, y)) => (x, AttnIn::Qkv(y)),
            None => {
                let (x, h) = self.add_norm(x, Norm::Attn(l))?;
                (x, AttnIn::Normed(h))
            }
        };
        let attn = attend(input)?;
        let o = self.proj(lora, l, LoraTarget::O, &attn)?;
        let gate_up = [LoraTarget::Gate, LoraTarget::Up];
        let x = Residual::pending(x, o, fuse)?;
        let (x, input) = match self.norm_into((lora, l), &x, Norm::Ffn(l), &gate_up, &[&layer.w_gate, &layer.w_up])? {
            Some((x, y)) => (x, FfnIn::GateUp(y)),
            None => {
                let (x, h) = self.add_norm(x, Norm::Ffn(l))?;
                let stacked = if lora.touches(l, &gate_up) {
                    None
                } else {
                    Linear::forward_stacked(&[&layer.w_gate, &layer.w_up], &h)?
                };
                (x, stacked.map_or(FfnIn::Normed(h), FfnIn::GateUp))
            }
        };
        let inter = self.cfg.intermediate_size;
        // Our dense GEMV takes the activation into the down product: one launch for both.
        if let FfnIn::GateUp(y) = &input {
            if !lora.touches(l, &[LoraTarget::Down]) {
                if let Some(down) = layer.w_down.forward_silu_as(y, x.dtype())? {
                    return Residual::pending(x, down, fuse);
                }
            }
        }
        let prod = match input {
            // One product: with `fuse`, the activation as one op over it.
            FfnIn::GateUp(y) if fuse => SiluMul::new(inter).forward(&y)?,
            // Else its two halves as views.
            FfnIn::GateUp(y) => (candle_nn::ops::silu(&y.narrow(1, 0, inter)?)? * y.narrow(1, inter, inter)?)?,
            FfnIn::Normed(h) => {
                let [gate, up] = self.proj_many(lora, l, gate_up, &h)?;
                (candle_nn::ops::silu(&gate)? * up)?
            }
        };
        // A bf16 gate/up product stays bf16 into a bf16 down matrix (one
        // conversion, of its output; none on our dense GEMV, which writes
        // `x`'s dtype); otherwise the product is f32, as `x`.
        let down = if prod.dtype() != x.dtype()
            && layer.w_down.dense_dtype() == Some(prod.dtype())
            && !lora.touches(l, &[LoraTarget::Down])
        {
            layer.w_down.forward_as(&prod, x.dtype())?
        } else {
            self.proj(lora, l, LoraTarget::Down, &prod.to_dtype(x.dtype())?)?
        };
        Residual::pending(x, down, fuse)
    }

    /// The final norm and LM head over the residual stream `x` (`[rows,
    /// hidden]`): f32 logits.
    fn logits_of(&self, x: Residual) -> Result<Tensor> {
        let (_, x) = self.add_norm(x, Norm::Last)?;
        // A quantized head takes f32 rows; a dense one converts its own input.
        let x = if self.w.lm_head.dense_dtype().is_none() { x.to_dtype(DType::F32)? } else { x };
        // f32 logits: our dense GEMV writes them so from bf16 rows (one launch); otherwise converted.
        self.w.lm_head.forward_as(&x, DType::F32)
    }

    /// The residual stream summed, and norm `which` of it: a pending add
    /// and its norm as one fused op ([`AddRmsNorm`]).
    fn add_norm(&self, x: Residual, which: Norm) -> Result<(Tensor, Tensor)> {
        match x {
            Residual::Summed(x) => {
                let h = self.rms(&x, which)?;
                Ok((x, h))
            }
            Residual::Pending(x, delta) => {
                let w = self.norm_weight(which, x.dtype());
                AddRmsNorm::new(self.cfg.rms_norm_eps as f32).forward(&delta.to_dtype(x.dtype())?, &x, w)
            }
        }
    }

    /// A pending residual add and norm `which` fused into the product of the
    /// stack `ls` (no adapter on `targets`): `(x + delta, the product)` in
    /// one launch where our dense GEMV takes it
    /// ([`Linear::forward_stacked_norm`]); `None` for a summed stream, an
    /// adapter, or a product the op does not take.
    fn norm_into(
        &self,
        (lora, l): (&BatchAdapters<'_>, usize),
        x: &Residual,
        which: Norm,
        targets: &[LoraTarget],
        ls: &[&Linear],
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Residual::Pending(x, delta) = x else { return Ok(None) };
        if lora.touches(l, targets) {
            return Ok(None);
        }
        let g = self.norm_weight(which, x.dtype());
        Linear::forward_stacked_norm(ls, (x, delta), g, self.cfg.rms_norm_eps as f32)
    }

    /// Norm `which`'s weight for rows of `dtype`: the 16-bit copy when the
    /// rows are in its dtype, else the f32 one.
    fn norm_weight(&self, which: Norm, dtype: DType) -> &Tensor {
        let low = self.low.as_ref().filter(|n| n.dtype == dtype);
        match (which, low) {
            (Norm::Attn(l), None) => &self.w.layers[l].attn_norm,
            (Norm::Ffn(l), None) => &self.w.layers[l].ffn_norm,
            (Norm::Last, None) => &self.w.norm,
            (Norm::Attn(l), Some(n)) => &n.attn[l],
            (Norm::Ffn(l), Some(n)) => &n.ffn[l],
            (Norm::Last, Some(n)) => &n.last,
        }
    }

    /// RMSNorm `which` of `x`, with its weight in `x`'s dtype (f32, or the
    /// 16-bit one of [`Llama::step_dtype`]).
    fn rms(&self, x: &Tensor, which: Norm) -> Result<Tensor> {
        let w = self.norm_weight(which, x.dtype());
        Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_norm_eps as f32)?)
    }

    /// The dtype a fixed-buffer decode step over `kv` computes in: the
    /// cache's when it is 16-bit and every layer matrix is dense in it (the
    /// residual stream, norms, rotations and attention all in bf16 or f16,
    /// as transformers runs a bf16 model: no conversion around any product),
    /// else f32. The logits are f32 either way.
    pub(super) fn step_dtype(&self, kv: &KvCache) -> DType {
        match &self.low {
            Some(n) if n.dtype == kv.shape().dtype && kv.has_tensor_pools() => n.dtype,
            _ => DType::F32,
        }
    }

    /// One decode step that reads every input from `inputs`' buffers and
    /// uploads nothing, so that a CUDA graph can capture it (see
    /// [`super::graph`]): one token per row, full depth, no adapters, decode
    /// attention on the paged op. Returns the logits of every row,
    /// `[rows, vocab]`. The KV lengths are not advanced.
    pub(super) fn fixed_decode(&self, inputs: &FixedInputs, kv: &mut KvCache) -> Result<Tensor> {
        let none = BatchAdapters::default();
        let mut x = Residual::Summed(self.w.embed.forward_as(&inputs.ids, inputs.dtype)?);
        for l in 0..self.cfg.num_layers {
            // Each residual add fused with the norm after it, and RoPE with
            // the KV write: one launch each.
            let dtype = x.dtype();
            x = self.layer(&none, l, x, true, |input| {
                let qkv = self.qkv_rows(l, input)?.to_dtype(kv.shape().dtype)?;
                let q = kv.rope_write(l, &qkv, &inputs.rope, &inputs.slots)?;
                Ok(inputs.paged.forward(&q, kv.tensor_pools(l)?)?.to_dtype(dtype)?)
            })?;
        }
        self.logits_of(x)
    }

    /// The inputs of [`Llama::fixed_decode`] for `batch` (one-token chunks,
    /// in cached blocks [`KvCache::reserve`] took), padded to `rows` by
    /// repeating its last chunk (a padding row recomputes that chunk's key
    /// and value and writes the same numbers to the same slot), with block
    /// tables `width` blocks wide. Fresh tensors: the first of a graph's
    /// are its buffers, later ones are copied into them.
    pub(super) fn fixed_inputs(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &KvCache,
        rows: usize,
        width: usize,
    ) -> Result<FixedInputs> {
        let last = *batch.last().ok_or_else(|| Error::InvalidRequest("empty batch".into()))?;
        if batch.len() > rows || batch.iter().any(|c| c.tokens.len() != 1) {
            return Err(Error::InvalidRequest(format!("{} decode rows do not fit a step of {rows}", batch.len())));
        }
        let padded: Vec<SeqChunk<'_>> =
            batch.iter().copied().chain(std::iter::repeat_n(last, rows - batch.len())).collect();
        let starts: Vec<usize> = padded.iter().map(|c| kv.len(c.seq)).collect::<Result<_>>()?;
        let ids: Vec<u32> = padded.iter().map(|c| c.tokens[0]).collect();
        let (cos, sin) = self.rope_angles(&padded, &starts);
        let rope = RopeRows::new(&cos, &sin, self.inv_freq.len(), self.cfg.rope_style.pairs(), &self.device)?;
        let slots = kv.token_slots(&padded.iter().map(|c| (c.seq, 1)).collect::<Vec<_>>())?;
        let lens: Vec<(SeqId, usize)> = padded.iter().zip(&starts).map(|(c, s)| (c.seq, s + 1)).collect();
        let scale = (1.0 / (self.cfg.head_dim as f64).sqrt()) as f32;
        let paged = PagedDecode::with_width(kv, &lens, self.cfg.num_heads, scale, width, &self.device)?;
        let (dtype, ids) = (self.step_dtype(kv), Tensor::from_vec(ids, rows, &self.device)?);
        Ok(FixedInputs { rows, dtype, ids, rope, slots, paged })
    }

    /// CALM state propagation: writes layer `l`'s K/V for every exited chunk
    /// from its exit hidden state (see [`super::exit`]).
    fn propagate_exited(
        &self,
        l: usize,
        exits: &ExitState,
        batch: &[SeqChunk<'_>],
        (cos, sin): (&Tensor, &Tensor),
        kv: &mut KvCache,
    ) -> Result<()> {
        let Some(xe) = &exits.exited_x else { return Ok(()) };
        let layer = &self.w.layers[l];
        let nkv = self.cfg.num_kv_heads;
        let h = self.rms(xe, Norm::Attn(l))?;
        let (ec, es) = (select(cos, &exits.exited_rows, &self.device)?, select(sin, &exits.exited_rows, &self.device)?);
        let k = self.heads_first(layer.wk.forward(&h)?, nkv)?;
        let k = self.rope(&k.unsqueeze(0)?, &ec, &es)?.squeeze(0)?;
        let v = self.heads_first(layer.wv.forward(&h)?, nkv)?;
        let slots = kv.slots(&exits.exited.iter().map(|c| (batch[*c].seq, 1)).collect::<Vec<_>>())?;
        kv.write(l, (&k, &v), &slots)?;
        Ok(())
    }

    /// Layer `l`'s projection `t` of `x`, with each chunk's adapter update on
    /// its rows. The one place the layer's matrices are applied.
    fn proj(&self, lora: &BatchAdapters<'_>, l: usize, t: LoraTarget, x: &Tensor) -> Result<Tensor> {
        lora.project(l, t, self.w.layers[l].linear(t), x)
    }

    /// Layer `l`'s projections `targets` of the same `x`, their base
    /// products in one kernel pass where the format allows.
    fn proj_many<const N: usize>(
        &self,
        lora: &BatchAdapters<'_>,
        l: usize,
        targets: [LoraTarget; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let ws = targets.map(|t| self.w.layers[l].linear(t));
        let out = lora.project_many(l, &targets, &ws, x)?;
        // One result per target, by construction.
        Ok(out.try_into().unwrap_or_else(|v: Vec<Tensor>| unreachable!("{} results for {N} targets", v.len())))
    }

    pub(super) fn check_batch(&self, batch: &[SeqChunk<'_>], kv: &KvCache) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::InvalidRequest("empty batch".into()));
        }
        for (i, c) in batch.iter().enumerate() {
            if c.tokens.is_empty() {
                return Err(Error::InvalidRequest(format!("sequence {} has no tokens this step", c.seq.0)));
            }
            if let Some(t) = c.tokens.iter().find(|t| **t as usize >= self.cfg.vocab_size) {
                return Err(Error::InvalidRequest(format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
            if !kv.contains(c.seq) {
                return Err(Error::UnknownSequence(c.seq.0));
            }
            if batch[..i].iter().any(|o| o.seq == c.seq) {
                return Err(Error::InvalidRequest(format!("sequence {} appears twice in one step", c.seq.0)));
            }
        }
        Ok(())
    }

    /// cos and sin of every token's rotation, `[tokens, head_dim / 2]`,
    /// computed in f32 exactly as transformers does (`pos * inv_freq`).
    fn rope_tables(&self, batch: &[SeqChunk<'_>], starts: &[usize]) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = self.rope_angles(batch, starts);
        let shape = (cos.len() / self.inv_freq.len(), self.inv_freq.len());
        Ok((Tensor::from_vec(cos, shape, &self.device)?, Tensor::from_vec(sin, shape, &self.device)?))
    }

    /// [`Llama::rope_tables`] on the host: `[tokens, head_dim / 2]` each, row-major.
    fn rope_angles(&self, batch: &[SeqChunk<'_>], starts: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let total: usize = batch.iter().map(|c| c.tokens.len()).sum();
        let mut cos = Vec::with_capacity(total * self.inv_freq.len());
        let mut sin = Vec::with_capacity(total * self.inv_freq.len());
        for (c, start) in batch.iter().zip(starts) {
            for p in *start..start + c.tokens.len() {
                for f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        (cos, sin)
    }

    /// Head-first queries, keys and values ([`Llama::qkv_heads_first`]),
    /// queries and keys rotated by the tokens' `cos` and `sin`.
    fn rope_qkv(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let q = self.rope(&q.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        let k = self.rope(&k.unsqueeze(0)?, cos, sin)?.squeeze(0)?;
        Ok((q, k, v))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    }

    /// Whether a chunk of `n` tokens runs as decode rows: one-token chunks,
    /// and every row of a per-row step, on the CPU decode kernel or the
    /// paged attention op (elsewhere attention is a matmul per chunk).
    fn decode_rows(&self, n: usize, per_row: bool) -> bool {
        (n == 1 || per_row) && (self.paged_attention || self.device.is_cpu())
    }

    /// The decode chunks `(first row, n, start)` of `batch` and their
    /// sequences, in batch order.
    fn decode_chunks(
        &self,
        batch: &[SeqChunk<'_>],
        starts: &[usize],
        per_row: bool,
    ) -> (Vec<(usize, usize, usize)>, Vec<SeqId>) {
        let (mut chunks, mut seqs) = (Vec::new(), Vec::new());
        let mut off = 0;
        for (c, &start) in batch.iter().zip(starts) {
            let n = c.tokens.len();
            if self.decode_rows(n, per_row) {
                chunks.push((off, n, start));
                seqs.push(c.seq);
            }
            off += n;
        }
        (chunks, seqs)
    }

    /// What every layer's attention over `batch` shares, computed once (the
    /// blocks are reserved): where the new keys go and, on the paged op, the
    /// decode rows' query indexes and block tables.
    fn prepare_attention(
        &self,
        batch: &[SeqChunk<'_>],
        starts: &[usize],
        per_row: bool,
        kv: &KvCache,
    ) -> Result<PreparedAttention> {
        let slots = kv.slots(&batch.iter().map(|c| (c.seq, c.tokens.len())).collect::<Vec<_>>())?;
        let (chunks, seqs) = self.decode_chunks(batch, starts, per_row);
        let op = if self.paged_attention && !chunks.is_empty() {
            // Each row by itself, at its own length, in one call.
            let (mut rows, mut lens) = (Vec::new(), Vec::new());
            for (&(row, n, start), seq) in chunks.iter().zip(&seqs) {
                for j in 0..n {
                    rows.push((row + j) as u32);
                    lens.push((*seq, start + j + 1));
                }
            }
            let scale = (1.0 / (self.cfg.head_dim as f64).sqrt()) as f32;
            let op = PagedDecode::new(kv, &lens, self.cfg.num_heads, scale, &self.device)?;
            Some((Tensor::from_vec(rows, lens.len(), &self.device)?, op))
        } else {
            None
        };
        Ok(PreparedAttention { slots, chunks, seqs, op })
    }

    /// Attention of layer `l` for every chunk, given the head-first queries,
    /// keys and values ([`Llama::qkv_heads_first`]); returns `[tokens, heads * head_dim]`.
    /// `per_row` computes multi-token chunks as [`Attention::PerRow`] says;
    /// `prepared` is [`Llama::prepare_attention`] for this batch, if the
    /// step made it.
    fn attention(
        &self,
        (l, per_row): (usize, bool),
        (q, k, v): (Tensor, Tensor, Tensor),
        batch: &[SeqChunk<'_>],
        starts: &[usize],
        (cos, sin): (&Tensor, &Tensor),
        (kv, prepared): (&mut KvCache, Option<&PreparedAttention>),
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let total = q.dim(1)?;
        let (q, k, v) = self.rope_qkv((q, k, v), (cos, sin))?;

        let group = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let own;
        let prep = match prepared {
            Some(p) => p,
            None => {
                own = self.prepare_attention(batch, starts, per_row, kv)?;
                &own
            }
        };
        // Every chunk's K/V goes into the cache first; then the decode rows
        // of all chunks run in one pass (the CPU kernel's parallel pass, or
        // one op call), `[rows, heads * hd]`; the other chunks one by one.
        kv.write(l, (&k, &v), &prep.slots)?;
        let (chunks, seqs) = (&prep.chunks, &prep.seqs);
        let decoded = if chunks.is_empty() {
            None
        } else if let Some((ids, op)) = &prep.op {
            let qr = q.transpose(0, 1)?.contiguous()?.reshape((total, nh * hd))?.index_select(ids, 0)?;
            Some(op.forward(&qr, kv.tensor_pools(l)?)?)
        } else {
            let q_rows = q.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let rows = chunks.iter().map(|(_, n, _)| n).sum::<usize>();
            let mut out = vec![0f32; rows * nh * hd];
            let views = seqs.iter().map(|s| kv.host_view(*s, l)).collect::<Result<Vec<_>>>()?;
            decode_attention(&q_rows, &views, chunks, &self.cfg, scale, &mut out)?;
            Some(Tensor::from_vec(out, (rows, nh * hd), &self.device)?)
        };
        let mut outs = Vec::with_capacity(batch.len());
        let (mut off, mut dec_off) = (0, 0);
        for (c, &start) in batch.iter().zip(starts) {
            let n = c.tokens.len();
            if let (true, Some(d)) = (self.decode_rows(n, per_row), &decoded) {
                outs.push(d.narrow(0, dec_off, n)?);
                dec_off += n;
                off += n;
                continue;
            }
            // The keys and values attended over, `[kv_heads, start + n, hd]`:
            // a fresh prompt's are its own, a continuation's come from its blocks.
            let (keys, values) = if start == 0 {
                (k.narrow(1, off, n)?.contiguous()?, v.narrow(1, off, n)?.contiguous()?)
            } else {
                kv.history(c.seq, l, start + n)?
            };
            if per_row && n > 1 {
                outs.push(self.attention_per_row(&q.narrow(1, off, n)?, (&keys, &values), start, scale)?);
                off += n;
                continue;
            }
            let len = start + n;
            // GQA without copying K/V per query head: fold the query heads that
            // share a KV head into the row dimension, [kv_heads, group * n, hd].
            let qi = q.narrow(1, off, n)?.contiguous()?.reshape((nkv, group * n, hd))?;
            let scores = (qi.matmul(&keys.t()?)? * scale)?;
            let scores = if n > 1 {
                let mask = causal_mask(start, n, len, &self.device)?;
                scores.reshape((nkv, group, n, len))?.broadcast_add(&mask)?.reshape((nkv, group * n, len))?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&values)?; // [nkv, group*n, hd]
            let o = o.reshape((nh, n, hd))?.transpose(0, 1)?.reshape((n, nh * hd))?;
            outs.push(o);
            off += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Attention of `q` (`[heads, n, hd]`, positions `start..start + n`)
    /// query by query, each against exactly its own prefix of keys, with the
    /// shapes and operations a one-token decode step uses, so each row's
    /// result is bit-identical to that step's. Returns `[n, heads * hd]`.
    fn attention_per_row(
        &self,
        q: &Tensor,
        (keys, values): (&Tensor, &Tensor),
        start: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let group = nh / nkv;
        let n = q.dim(1)?;
        let mut rows = Vec::with_capacity(n);
        for j in 0..n {
            let len = start + j + 1;
            let (kj, vj) = (keys.narrow(1, 0, len)?, values.narrow(1, 0, len)?);
            let qi = q.narrow(1, j, 1)?.contiguous()?.reshape((nkv, group, hd))?;
            let scores = (qi.matmul(&kj.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&vj.contiguous()?)?;
            rows.push(o.reshape((nh, 1, hd))?.transpose(0, 1)?.reshape((1, nh * hd))?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

/// What a step's attention computes once for all its layers
/// ([`Llama::prepare_attention`]).
struct PreparedAttention {
    /// Where the step's new keys and values go.
    slots: StepSlots,
    /// The decode chunks `(first row, n, start)` and their sequences
    /// ([`Llama::decode_chunks`]).
    chunks: Vec<(usize, usize, usize)>,
    seqs: Vec<SeqId>,
    /// On the paged op: the decode rows' indexes among the step's rows, and
    /// the op with their block tables.
    op: Option<(Tensor, PagedDecode)>,
}

/// Attention of decode rows on the CPU: for each chunk `(row, n, start)` of
/// `chunks`, the `n` query rows of `q` (`[tokens, heads * head_dim]`) from
/// `row` on, at positions `start..start + n`, each over exactly its own
/// prefix of the chunk's sequence in the paged cache (`views`, see
/// [`arqon_kernels::attention`]); all rows in one parallel pass. Writes
/// `out` (`[rows, heads * head_dim]`), the chunks' rows one after another.
fn decode_attention(
    q: &[f32],
    views: &[[(&[f32], CacheView<'_>); 2]],
    chunks: &[(usize, usize, usize)],
    cfg: &ModelConfig,
    scale: f64,
    out: &mut [f32],
) -> Result<()> {
    use arqon_kernels::attention::{decode_gqa_rows, DecodeRow, DecodeShape};
    let width = cfg.num_heads * cfg.head_dim;
    let mut rows = Vec::with_capacity(out.len() / width);
    for (&[k, v], &(row, n, start)) in views.iter().zip(chunks) {
        let qs = q
            .get(row * width..(row + n) * width)
            .ok_or_else(|| Error::InvalidRequest("decode attention: fewer queries than rows".into()))?;
        for (j, q) in qs.chunks_exact(width).enumerate() {
            rows.push(DecodeRow { q, k, v, len: start + j + 1 });
        }
    }
    let shape = DecodeShape { heads: cfg.num_heads, kv_heads: cfg.num_kv_heads, head_dim: cfg.head_dim, len: 0 };
    decode_gqa_rows(&rows, shape, scale as f32, out).map_err(|e| Error::InvalidRequest(e.to_string()))
}

/// `[n, len]` additive mask: query `j` (at position `start + j`) sees keys `0..=start + j`.
fn causal_mask(start: usize, n: usize, len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..n).flat_map(|j| (0..len).map(move |t| if t > start + j { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (n, len), device)?)
}

/// Index of the largest logit (the lowest index on ties, never a NaN; 0 when
/// none is above -inf, or for no logits), as greedy decoding takes it: our
/// argmax kernel's reference, so the host and the GPU pick alike.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut id = [0i32];
    match arqon_kernels::reference::sampling::argmax(logits, logits.len(), &mut id) {
        Ok(()) => id[0] as u32,
        Err(_) => 0, // no logits
    }
}

/// Rows of a `[rows, vocab]` logits tensor as vectors.
pub fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stacked q/k/v give keys and values as row ranges of one tensor: the
    /// cache's tensor pools (a GPU's) scatter them from those views as the
    /// host pools copy them, so a continuation that reads them back sees the
    /// same history.
    #[test]
    fn stacked_keys_and_values_land_in_tensor_pools_as_in_host_pools() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let m = crate::engine::load_on(&path, &Device::Cpu).unwrap().model;
        let l0 = &m.weights().layers[0];
        let x = Tensor::zeros((1, m.config().hidden_size), DType::F32, &Device::Cpu).unwrap();
        assert!(Linear::forward_stacked(&[&l0.wq, &l0.wk, &l0.wv], &x).unwrap().is_some(), "q/k/v are stacked");
        let mut host = KvCache::growable(m.kv_shape(), Device::Cpu);
        let mut pools = KvCache::for_paged_op(m.kv_shape(), 16, Device::Cpu).unwrap();
        let (prompt, more): (Vec<u32>, Vec<u32>) = ((3..40).collect(), (50..55).collect());
        let mut out = Vec::new();
        for kv in [&mut host, &mut pools] {
            kv.add(SeqId(0)).unwrap();
            let mut step = |t: &[u32]| {
                let chunk = [SeqChunk { seq: SeqId(0), tokens: t, adapter: None }];
                rows(&m.forward(&chunk, kv, LogitsFor::AllPositions).unwrap()).unwrap()
            };
            out.push((step(&prompt), step(&more)));
        }
        assert_eq!(out[0], out[1]);
    }

    /// The fused RoPE + KV write ([`KvCache::rope_write`]) against candle's
    /// RoPE and the cache's scatter: the same rotated queries (as rows) and
    /// the same pools, bit for bit, in f32, bf16 and f16, for both pairings, with
    /// stacked q/k/v and with three products side by side; the rest of the
    /// pools untouched. A step larger than the room for queries, or a cache
    /// of host pools, does not take it.
    #[test]
    fn the_fused_rope_and_kv_write_equals_rope_then_scatter() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let base = crate::engine::load_on(&path, &Device::Cpu).unwrap().model;
        let none = BatchAdapters::default();
        let mut rng = arqon_kernels::reference::rng::TestRng::new(7);
        for style in [RopeStyle::HalfSplit, RopeStyle::Interleaved] {
            let cfg = ModelConfig { rope_style: style, ..base.config().clone() };
            let stacked = Llama::new(cfg.clone(), base.weights().clone(), Device::Cpu).unwrap();
            let apart = Llama::new(cfg.clone(), base.weights().unstacked(), Device::Cpu).unwrap();
            let (l0, x) =
                (&apart.weights().layers[0], Tensor::zeros((1, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap());
            assert!(Linear::forward_stacked(&[&l0.wq, &l0.wk, &l0.wv], &x).unwrap().is_none(), "apart");
            for (m, dtype) in
                [(&stacked, DType::F32), (&stacked, DType::BF16), (&stacked, DType::F16), (&apart, DType::F32)]
            {
                let shape = KvShape { dtype, ..m.kv_shape() };
                let (mut fused, mut plain) = (
                    KvCache::for_paged_op(shape, 6, Device::Cpu).unwrap(),
                    KvCache::for_paged_op(shape, 6, Device::Cpu).unwrap(),
                );
                let lens = [0usize, 17, 40];
                let toks = [[4u32], [5], [6]];
                let batch: Vec<SeqChunk<'_>> = toks
                    .iter()
                    .enumerate()
                    .map(|(i, t)| SeqChunk { seq: SeqId(i as u64), tokens: t, adapter: None })
                    .collect();
                for kv in [&mut fused, &mut plain] {
                    for (c, n) in batch.iter().zip(lens) {
                        kv.add(c.seq).unwrap();
                        kv.reserve(&[(c.seq, n + 1)]).unwrap();
                        kv.advance(c.seq, &vec![0; n]).unwrap();
                    }
                }
                let h = Tensor::from_vec(rng.vec(3 * cfg.hidden_size, -1.0, 1.0), (3, cfg.hidden_size), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (cos, sin) = m.rope_tables(&batch, &lens).unwrap();
                let (hc, hs) = m.rope_angles(&batch, &lens);
                let rope = RopeRows::new(&hc, &hs, cfg.head_dim / 2, style.pairs(), &Device::Cpu).unwrap();
                let at: Vec<(SeqId, usize)> = batch.iter().map(|c| (c.seq, 1)).collect();
                let l = 1;
                // Fused.
                let qkv = m.qkv_rows(l, AttnIn::Normed(h.clone())).unwrap().to_dtype(dtype).unwrap();
                assert!(fused.fuses_rope(3));
                let q_fused = fused.rope_write(l, &qkv, &rope, &fused.token_slots(&at).unwrap()).unwrap();
                // Candle's RoPE in the step's dtype, then the scatter.
                let (cd, sd) = (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap());
                let (q, k, v) =
                    m.rope_qkv(m.qkv_heads_first(&none, l, AttnIn::Normed(h.clone())).unwrap(), (&cd, &sd)).unwrap();
                plain.write(l, (&k, &v), &plain.slots(&at).unwrap()).unwrap();
                let q_plain = q
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((3, cfg.num_heads * cfg.head_dim))
                    .unwrap();
                let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let what = format!("{style:?} {dtype:?} stacked={}", std::ptr::eq(m, &stacked));
                assert_eq!(f(&q_fused), f(&q_plain), "{what}: queries");
                for layer in 0..cfg.num_layers {
                    let ((fk, fv), (pk, pv)) = (fused.tensor_pools(layer).unwrap(), plain.tensor_pools(layer).unwrap());
                    assert_eq!(f(fk), f(pk), "{what}: keys of layer {layer}");
                    assert_eq!(f(fv), f(pv), "{what}: values of layer {layer}");
                }
                assert!(f(fused.tensor_pools(l).unwrap().0).iter().any(|x| *x != 0.0), "{what}: keys were written");
            }
        }
        // More rows than the room for queries: not fused, nothing written.
        let rows = super::super::kv::QUERY_ROWS + 1;
        let mut kv = KvCache::for_paged_op(base.kv_shape(), rows, Device::Cpu).unwrap();
        let at: Vec<(SeqId, usize)> = (0..rows as u64).map(|i| (SeqId(i), 1)).collect();
        for (s, n) in &at {
            kv.add(*s).unwrap();
            kv.reserve(&[(*s, *n)]).unwrap();
        }
        let cfg = base.config();
        let width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
        let qkv = Tensor::ones((rows, width), DType::F32, &Device::Cpu).unwrap();
        let table = vec![1f32; rows * cfg.head_dim / 2];
        let rope = RopeRows::new(&table, &table, cfg.head_dim / 2, cfg.rope_style.pairs(), &Device::Cpu).unwrap();
        assert!(!kv.fuses_rope(rows));
        assert!(kv.rope_write(0, &qkv, &rope, &kv.token_slots(&at).unwrap()).is_err());
        let keys = kv.tensor_pools(0).unwrap().0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(keys.iter().all(|x| *x == 0.0));
        assert!(!KvCache::growable(base.kv_shape(), Device::Cpu).fuses_rope(1), "host pools");
    }

    /// The GPU's dtype paths, on the CPU: bf16 dense matrices (stacked q/k/v
    /// converted by their head-first copy, a bf16 gate/up product into a
    /// bf16 down matrix) give the f32 model's logits within bf16 rounding.
    #[test]
    fn bf16_dense_layers_follow_the_f32_model() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let f32_model = crate::engine::load_on(&path, &Device::Cpu).unwrap().model;
        assert!(f32_model.weights().layers[0].wq.dense_dtype() == Some(DType::F32));
        let cfg = f32_model.config().clone();
        let bf16 = Llama::new(cfg, f32_model.weights().dense_layers_as(DType::BF16).unwrap(), Device::Cpu).unwrap();
        let prompt: Vec<u32> = (3..40).collect();
        let logits = |m: &Llama| {
            let mut kv = m.new_kv_cache();
            kv.add(SeqId(0)).unwrap();
            let mut out = Vec::new();
            let chunk = [SeqChunk { seq: SeqId(0), tokens: &prompt, adapter: None }];
            out.push(rows(&m.forward(&chunk, &mut kv, LogitsFor::LastOfEachChunk).unwrap()).unwrap().remove(0));
            for t in [5u32, 9, 11] {
                let chunk = [SeqChunk { seq: SeqId(0), tokens: &[t], adapter: None }];
                out.push(rows(&m.forward(&chunk, &mut kv, LogitsFor::LastOfEachChunk).unwrap()).unwrap().remove(0));
            }
            out
        };
        let (a, b) = (logits(&f32_model), logits(&bf16));
        for (x, y) in a.iter().zip(&b) {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(worst > 0.0, "the bf16 model really runs in bf16");
            assert!(worst < 0.05 * scale.max(1.0), "largest difference {worst} at logit scale {scale}");
        }
    }

    #[test]
    fn a_model_with_a_matrix_on_candles_quantized_kernels_is_not_captured() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let dense = crate::engine::load_on(&path, &Device::Cpu).unwrap().model;
        assert_eq!(dense.not_capturable(1), None);
        let mut w = dense.weights().clone();
        // A storage of its own: wq is a view of the stacked q/k/v matrix, and candle quantizes a view's whole storage.
        let view = w.layers[0].wq.to_dense().unwrap();
        let dense_wq =
            Tensor::from_vec(view.flatten_all().unwrap().to_vec1::<f32>().unwrap(), view.shape(), &Device::Cpu)
                .unwrap();
        let q = QTensor::quantize(&dense_wq, GgmlDType::Q4_0).unwrap();
        w.layers[0].wq = super::super::weights::Linear::from_qtensor_on(std::sync::Arc::new(q), &Device::Cpu).unwrap();
        let quantized = Llama::new(dense.config().clone(), w, Device::Cpu).unwrap();
        let why = quantized.not_capturable(4).expect("one matrix on candle's quantized kernels");
        assert!(why.starts_with("1 matrices run on candle's quantized kernels at 4 rows"), "{why}");
        assert!(why.contains("as it grows (a graph would keep the old one)"), "{why}");
        // Our quantized GEMV takes up to 8 rows of it: those steps may be captured, larger ones not.
        let ours = Some(arqon_kernels::KernelPlan {
            quantized: arqon_kernels::plan::QuantizedVariant::Ours,
            ..arqon_kernels::KernelPlan::default()
        });
        for rows in [1, 8] {
            assert_eq!(quantized.not_capturable_under(rows, ours), None, "{rows} rows");
        }
        assert!(quantized.not_capturable_under(16, ours).is_some());
        assert!(quantized.not_capturable_under(1, Some(arqon_kernels::KernelPlan::default())).is_some());
    }

    /// Every layer matrix requantized: `Q8_0` follows the f32 model and
    /// `Q4_1` less closely, the formats are the ones asked for, and the
    /// embedding and LM head are untouched.
    #[test]
    fn a_requantized_model_holds_its_layers_in_the_format_asked_for() {
        use candle_core::quantized::GgmlDType;
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let dense = crate::engine::load_on(&path, &Device::Cpu).unwrap().model;
        let prompt: Vec<u32> = (3..30).collect();
        let logits = |m: &Llama| {
            let mut kv = KvCache::growable(m.kv_shape(), Device::Cpu);
            kv.add(SeqId(0)).unwrap();
            let chunk = [SeqChunk { seq: SeqId(0), tokens: &prompt, adapter: None }];
            rows(&m.forward(&chunk, &mut kv, LogitsFor::AllPositions).unwrap()).unwrap()
        };
        let reference = logits(&dense);
        let mut errors = Vec::new();
        for format in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = dense.requantized(format).unwrap();
            for layer in &q.weights().layers {
                assert!(LoraTarget::ALL.iter().all(|t| layer.linear(*t).format() == format), "{format:?}");
            }
            assert_eq!(q.weights().lm_head.format(), dense.weights().lm_head.format());
            let (worst, scale) = worst(&reference, &logits(&q));
            assert!(worst > 0.0, "{format:?}: the matrices really are quantized");
            errors.push(worst / scale);
        }
        // The fixture's random weights (0.2 apart at init) make its logits touchy: measured 7% of the
        // logit scale for Q8_0 and 61% for Q4_1.
        assert!(errors[0] < 0.15, "Q8_0: {errors:?}");
        assert!(errors[1] > 3.0 * errors[0], "4 bits lose more than 8: {errors:?}");
    }

    /// Largest logit difference between two runs' rows, and the first run's logit scale.
    fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
        let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y)).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        (worst, scale)
    }

    /// A 16-bit KV cache (tensor pools; host pools refuse one): keys and
    /// values rounded on their way in and read back as f32, by the matmul
    /// attention's history and by the paged op (queries converted to the
    /// pools' dtype and rows back), within bf16 rounding of the f32 cache.
    /// Over a bf16 cache a bf16 model's fixed-buffer decode steps compute in
    /// bf16 throughout and still follow the f32 model. And with every fusion
    /// of the fixed-buffer step (a stacked f32 model), those steps give the
    /// eager steps' logits bit for bit.
    #[test]
    fn a_bf16_kv_cache_holds_what_an_f32_one_does_within_rounding() {
        use super::super::graph::{DecodeGraphs, DecodePath};
        // The default model (its 64-wide heads fit the paged op), dense f32.
        let path = crate::fetch::resolve(crate::fetch::DEFAULT_MODEL, &crate::config::fetch_options(None, true));
        let q4 = crate::engine::load_on(&path.unwrap(), &Device::Cpu).unwrap().model;
        let f32_model = q4.dequantized(&LoraTarget::ALL).unwrap();
        let shape = KvShape { dtype: DType::BF16, ..f32_model.kv_shape() };
        assert_eq!(2 * shape.block_bytes(), f32_model.kv_shape().block_bytes());
        let err = KvCache::new(shape, 4, Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("tensor pools"), "{err}");
        let prompt: Vec<u32> = (3..40).collect();
        let feed = [5u32, 9, 11, 2, 17, 23];
        // Prompt logits, then one row per decode step of `feed`.
        let run = |m: &Llama, kv: &mut KvCache, graphs: Option<&mut DecodeGraphs>| -> Vec<Vec<f32>> {
            kv.add(SeqId(0)).unwrap();
            let chunk = [SeqChunk { seq: SeqId(0), tokens: &prompt, adapter: None }];
            let mut out = rows(&m.forward(&chunk, kv, LogitsFor::LastOfEachChunk).unwrap()).unwrap();
            if !m.paged_attention() {
                // The CPU's decode rows read host pools: a continuation chunk
                // (the matmul attention over the gathered history) instead.
                let chunk = [SeqChunk { seq: SeqId(0), tokens: &feed, adapter: None }];
                out.extend(rows(&m.forward(&chunk, kv, LogitsFor::AllPositions).unwrap()).unwrap());
                return out;
            }
            let mut graphs = graphs;
            for t in feed {
                let chunk = [SeqChunk { seq: SeqId(0), tokens: &[t], adapter: None }];
                let logits = match graphs.as_deref_mut() {
                    Some(g) => {
                        let (o, path) = g.forward(m, &chunk, kv, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
                        assert_eq!(path, DecodePath::Fixed);
                        o.logits
                    }
                    None => m.forward(&chunk, kv, LogitsFor::LastOfEachChunk).unwrap(),
                };
                out.extend(rows(&logits).unwrap());
            }
            out
        };
        let paged = Llama::new(f32_model.config().clone(), f32_model.weights().clone(), Device::Cpu)
            .unwrap()
            .with_paged_attention(true)
            .unwrap();
        let reference = run(&paged, &mut KvCache::growable_tensors(f32_model.kv_shape(), Device::Cpu), None);
        for m in [&f32_model, &paged] {
            let mut kv = KvCache::for_paged_op(shape, 16, Device::Cpu).unwrap();
            assert_eq!(m.step_dtype(&kv), DType::F32, "an f32 model computes in f32");
            let (worst, scale) = worst(&reference, &run(m, &mut kv, None));
            assert!(worst > 0.0, "the keys really are rounded");
            assert!(worst < 0.02 * scale.max(1.0), "paged op {}: {worst} at logit scale {scale}", m.paged_attention());
        }
        // The model's dense matrices in `dtype`, stacked as at load, on the paged op.
        let dense = |dtype| {
            let w = f32_model.weights().dense_layers_as(dtype).unwrap();
            Llama::new(f32_model.config().clone(), w, Device::Cpu).unwrap().with_paged_attention(true).unwrap()
        };
        let bf16 = dense(DType::BF16);
        assert_eq!(bf16.dense_dtype(), Some(DType::BF16));
        let mut kv = KvCache::for_paged_op(shape, 16, Device::Cpu).unwrap();
        assert_eq!(bf16.step_dtype(&kv), DType::BF16);
        assert_eq!(bf16.step_dtype(&KvCache::for_paged_op(f32_model.kv_shape(), 4, Device::Cpu).unwrap()), DType::F32);
        let fixed = run(&bf16, &mut kv, Some(&mut DecodeGraphs::new(true)));
        let (worst, scale) = worst(&reference[1..], &fixed[1..]);
        assert!(worst < 0.1 * scale.max(1.0), "bf16 decode steps: {worst} at logit scale {scale}");
        // (Measured: 1.35 at scale 29, and the f32 model over a bf16 cache
        // 0.26 at 36.) Greedy picks are the f32 model's at every step.
        let picks = |r: &[Vec<f32>]| r.iter().map(|row| argmax(row)).collect::<Vec<_>>();
        assert_eq!(picks(&fixed), picks(&reference));
        // The f32 model stacked (one q/k/v product, one gate/up product) over
        // an f32 cache: its fixed-buffer steps take the fused RoPE + KV write
        // and the fused SiLU-and-multiply, and give its eager steps' logits
        // bit for bit. (Its products differ from the unstacked model's by
        // summation order: 0.04 at logit scale 36.)
        let stacked = dense(DType::F32);
        let tensors = || KvCache::growable_tensors(f32_model.kv_shape(), Device::Cpu);
        let fixed = run(&stacked, &mut tensors(), Some(&mut DecodeGraphs::new(true)));
        assert_eq!(fixed, run(&stacked, &mut tensors(), None), "stacked f32 decode steps");
    }
}
