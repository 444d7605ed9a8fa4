//! `engine-bench --graph-probe`: whether one decode step of the model can be
//! captured as a CUDA graph as it stands (candle's kernels, cuBLAS, our ops),
//! and what replaying it costs next to running the step eagerly. Design input
//! for CUDA graphs in serving, not a serving path: the replayed step reads
//! the inputs captured with it (every step here is the same step: each
//! sequence is truncated back after it), so only its time is meaningful.

use std::time::Instant;

use arqon_runtime::model::{KvCache, Llama, LogitsFor, SeqChunk, SeqId};
use serde::Serialize;

/// One batch of the probe.
#[derive(Debug, Serialize)]
pub struct GraphProbeRow {
    /// Sequences decoding one token each.
    pub batch: usize,
    /// Milliseconds per eager decode step (median of `steps`).
    pub eager_ms: f64,
    /// Milliseconds per replay of the captured step, if capture worked.
    pub graph_ms: Option<f64>,
    /// Why capture or replay failed.
    pub error: Option<String>,
}

/// Prefills `batch` sequences of `prompt`, then times `steps` eager decode
/// steps and, captured once, `steps` replays.
pub fn probe(model: &Llama, prompt: &[u32], batch: usize, steps: usize) -> anyhow::Result<GraphProbeRow> {
    let mut kv = model.new_kv_cache();
    let seqs: Vec<SeqId> = (0..batch as u64).map(|i| SeqId(1000 + i)).collect();
    for s in &seqs {
        kv.add(*s)?;
    }
    let chunks: Vec<SeqChunk<'_>> = seqs.iter().map(|&seq| SeqChunk { seq, tokens: prompt, adapter: None }).collect();
    model.forward(&chunks, &mut kv, LogitsFor::LastOfEachChunk)?;
    let token = [prompt[prompt.len() - 1]];
    let decode: Vec<SeqChunk<'_>> = seqs.iter().map(|&seq| SeqChunk { seq, tokens: &token, adapter: None }).collect();
    let n = prompt.len();
    // One decode step, then every sequence back to its prompt: each step
    // is the same step, with the same inputs.
    let step = |kv: &mut KvCache| -> anyhow::Result<()> {
        let logits = model.forward(&decode, kv, LogitsFor::LastOfEachChunk)?;
        drop(logits);
        for s in &seqs {
            kv.truncate(*s, n)?;
        }
        Ok(())
    };
    let eager_ms = median_ms(steps, &mut || {
        step(&mut kv)?;
        Ok(model.device().synchronize()?)
    })?;
    let (graph_ms, error) = match capture_and_replay(model, &mut kv, &step, steps) {
        Ok(ms) => (Some(ms), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(GraphProbeRow { batch, eager_ms, graph_ms, error })
}

#[cfg(feature = "cuda")]
fn capture_and_replay(
    model: &Llama,
    kv: &mut KvCache,
    step: &dyn Fn(&mut KvCache) -> anyhow::Result<()>,
    steps: usize,
) -> anyhow::Result<f64> {
    let candle_core::Device::Cuda(dev) = model.device() else { anyhow::bail!("the graph probe needs --device cuda") };
    // Small host-to-device uploads (layouts, our ops' tables) come from a
    // cache filled by a step before the capture, as candle's capture needs.
    let _cache = dev.enable_cuda_graph_htod_cache();
    step(kv)?;
    let stream = dev.cuda_stream();
    // Serving's capture (it ends the capture however `step` fails).
    let graph = arqon_kernels::cuda::graph::StepGraph::capture(&stream, || step(kv))
        .map_err(|e| anyhow::anyhow!("capturing the step: {e}"))?;
    median_ms(steps, &mut || {
        graph.launch()?;
        Ok(stream.synchronize()?)
    })
}

#[cfg(not(feature = "cuda"))]
fn capture_and_replay(
    _: &Llama,
    _: &mut KvCache,
    _: &dyn Fn(&mut KvCache) -> anyhow::Result<()>,
    _: usize,
) -> anyhow::Result<f64> {
    anyhow::bail!("CUDA graphs need a build with --features cuda and --device cuda")
}

/// The median milliseconds of `steps` (at least one) calls of `run`, each
/// ending when its work has.
fn median_ms(steps: usize, run: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(steps.max(1));
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_probe_times_eager_steps_and_says_why_it_did_not_capture() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let loaded = arqon_runtime::engine::load_on(&path, &candle_core::Device::Cpu).unwrap();
        let prompt: Vec<u32> = (3..40).collect();
        let row = super::probe(&loaded.model, &prompt, 3, 4).unwrap();
        assert_eq!(row.batch, 3);
        assert!(row.eager_ms > 0.0, "{row:?}");
        // On the CPU there is nothing to capture, and the reason is given.
        assert_eq!(row.graph_ms, None);
        assert!(row.error.as_deref().is_some_and(|e| e.contains("--device cuda")), "{row:?}");
    }
}
