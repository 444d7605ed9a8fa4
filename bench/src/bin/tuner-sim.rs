//! Runs the tuner's seeded simulation scenarios and reports regret, time to
//! adapt, SLO violations and the guardrail executor's interventions, as a
//! table and (optionally) JSON.
//!
//! ```text
//! cargo run --release -p arqon-bench --bin tuner-sim -- --seed 7 --json tuner-sim.json \
//!     --export-log /tmp/loadshift.jsonl --audit /tmp/audit.jsonl
//! ```
//! `--export-log` writes the load-shift bandit trace (every arm's outcome in
//! every round) so other learners (e.g. Vowpal Wabbit, see
//! `tuner/benches/vw_compare.py`) can be scored on exactly the same data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use arqon_tuner::sim::scenario::{
    run_bandit_scenario, run_guardrail_scenario, run_optimizer_scenario, BanditReport, BanditScenario, GuardrailReport,
    OptimizerReport,
};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Arqon tuner simulator: bandits, optimisers and the guardrail executor")]
struct Args {
    /// Seed of every scenario.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Bandit rounds (telemetry windows) per scenario.
    #[arg(long, default_value_t = 4_000)]
    rounds: usize,
    /// Noisy evaluations per optimiser.
    #[arg(long, default_value_t = 3_000)]
    evals: u64,
    /// Windows of the closed-loop guardrail scenario (at least 300).
    #[arg(long, default_value_t = 300)]
    windows: usize,
    /// Write all results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Export the load-shift bandit trace as JSON lines here.
    #[arg(long)]
    export_log: Option<PathBuf>,
    /// Write the guardrail scenario's audit log here (replayed and checked).
    #[arg(long)]
    audit: Option<PathBuf>,
}

#[derive(Serialize)]
struct Output {
    seed: u64,
    bandits: Vec<BanditReport>,
    optimizers: Vec<OptimizerReport>,
    guardrail: GuardrailReport,
    elapsed_s: f64,
}

fn print_bandits(r: &BanditReport) {
    println!("\n== bandits: {} ({} windows, change at window {}) ==", r.scenario, r.rounds, r.change_round);
    println!("{:<24} {:>10} {:>11} {:>14}", "policy", "regret", "violations", "time-to-adapt");
    for p in &r.policies {
        let t = p.time_to_adapt.map_or("never".to_owned(), |t| format!("{t} windows"));
        println!("{:<24} {:>10.1} {:>11} {:>14}", p.name, p.regret, p.violations, t);
    }
}

fn print_optimizers(rows: &[OptimizerReport]) {
    println!("\n== optimisers: noisy smooth surface (noise sd 2 % of the peak) ==");
    println!("{:<16} {:>4} {:>7} {:>9} {:>8}", "optimiser", "dim", "evals", "value", "gap %");
    for o in rows {
        println!("{:<16} {:>4} {:>7} {:>9.4} {:>8.2}", o.name, o.dim, o.evaluations, o.value, o.gap_pct);
    }
}

fn print_guardrail(g: &GuardrailReport) {
    let opt = |v: Option<usize>| v.map_or("never".to_owned(), |t| format!("{t} windows"));
    println!("\n== guardrail executor: closed loop, {} windows ==", g.windows);
    println!("(load 0.3 → 0.9 at window 150, spike +0.4 at 220-222, telemetry outage 260-264,");
    println!(" kill switch at 280, resume at 285, scripted adversarial proposals)");
    println!("{:<44} {} / {}", "proposals / accepted", g.proposals, g.accepted);
    println!("{:<44} {}", "promotions", g.promotions);
    println!("{:<44} {}", "accepted with a clipped knob", g.clipped);
    for (k, v) in &g.rejected {
        println!("{:<44} {}", format!("rejected: {k}"), v);
    }
    for (k, v) in &g.rollbacks {
        println!("{:<44} {}", format!("rollback: {k}"), v);
    }
    println!("{:<44} {}", "kill switch engaged", g.freezes);
    for (k, v) in &g.holds {
        println!("{:<44} {}", format!("hold: {k}"), v);
    }
    println!("{:<44} {} (canary: {})", "SLO-violating windows", g.slo_violation_windows, g.canary_violation_windows);
    println!("{:<44} {}", "after load shift: feasible in", opt(g.time_to_feasible));
    println!("{:<44} {}", "after load shift: best arm in", opt(g.time_to_best));
    println!("{:<44} {}", "final variant", g.final_variant);
    if let Some(m) = g.replay_matches {
        println!("{:<44} {} records, replay {}", "audit log", g.audit_records, if m { "matches" } else { "DIVERGES" });
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let t0 = Instant::now();
    let mut bandits = Vec::new();
    for s in [BanditScenario::LoadShift, BanditScenario::Drift] {
        let (trace, report) = run_bandit_scenario(s, args.rounds, args.seed)?;
        if let (BanditScenario::LoadShift, Some(path)) = (s, &args.export_log) {
            let mut w = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
            trace.write_jsonl(&mut w)?;
            w.flush()?;
        }
        print_bandits(&report);
        bandits.push(report);
    }
    let mut optimizers = Vec::new();
    for dim in [8, 16] {
        optimizers.extend(run_optimizer_scenario(dim, args.evals, 0.02, args.seed)?);
    }
    print_optimizers(&optimizers);
    if let Some(p) = &args.audit {
        // The scenario writes a fresh log.
        let _ = std::fs::remove_file(p);
    }
    let guardrail = run_guardrail_scenario(args.seed, args.windows.max(300), args.audit.as_deref())?;
    print_guardrail(&guardrail);
    let out = Output { seed: args.seed, bandits, optimizers, guardrail, elapsed_s: t0.elapsed().as_secs_f64() };
    println!("\n(seed {}, {:.2} s)", args.seed, out.elapsed_s);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
