//! Engine speed on one model: prefill tokens/s (128-token prompt) and decode
//! tokens/s (128 new tokens) at batch 1 and batch 8, as a table and JSON.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p arqon-bench --bin engine-bench -- --json out.json
//! ```
//! `bench/engine-vs-llamacpp.sh` runs this and llama.cpp on the same file in
//! the same run and reports the ratio.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use arqon_runtime::model::{LogitsFor, SeqChunk};
use arqon_runtime::server::config::KvCacheDtype;
use arqon_runtime::{config, engine, fetch, Engine, GenerateRequest};
use arqon_variants::Quantization;
use clap::Parser;
use serde::Serialize;

/// The 128-token prompt of `shared/fixtures/llamacpp_greedy.json` (`bench_prompt_128_raw_ids`).
const PROMPT: &str = "The history of computing is a story of layers. At the bottom are transistors, switching billions of times per second; above them sit logic gates, arithmetic units and caches; above those, instruction sets, compilers, operating systems and runtimes; and at the top, the applications that people actually use. Each layer hides the complexity of the one beneath it, which is why a programmer can write a web server without knowing how a carry-lookahead adder works. Language models add yet another layer. A model with a hundred million parameters is, in the end, a long sequence of matrix multiplications, normalisations and nonlinear";

#[derive(Parser, Debug)]
struct Args {
    /// Model path or known name.
    #[arg(long, default_value = fetch::DEFAULT_MODEL)]
    model: String,
    /// New tokens per sequence in the decode runs.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Decode batch sizes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Skip the prefill measurement (e.g. to profile decode alone).
    #[arg(long)]
    no_prefill: bool,
    /// Use a prompt of this many seeded random token ids instead of the
    /// 128-token text (as `shared/gpu/peer_transformers.py` does, for
    /// random-weight checkpoints).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Instead of the runs above: capture one decode step per batch as a
    /// CUDA graph and time its replay next to the eager step
    /// (`arqon_bench::graph_probe`; `--reps` steps each).
    #[arg(long)]
    graph_probe: bool,
    /// `--device`: where the model runs.
    #[command(flatten)]
    device: config::DeviceArgs,
    /// What the KV cache holds, as `arqon serve --kv-cache-dtype` (auto: the
    /// model's dense dtype on a GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    kv_cache_dtype: KvCacheDtype,
    /// Quantize every layer matrix to this GGML block format after loading
    /// (`q8_0`, `q4_0` or `q4_1`; `Llama::requantized`), to time the
    /// quantized paths on a Hugging Face checkpoint (on a GPU, candle's
    /// kernels or, with `ARQON_CUDA_QUANTIZED=ours`, ours).
    #[arg(long, value_parser = block_format)]
    quantize: Option<Quantization>,
}

/// A `--quantize` value: one of the block formats of [`Quantization`].
fn block_format(s: &str) -> Result<Quantization, String> {
    match s.parse::<Quantization>() {
        Ok(q @ (Quantization::Q8_0 | Quantization::Q4_0 | Quantization::Q4_1)) => Ok(q),
        _ => Err(format!("`{s}`: want q8_0, q4_0 or q4_1")),
    }
}

#[derive(Serialize)]
struct Row {
    metric: String,
    batch: usize,
    tokens: usize,
    tokens_per_s: f64,
}

/// `n` token ids drawn uniformly from `3..vocab` (past the usual special
/// ids) with a fixed seed.
fn random_ids(n: usize, vocab: usize) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    (0..n).map(|_| rng.gen_range(3..vocab.max(4) as u32)).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn prefill_rate(e: &mut Engine, ids: &[u32]) -> anyhow::Result<f64> {
    let seq = e.add_sequence()?;
    let t = Instant::now();
    e.step(&[SeqChunk { seq, tokens: ids, adapter: None }], LogitsFor::LastOfEachChunk)?;
    let dt = t.elapsed().as_secs_f64();
    e.remove_sequence(seq);
    Ok(ids.len() as f64 / dt)
}

/// Tokens/s of `batch` sequences generating `n` tokens each: decode steps
/// alone (the prefill step excluded), and the whole call (every generated
/// token over prefill and decode, as a peer's `generate` is timed).
fn decode_rate(e: &mut Engine, ids: &[u32], batch: usize, n: usize) -> anyhow::Result<(f64, f64)> {
    let reqs =
        (0..batch).map(|_| GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(ids.to_vec(), n) }).collect();
    let out = e.generate_batch(reqs, &mut |_, _| {})?;
    let decoded: usize = out.iter().map(|g| g.token_ids.len() - 1).sum();
    let generated: usize = out.iter().map(|g| g.token_ids.len()).sum();
    let t = &out[0].timings;
    Ok((decoded as f64 / t.decode_s, generated as f64 / (t.prefill_s + t.decode_s)))
}

