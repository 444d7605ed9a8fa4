//! Decode steps on fixed buffers, captured as CUDA graphs and replayed.
//!
//! For a model as small as SmolLM2-135M a decode step is about a thousand
//! kernel launches of a few microseconds of work each: launching them, not
//! running them, is the cost. A CUDA graph records a step's launches once and
//! replays them with one call. What a graph replays must read its inputs
//! where they were at capture and upload nothing, so a graphed step
//! ([`Llama::fixed_decode`]) reads every per-step input (token ids, rotary
//! tables, KV slots, block tables, context lengths) from buffers that keep
//! their addresses; before each replay the step's inputs are built as usual
//! and copied into them ([`FixedInputs::refill`]).
//!
//! A step is captured per shape: rows rounded up to a [`BUCKETS`] size (the
//! extra rows repeat the last sequence, writing the same numbers to the same
//! KV slot), block tables rounded up to a power of two blocks, one shape per
//! model and KV pool. The first step of a shape runs eagerly, and its
//! kernels fill candle's caches of launch parameters; then it is captured.
//! A capture that fails is reported once and that shape runs on its fixed
//! buffers eagerly from then on: serving never depends on capture working.
//! Up to [`KEEP`] shapes are held, the least recently used going first; the
//! shapes of a model or KV cache that has been dropped (a swapped-out
//! variant) go when the next shape is captured.
//! A step that runs a matrix on candle's quantized kernels (GGUF formats on
//! a GPU, unless our quantized GEMV takes the step's rows) is never captured
//! ([`Llama::not_capturable`]): their scratch buffer is replaced when a
//! larger product needs more, and a graph would keep the freed one.
//!
//! Which steps qualify: one token per sequence, no adapter, full depth, the
//! last position's logits, decode attention on the paged op
//! ([`Llama::paged_attention`]) over tensor pools. Everything else runs
//! [`Llama::forward_with`]. On the CPU there is nothing to capture; the
//! fixed-buffer step runs eagerly there, so that tests check it against the
//! ordinary step without a GPU.
//!
//! On by the kernel plan's `decode=graph` (`arqon bench kernels` picks it
//! where replayed steps agree with eager ones and are faster), or on a GPU
//! by `ARQON_CUDA_GRAPHS=on|off`, which overrides the plan.

use std::sync::Weak;

use arqon_kernels::plan::DecodeVariant;
use candle_core::{DType, Device, Tensor};

use super::exit::{StepOutput, StepPlan};
use super::kv::{KvCache, KvShape};
use super::llama::{Llama, LogitsFor, SeqChunk};
use super::paged_op::PagedDecode;
use super::rope_op::RopeRows;
use crate::error::{Error, Result};

/// The row counts a step is captured at; a batch runs at the smallest that
/// holds it. Larger batches run eagerly.
pub const BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// The narrowest block table a step is captured with (128 tokens).
const MIN_WIDTH: usize = 8;

/// Captured shapes kept; the least recently used goes first.
const KEEP: usize = 32;

/// Whether decode steps on `device` run on fixed buffers (and, on a GPU, as
/// graphs): `ARQON_CUDA_GRAPHS=on|off` on a GPU, else the kernel plan.
pub fn enabled_on(device: &Device) -> bool {
    if !device.is_cpu() {
        match std::env::var("ARQON_CUDA_GRAPHS").as_deref() {
            Ok("on") => return true,
            Ok("off") => return false,
            _ => {}
        }
    }
    super::plan::kernel_plan().is_some_and(|p| p.decode == DecodeVariant::Graph)
}

/// The smallest bucket that holds `rows`.
pub fn bucket(rows: usize) -> Option<usize> {
    BUCKETS.into_iter().find(|b| *b >= rows)
}

/// How a step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodePath {
    /// [`Llama::forward_with`].
    Eager,
    /// The fixed-buffer step, run eagerly (the CPU; a GPU shape's first
    /// step, or one whose capture failed).
    Fixed,
    /// A replay of the captured step.
    Graph,
}

