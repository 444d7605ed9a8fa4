//! Our logits and greedy tokens against a peer's on the same checkpoint:
//! the reference JSON (`input_ids`, `logits` per position, `greedy_ids`, and
//! optionally the peer's top-1 minus top-2 `margins` at each greedy step) is
//! written by `bench/gpu/peer_reference.py` (transformers) or
//! `tests/fixtures/make_tiny_llama.py`.
//!
//! ```text
//! peer-check --model /tmp/ckpt --reference ref.json --device cuda --json out.json
//! ```
//! Prints, per prompt position, the largest |ours − theirs| relative to the
//! row's largest |theirs|, and how many greedy tokens agree before the first
//! parting (with the peer's margin there: a parting at a near-tie is
//! rounding, one at a wide margin is a bug). Exits 1 only on a broken input,
//! not on a mismatch: the numbers are the result.

use std::path::PathBuf;

use anyhow::Context;
use arqon_runtime::model::{rows, LogitsFor, SeqChunk};
use arqon_runtime::server::config::KvCacheDtype;
use arqon_runtime::{config, engine, Engine, GenerateRequest};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser, Debug)]
struct Args {
    /// The checkpoint (a Hugging Face folder or a GGUF file).
    #[arg(long)]
    model: PathBuf,
    /// The peer's reference JSON.
    #[arg(long)]
    reference: PathBuf,
    /// Write the comparison as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `--device`: where the model runs.
    #[command(flatten)]
    device: config::DeviceArgs,
    /// What the KV cache holds, as `arqon serve --kv-cache-dtype` (auto: the
    /// model's dense dtype on a GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value_t = KvCacheDtype::Auto)]
    kv_cache_dtype: KvCacheDtype,
}

#[derive(Deserialize)]
struct Reference {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
    #[serde(default)]
    margins: Vec<f32>,
}

/// Largest |ours - theirs| relative to the largest |theirs| in the row, and
/// the largest absolute difference.
fn errors(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let abs = ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (abs / scale, abs)
}

fn main() -> anyhow::Result<()> {
    arqon_runtime::config::init_cpu_threading();
    let a = Args::parse();
    let r: Reference = serde_json::from_str(
        &std::fs::read_to_string(&a.reference).with_context(|| format!("reading {}", a.reference.display()))?,
    )
    .with_context(|| format!("parsing {}", a.reference.display()))?;
    anyhow::ensure!(r.logits.len() == r.input_ids.len(), "{} logit rows for {} ids", r.logits.len(), r.input_ids.len());
    let device = arqon_runtime::device::open(a.device.device)?;
    let loaded = engine::load_on(&a.model, &device).with_context(|| format!("loading {}", a.model.display()))?;
    let mut e = Engine::new(loaded);
    e.set_kv_cache_dtype(a.kv_cache_dtype.resolve(&e.loaded().model)?)?;

    let seq = e.add_sequence()?;
    let logits = e.step(&[SeqChunk { seq, tokens: &r.input_ids, adapter: None }], LogitsFor::AllPositions)?;
    e.remove_sequence(seq);
    let ours = rows(&logits)?;
    anyhow::ensure!(ours.len() == r.logits.len() && ours[0].len() == r.logits[0].len(), "logit shapes differ");
    let per_pos: Vec<(f32, f32)> = ours.iter().zip(&r.logits).map(|(o, t)| errors(o, t)).collect();
    let max_rel = per_pos.iter().fold(0f32, |m, e| m.max(e.0));
    let max_abs = per_pos.iter().fold(0f32, |m, e| m.max(e.1));
    let argmax_equal = ours
        .iter()
        .zip(&r.logits)
        .filter(|(o, t)| arqon_runtime::model::argmax(o) == arqon_runtime::model::argmax(t))
        .count();

    let n = r.greedy_ids.len();
    let g = e.generate(
        GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(r.input_ids.clone(), n) },
        &mut |_| {},
    )?;
    let agree = g.token_ids.iter().zip(&r.greedy_ids).take_while(|(a, b)| a == b).count();
    let parting_margin = (agree < n).then(|| r.margins.get(agree).copied()).flatten();

    println!("| check | value |\n|---|---|");
    println!("| prompt positions | {} |", ours.len());
    println!("| max relative logit error | {max_rel:.3e} |");
    println!("| max absolute logit error | {max_abs:.3e} |");
    println!("| positions with the same argmax | {argmax_equal} / {} |", ours.len());
    println!("| greedy tokens equal before the first parting | {agree} / {n} |");
    if let Some(m) = parting_margin {
        println!("| peer's top-1 margin at the parting | {m:.4} |");
    }
    if let Some(p) = a.json {
        let v = serde_json::json!({
            "model": a.model, "device": arqon_runtime::device::describe(&device),
            "kv_cache_dtype": e.kv_cache_dtype().as_str(),
            "positions": ours.len(), "max_rel_err": max_rel, "max_abs_err": max_abs,
            "rel_err_per_position": per_pos.iter().map(|e| e.0).collect::<Vec<_>>(),
            "argmax_equal": argmax_equal, "greedy_total": n, "greedy_agree": agree,
            "ours_greedy": g.token_ids, "peer_greedy": r.greedy_ids, "peer_margin_at_parting": parting_margin,
        });
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