fn main() -> anyhow::Result<()> {
    // What the `arqon` binary does first (see its docs).
    arqon_runtime::config::init_cpu_threading();
    let a = Args::parse();
    let device = arqon_runtime::device::open(a.device.device)?;
    let path = fetch::resolve(&a.model, &config::fetch_options(None, true))?;
    let mut loaded = engine::load_on(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    if let Some(q) = a.quantize {
        let format = arqon_runtime::variants::requant::ggml_dtype(q)?;
        loaded.model = loaded.model.requantized(format).with_context(|| format!("quantizing to {q:?}"))?;
    }
    let mut e = Engine::new(loaded);
    e.set_kv_cache_dtype(a.kv_cache_dtype.resolve(&e.loaded().model)?)?;
    let ids = match a.prompt_tokens {
        None => e.encode_prompt(PROMPT)?,
        Some(n) => random_ids(n, e.loaded().model.config().vocab_size),
    };
    let threads = candle_core::utils::get_num_threads();
    let kv = e.kv_cache_dtype().as_str();
    eprintln!(
        "model {}{} | prompt {} tokens | {threads} threads | {} reps | KV cache {kv}",
        path.display(),
        a.quantize.map(|q| format!(" (layers quantized to {q:?})")).unwrap_or_default(),
        ids.len(),
        a.reps
    );
    // Warm up caches and thread pools once.
    decode_rate(&mut e, &ids, 1, 8)?;
    if a.graph_probe {
        let rows: Vec<_> = a
            .batches
            .iter()
            .map(|&b| arqon_bench::graph_probe::probe(&e.loaded().model, &ids, b, a.reps.max(5)))
            .collect::<anyhow::Result<_>>()?;
        println!("| batch | eager step ms | graph replay ms | eager / graph | capture |\n|---|---|---|---|---|");
        for r in &rows {
            let (g, ratio) =
                r.graph_ms.map_or(("-".into(), "-".into()), |g| (format!("{g:.3}"), format!("{:.2}", r.eager_ms / g)));
            println!("| {} | {:.3} | {g} | {ratio} | {} |", r.batch, r.eager_ms, r.error.as_deref().unwrap_or("ok"));
        }
        if let Some(p) = a.json {
            let v = serde_json::json!({"model": path, "prompt_tokens": ids.len(), "graph_probe": rows});
            std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
        }
        return Ok(());
    }

    let mut rows = Vec::new();
    if !a.no_prefill {
        let pre: Vec<f64> = (0..a.reps).map(|_| prefill_rate(&mut e, &ids)).collect::<anyhow::Result<_>>()?;
        rows.push(Row { metric: "prefill".into(), batch: 1, tokens: ids.len(), tokens_per_s: median(pre) });
    }
    for &batch in &a.batches {
        let r: Vec<(f64, f64)> =
            (0..a.reps).map(|_| decode_rate(&mut e, &ids, batch, a.new_tokens)).collect::<anyhow::Result<_>>()?;
        let (decode, whole) = (median(r.iter().map(|r| r.0).collect()), median(r.iter().map(|r| r.1).collect()));
        // As each batch ends, so that a run stopped at a later batch keeps this one's figures.
        eprintln!("batch {batch}: decode {decode:.1} tokens/s, generate (prefill included) {whole:.1} tokens/s");
        rows.push(Row { metric: "decode".into(), batch, tokens: a.new_tokens, tokens_per_s: decode });
        rows.push(Row { metric: "generate".into(), batch, tokens: a.new_tokens, tokens_per_s: whole });
    }
    println!("| engine | metric | batch | tokens | tokens/s |\n|---|---|---|---|---|");
    for r in &rows {
        println!("| arqon | {} | {} | {} | {:.1} |", r.metric, r.batch, r.tokens, r.tokens_per_s);
    }
    // Decode steps as CUDA graphs (ARQON_CUDA_GRAPHS=on or the plan's `decode=graph`).
    let g = e.decode_graphs();
    // Each captured shape with the kernels (and all nodes) one replay launches.
    let shapes: Vec<serde_json::Value> = g
        .captured_shapes()
        .iter()
        .map(|s| serde_json::json!({"rows": s.rows, "width": s.width, "kernels": s.kernels, "nodes": s.nodes}))
        .collect();
    let graphs = serde_json::json!({"on": g.is_on(), "captured": g.captured(), "capture_failure": g.capture_failure(), "shapes": shapes});
    eprintln!("decode graphs: {graphs}");
    if let Some(p) = a.json {
        let v = serde_json::json!({"engine": "arqon", "model": path, "threads": threads, "prompt_tokens": ids.len(), "rows": rows, "decode_graphs": graphs, "kv_cache_dtype": kv});
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