impl DecodePath {
    /// Every path, in [`DecodePath::index`] order.
    pub const ALL: [DecodePath; 3] = [DecodePath::Eager, DecodePath::Fixed, DecodePath::Graph];

    /// Its position in [`DecodePath::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its metric label.
    pub fn name(self) -> &'static str {
        match self {
            DecodePath::Eager => "eager",
            DecodePath::Fixed => "fixed",
            DecodePath::Graph => "graph",
        }
    }
}

/// Every per-step input of [`Llama::fixed_decode`], for `rows` rows.
#[derive(Debug)]
pub(crate) struct FixedInputs {
    pub(super) rows: usize,
    /// What the step computes in ([`Llama::step_dtype`]).
    pub(super) dtype: DType,
    /// `[rows]` u32 token ids.
    pub(super) ids: Tensor,
    /// The rows' rotations, as the fused RoPE + KV write reads them.
    pub(super) rope: RopeRows,
    /// `[rows]` i32: the cache slot of each row's key and value ([`KvCache::token_slots`]).
    pub(super) slots: Tensor,
    /// Decode attention with the rows' block tables and lengths.
    pub(super) paged: PagedDecode,
}

impl FixedInputs {
    /// Copies `fresh` (the same shape) into these buffers, in place.
    fn refill(&mut self, fresh: FixedInputs) -> Result<()> {
        if fresh.rows != self.rows {
            return Err(Error::InvalidRequest(format!("a step of {} rows refilled with {}", self.rows, fresh.rows)));
        }
        self.ids.slice_set(&fresh.ids, 0, 0)?;
        self.rope.refill(&fresh.rope)?;
        self.slots.slice_set(&fresh.slots, 0, 0)?;
        self.paged.refill(fresh.paged)
    }
}

/// What a captured step is for: a model, a KV pool, and a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    model: u64,
    pools: (u64, usize),
    rows: usize,
    width: usize,
}

/// One shape's buffers and, on a GPU where capture worked, its graph.
#[derive(Debug)]
struct Step {
    key: Key,
    inputs: FixedInputs,
    graph: Option<Replay>,
    used: u64,
    /// The model's and the cache's [`Llama::liveness`], [`KvCache::liveness`].
    alive: (Weak<()>, Weak<()>),
}

impl Step {
    /// Whether this step can run again: its model and cache live, and the
    /// cache has not grown past the pools it was captured on (a step of the
    /// cache's id with another block count is of its old pools).
    fn live(&self, now: &Key) -> bool {
        let (model, kv) = &self.alive;
        model.strong_count() > 0
            && kv.strong_count() > 0
            && (self.key.pools.0 != now.pools.0 || self.key.pools.1 == now.pools.1)
    }
}

/// Decode steps on fixed buffers for one engine thread: the shapes it has
/// captured, and whether it captures at all.
#[derive(Debug, Default)]
pub struct DecodeGraphs {
    on: bool,
    steps: Vec<Step>,
    clock: u64,
    /// Why the first capture that failed did (reported once).
    failed: Option<String>,
}

impl DecodeGraphs {
    /// Fixed-buffer decode steps when `on`, else every step eager.
    pub fn new(on: bool) -> Self {
        DecodeGraphs { on, ..Self::default() }
    }

    /// [`DecodeGraphs::new`] as [`enabled_on`] says for `device`.
    pub fn for_device(device: &Device) -> Self {
        Self::new(enabled_on(device))
    }

    /// Whether qualifying steps run on fixed buffers.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Shapes held now (each with its fixed buffers, and its graph where one
    /// was captured).
    pub fn shapes(&self) -> usize {
        self.steps.len()
    }

    /// Shapes captured as graphs now.
    pub fn captured(&self) -> usize {
        self.steps.iter().filter(|s| s.graph.is_some()).count()
    }

