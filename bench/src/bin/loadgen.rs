//! `loadgen`: streaming load generator for OpenAI-compatible servers (loopback only).
//!
//!   loadgen --url http://127.0.0.1:8080 --model M --concurrency 1,4,16 --requests 32 \
//!           --max-tokens 64 --json out.json
//!
//! Prints a Markdown table (requests/s, output tokens/s, TTFT and inter-token latency
//! p50/p99, errors, tokens per request) and writes the same figures as JSON. A stream that
//! ends with fewer tokens than asked is a failure even with HTTP 200. See
//! `bench/src/loadgen/` for the measurement definitions.
#![forbid(unsafe_code)]

// The modules sit in `src/loadgen/` so the binary stays thin; see `mod.rs` for why they
// are not part of the library.
#[path = "../loadgen/mod.rs"]
mod loadgen;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

use loadgen::config::{Args, Config, Endpoint};
use loadgen::driver::{run_level, warm_up, LevelRun, Shared};
use loadgen::report::{markdown, markdown_row, LevelReport, Report, MARKDOWN_HEADER};

/// How many failure details to print per level; the counts are in the table.
const DETAILS_PER_LEVEL: usize = 3;

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse())?;
    // One thread: the client's work (a few hundred small frames per second) must take as
    // little as possible from the server sharing the machine's cores.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let report = runtime.block_on(run(&config))?;
    println!("\n{}", markdown(&report));
    if let Some(path) = &config.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: wrote {}", path.display());
    }
    Ok(())
}

async fn run(config: &Config) -> Result<Report> {
    let shared = Arc::new(Shared { target: config.target.clone(), spec: config.spec.clone(), limits: config.limits });
    let requests = u64::from(config.limits.requests);
    let warm = warm_up(&shared, config.limits.warmup, u64::MAX / 2).await;
    let warm_failures: Vec<_> = warm.iter().filter(|r| r.failure.is_some()).collect();
    for record in warm_failures.iter().take(DETAILS_PER_LEVEL) {
        eprintln!("loadgen: warm-up failure {:?}: {}", record.failure, record.detail.as_deref().unwrap_or(""));
    }
    if !warm.is_empty() && warm_failures.len() == warm.len() {
        anyhow::bail!("every warm-up request failed; is the server at {} up?", config.label);
    }
    eprintln!("{MARKDOWN_HEADER}");
    let mut levels = Vec::new();
    for (n, &mode) in config.modes.iter().enumerate() {
        let first_index = n as u64 * requests;
        let run = run_level(&shared, mode, first_index, config.seed.wrapping_add(n as u64)).await;
        print_details(&run);
        let level = LevelReport::new(&run, config.spec.max_tokens);
        eprintln!("{}", markdown_row(&config.label, &level));
        levels.push(level);
    }
    Ok(Report {
        label: config.label.clone(),
        url: format!("http://{}{}", config.target.authority, config.target.base_path),
        model: config.spec.model.clone(),
        endpoint: match config.spec.endpoint {
            Endpoint::Completions => "completions".into(),
            Endpoint::Chat => "chat".into(),
        },
        max_tokens: config.spec.max_tokens,
        requests_per_level: config.limits.requests,
        levels,
    })
}

fn print_details(run: &LevelRun) {
    let failed = run.records.iter().filter(|r| r.failure.is_some());
    for record in failed.take(DETAILS_PER_LEVEL) {
        let label = record.failure.as_ref().map(|f| f.label()).unwrap_or_default();
        eprintln!("loadgen: {label}: {}", record.detail.as_deref().unwrap_or(""));
    }
}
