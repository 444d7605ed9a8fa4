//! Early exit and self-speculative decoding on one model: decode tokens/s
//! at full depth, at static exit depths, with CALM dynamic exit, and with
//! self-speculative decoding at a few draft depths and lengths, with the
//! acceptance rate, the speed-up over full depth, and whether the greedy
//! output equals full depth's (it must, for `spec:*`). Prints a table and
//! writes JSON.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p arqon-bench --bin spec-bench -- --json spec.json
//! ```

use std::path::PathBuf;

use anyhow::Context;
use arqon_runtime::{config, engine, fetch, Engine, GenerateRequest, Generation};
use arqon_variants::DepthProfile;
use clap::Parser;
use serde::Serialize;

/// The first sentences of engine-bench's 128-token prompt, and two of the llama.cpp fixtures' prompts.
const PROMPTS: [&str; 3] = [
    "The history of computing is a story of layers. At the bottom are transistors, switching billions of times per second; above them sit logic gates, arithmetic units and caches.",
    "The capital of France is",
    "def fibonacci(n):",
];

#[derive(Parser, Debug)]
struct Args {
    /// Model path or known name.
    #[arg(long, default_value = fetch::DEFAULT_MODEL)]
    model: String,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed repetitions (the median decode rate is reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Profiles to run after `full` (`exit:K`, `calm:K:T`, `spec:K:D`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "exit:10,exit:20,exit:28,calm:10:0.95,calm:20:0.99,spec:8:4,spec:15:3,spec:25:3,spec:28:2"
    )]
    profiles: Vec<DepthProfile>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `--device`: where the model runs.
    #[command(flatten)]
    device: config::DeviceArgs,
}

#[derive(Serialize)]
struct Row {
    profile: String,
    decode_tokens_per_s: f64,
    speedup: f64,
    acceptance_rate: f64,
    mean_layers: f64,
    same_as_full: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs every prompt alone (batch 1) at `profile`; returns the generations of the last rep and the median rate.
fn run(e: &mut Engine, prompts: &[Vec<u32>], n: usize, reps: usize) -> anyhow::Result<(Vec<Generation>, f64)> {
    let mut rates = Vec::new();
    let mut last = Vec::new();
    for _ in 0..reps {
        let (mut toks, mut secs) = (0usize, 0f64);
        last.clear();
        for p in prompts {
            let g =
                e.generate(GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(p.clone(), n) }, &mut |_| {})?;
            toks += g.token_ids.len() - 1;
            secs += g.timings.decode_s;
            last.push(g);
        }
        rates.push(toks as f64 / secs);
    }
    Ok((last, median(rates)))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let device = arqon_runtime::device::open(a.device.device)?;
    let path = fetch::resolve(&a.model, &config::fetch_options(None, true))?;
    let loaded = engine::load_on(&path, &device).with_context(|| format!("loading {}", path.display()))?;
    let mut e = Engine::new(loaded);
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| e.encode_prompt(p)).collect::<Result<_, _>>()?;
    let threads = candle_core::utils::get_num_threads();
    eprintln!(
        "model {} | {} prompts | {} new tokens | {threads} threads | {} reps",
        path.display(),
        prompts.len(),
        a.new_tokens,
        a.reps
    );
    run(&mut e, &prompts[..1], 8, 1)?; // warm-up

    let (full, full_rate) = run(&mut e, &prompts, a.new_tokens, a.reps)?;
    let mean = |gs: &[Generation], f: fn(&Generation) -> f64| gs.iter().map(f).sum::<f64>() / gs.len() as f64;
    let mut rows = vec![Row {
        profile: "full".into(),
        decode_tokens_per_s: full_rate,
        speedup: 1.0,
        acceptance_rate: 0.0,
        mean_layers: mean(&full, |g| g.depth.mean_layers),
        same_as_full: true,
    }];
    for p in &a.profiles {
        e.set_depth(*p)?;
        let (gens, rate) = run(&mut e, &prompts, a.new_tokens, a.reps)?;
        let (drafted, accepted): (usize, usize) =
            gens.iter().fold((0, 0), |(d, acc), g| (d + g.depth.drafted, acc + g.depth.accepted));
        rows.push(Row {
            profile: p.tag(),
            decode_tokens_per_s: rate,
            speedup: rate / full_rate,
            acceptance_rate: if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 },
            mean_layers: mean(&gens, |g| g.depth.mean_layers),
            same_as_full: gens.iter().zip(&full).all(|(g, f)| g.token_ids == f.token_ids),
        });
    }
    println!(
        "| profile | decode tok/s | speed-up | acceptance | layers/token | greedy = full |\n|---|---|---|---|---|---|"
    );
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.2}x | {} | {:.1} | {} |",
            r.profile,
            r.decode_tokens_per_s,
            r.speedup,
            if r.profile.starts_with("spec") { format!("{:.3}", r.acceptance_rate) } else { "-".into() },
            r.mean_layers,
            if r.same_as_full { "yes" } else { "no" }
        );
    }
    if let Some(p) = a.json {
        let v = serde_json::json!({"model": path, "threads": threads, "new_tokens": a.new_tokens, "reps": a.reps, "prompts": PROMPTS, "rows": rows});
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