    /// Why the first capture that failed did, if one has.
    pub fn capture_failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The shapes captured now, each with what its replay launches.
    pub fn captured_shapes(&self) -> Vec<CapturedShape> {
        let shape = |s: &Step| {
            let nodes = s.graph.as_ref()?.nodes();
            Some(CapturedShape {
                rows: s.key.rows,
                width: s.key.width,
                kernels: nodes.map(|n| n.0),
                nodes: nodes.map(|n| n.1),
            })
        };
        self.steps.iter().filter_map(shape).collect()
    }

    /// One step of `model` over `batch`, as [`Llama::forward_with`] returns
    /// it: on fixed buffers (a graph replay on a GPU) where the step
    /// qualifies (see the module docs), else eagerly. On error the KV
    /// lengths are unchanged.
    pub fn forward(
        &mut self,
        model: &Llama,
        batch: &[SeqChunk<'_>],
        kv: &mut KvCache,
        which: LogitsFor,
        plan: StepPlan,
    ) -> Result<(StepOutput, DecodePath)> {
        let rows = bucket(batch.len()).filter(|_| {
            self.on
                && plan == StepPlan::FULL
                && which == LogitsFor::LastOfEachChunk
                && model.paged_attention()
                && kv.has_tensor_pools()
                && batch.iter().all(|c| c.tokens.len() == 1 && c.adapter.is_none())
        });
        let Some(rows) = rows else {
            return Ok((model.forward_with(batch, kv, which, plan)?, DecodePath::Eager));
        };
        if model.device().is_cpu() {
            arqon_kernels::threads::install(|| self.fixed(model, batch, rows, kv))
        } else {
            self.fixed(model, batch, rows, kv)
        }
    }

    /// The qualifying step of `batch`, at `rows` rows (its bucket).
    fn fixed(
        &mut self,
        model: &Llama,
        batch: &[SeqChunk<'_>],
        rows: usize,
        kv: &mut KvCache,
    ) -> Result<(StepOutput, DecodePath)> {
        model.check_batch(batch, kv)?;
        let n = batch.len();
        kv.reserve(&batch.iter().map(|c| (c.seq, 1)).collect::<Vec<_>>())?;
        let mut need = 1;
        for c in batch {
            need = need.max(KvShape::blocks_for(kv.len(c.seq)? + 1));
        }
        let width = need.next_power_of_two().max(MIN_WIDTH);
        let key = Key { model: model.id(), pools: kv.pools_id(), rows, width };
        let fresh = model.fixed_inputs(batch, kv, rows, width)?;
        self.clock += 1;
        let (logits, path) = match self.steps.iter().position(|s| s.key == key) {
            Some(i) => {
                let step = &mut self.steps[i];
                step.used = self.clock;
                step.inputs.refill(fresh)?;
                match &step.graph {
                    Some(g) => (g.replay()?, DecodePath::Graph),
                    None => (model.fixed_decode(&step.inputs, kv)?, DecodePath::Fixed),
                }
            }
            None => {
                // The steps of a dropped model or cache (a swapped-out
                // variant, say) would never run again: their buffers and
                // graphs go now (before the capture's own allocations)
                // rather than when the least recently used.
                self.steps.retain(|s| s.live(&key));
                // The first step of this shape: its inputs become the buffers.
                let (logits, graph) = self.first(model, &fresh, kv)?;
                if self.steps.len() >= KEEP {
                    let oldest = (0..self.steps.len()).min_by_key(|i| self.steps[*i].used).unwrap_or(0);
                    self.steps.swap_remove(oldest);
                }
                let alive = (model.liveness(), kv.liveness());
                self.steps.push(Step { key, inputs: fresh, graph, used: self.clock, alive });
                (logits, DecodePath::Fixed)
            }
        };
        // The step's logits are its own: the buffer is the graph's.
        let logits = logits.narrow(0, 0, n)?.copy()?;
        for c in batch {
            kv.advance(c.seq, c.tokens)?;
        }
        Ok((StepOutput { logits, layers_run: vec![model.config().num_layers; n] }, path))
    }

    /// Runs a shape's first step eagerly and, on a GPU, captures it.
    fn first(&mut self, model: &Llama, inputs: &FixedInputs, kv: &mut KvCache) -> Result<(Tensor, Option<Replay>)> {
        let captured = Replay::capture(model, inputs, kv)?;
        match captured {
            Captured::Graph(logits, replay) => Ok((logits, Some(replay))),
            Captured::Eager(logits, None) => Ok((logits, None)),
            Captured::Eager(logits, Some(why)) => {
                if self.failed.is_none() {
                    tracing::warn!(error = %why, "capturing a decode step as a CUDA graph failed: such steps run eagerly");
                    self.failed = Some(why);
                }
                Ok((logits, None))
            }
        }
    }
}

/// A decode shape captured as a CUDA graph: its rows and block-table width,
/// and the kernels and nodes one replay launches (`None` where the driver
/// would not list them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedShape {
    /// Rows of the step (its bucket).
    pub rows: usize,
    /// Blocks per block table.
    pub width: usize,
    /// Kernel nodes.
    pub kernels: Option<usize>,
    /// Every node (kernels, copies, memsets, allocations, …).
    pub nodes: Option<usize>,
}

/// A shape's first step: its logits, and its graph or why there is none.
enum Captured {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Graph(Tensor, Replay),
    /// No graph: on the CPU (`None`), or because capture failed.
    Eager(Tensor, Option<String>),
}

/// A captured step and the buffer its logits land in.
#[derive(Debug)]
struct Replay {
    #[cfg(feature = "cuda")]
    graph: arqon_kernels::cuda::graph::StepGraph,
    /// `[rows, vocab]` f32, written by every replay.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    out: Tensor,
}

impl Replay {
    /// Runs `inputs`' step; on a GPU captures it as well.
    #[cfg(not(feature = "cuda"))]
    fn capture(model: &Llama, inputs: &FixedInputs, kv: &mut KvCache) -> Result<Captured> {
        Ok(Captured::Eager(model.fixed_decode(inputs, kv)?, None))
    }

    /// (kernels, nodes) of one replay.
    #[cfg(not(feature = "cuda"))]
    fn nodes(&self) -> Option<(usize, usize)> {
        None
    }

    #[cfg(not(feature = "cuda"))]
    fn replay(&self) -> Result<Tensor> {
        Err(Error::InvalidRequest("CUDA graphs need a build with --features cuda".into()))
    }

    #[cfg(feature = "cuda")]
    fn capture(model: &Llama, inputs: &FixedInputs, kv: &mut KvCache) -> Result<Captured> {
        let Device::Cuda(dev) = model.device() else {
            return Ok(Captured::Eager(model.fixed_decode(inputs, kv)?, None));
        };
        if let Some(why) = model.not_capturable(inputs.rows) {
            return Ok(Captured::Eager(model.fixed_decode(inputs, kv)?, Some(why)));
        }
        // The step itself, eagerly: it fills candle's caches of launch
        // parameters that the capture then reads (and uploads nothing else).
        let _cache = dev.enable_cuda_graph_htod_cache();
        let out = model.fixed_decode(inputs, kv)?;
        let logits = out.copy()?;
        let record = || -> Result<()> { Ok(out.slice_set(&model.fixed_decode(inputs, kv)?, 0, 0)?) };
        match arqon_kernels::cuda::graph::StepGraph::capture(&dev.cuda_stream(), record) {
            Ok(graph) => Ok(Captured::Graph(logits, Replay { graph, out })),
            Err(e) => Ok(Captured::Eager(logits, Some(e.to_string()))),
        }
    }

    #[cfg(feature = "cuda")]
    fn nodes(&self) -> Option<(usize, usize)> {
        self.graph.nodes().map(|n| (n.kernels, n.total()))
    }

    #[cfg(feature = "cuda")]
    fn replay(&self) -> Result<Tensor> {
        self.graph.launch().map_err(|e| Error::Candle(candle_core::Error::wrap(e)))?;
        Ok(self.out.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_runs_at_the_smallest_bucket_that_holds_it() {
        assert_eq!(bucket(1), Some(1));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(32), Some(32));
        assert_eq!(bucket(33), Some(64));
        assert_eq!(bucket(128), Some(128));
        assert_eq!(bucket(129), None);
        let names: Vec<&str> = DecodePath::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["eager", "fixed", "graph"]);
        assert!(DecodePath::ALL.iter().enumerate().all(|(i, p)| p.index() == i));
    }

    /// A held shape goes with its model or its KV cache (the next capture
    /// drops it), and a growable cache's shapes with the pools it outgrew.
    #[test]
    fn the_shapes_of_a_dropped_model_or_cache_go() {
        use crate::model::{KvCache, SeqId};
        let path = crate::fetch::resolve(crate::fetch::DEFAULT_MODEL, &crate::config::fetch_options(None, true));
        let base = crate::engine::load_on(&path.unwrap(), &Device::Cpu).unwrap().model;
        let model = || {
            let m = Llama::new(base.config().clone(), base.weights().clone(), Device::Cpu).unwrap();
            m.with_paged_attention(true).unwrap()
        };
        let prompt: Vec<u32> = (3..20).collect();
        // A prompt on sequence `seq`, then one decode step through `graphs`.
        let decode = |g: &mut DecodeGraphs, m: &Llama, kv: &mut KvCache, seq: u64| {
            kv.add(SeqId(seq)).unwrap();
            let chunk = [SeqChunk { seq: SeqId(seq), tokens: &prompt, adapter: None }];
            m.forward(&chunk, kv, LogitsFor::LastOfEachChunk).unwrap();
            let step = [SeqChunk { seq: SeqId(seq), tokens: &[7], adapter: None }];
            let (_, path) = g.forward(m, &step, kv, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
            assert_ne!(path, DecodePath::Eager);
        };
        let shape = base.kv_shape();
        let mut g = DecodeGraphs::new(true);
        let (a, b) = (model(), model());
        let mut kv = KvCache::for_paged_op(shape, 32, Device::Cpu).unwrap();
        decode(&mut g, &a, &mut kv, 0);
        decode(&mut g, &b, &mut kv, 1);
        assert_eq!(g.shapes(), 2, "a shape per live model");
        decode(&mut g, &a, &mut kv, 2);
        assert_eq!(g.shapes(), 2, "a held shape runs again");
        drop(a);
        let c = model();
        decode(&mut g, &c, &mut kv, 3);
        assert_eq!(g.shapes(), 2, "the dropped model's shape went: b's and c's are left");
        drop(kv);
        let mut other = KvCache::for_paged_op(shape, 32, Device::Cpu).unwrap();
        decode(&mut g, &c, &mut other, 0);
        assert_eq!(g.shapes(), 1, "the dropped cache's shapes went");
        // A growable cache: the first step's pools are outgrown by a longer prompt's.
        let mut grows = KvCache::growable_tensors(shape, Device::Cpu);
        decode(&mut g, &c, &mut grows, 0);
        let before = grows.pools_id();
        let long: Vec<u32> = (0..40 * crate::model::kv::BLOCK_SIZE as u32).map(|t| 3 + t % 500).collect();
        grows.add(SeqId(9)).unwrap();
        c.forward(&[SeqChunk { seq: SeqId(9), tokens: &long, adapter: None }], &mut grows, LogitsFor::LastOfEachChunk)
            .unwrap();
        assert_ne!(grows.pools_id(), before, "the pools grew");
        let step = [SeqChunk { seq: SeqId(0), tokens: &[7], adapter: None }];
        g.forward(&c, &step, &mut grows, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
        assert_eq!(g.shapes(), 2, "other's shape and the grown pools' are left");
    }
}
