//! Logged bandit data: every arm's noisy outcome in every round, generated
//! once from a seed, so every policy (ours, baselines, Vowpal Wabbit via
//! the JSONL export) faces exactly the same draws.
//!
//! Regret is measured against expected values: per round, the oracle's
//! expected reward (best feasible arm) minus the chosen arm's expected
//! reward, where an infeasible arm (breaks the p99 SLO or the memory limit
//! in expectation) is charged `penalty`. Constrained policies observe the raw
//! reward and the metrics; unconstrained baselines observe the reward minus
//! the penalty whenever the *observed* outcome broke a limit (the only way
//! they can learn about constraints).

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::bandit::{ArmId, ArmMask, BanditPolicy, Constrained, Context};
use crate::rng::TunerRng;
use crate::sim::load::LoadProfile;
use crate::sim::model::ServingModel;
use crate::units::{Micros, Tick};

/// A change of one arm's quality mid-run (drift within a context).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QualityShift {
    /// Which arm.
    pub arm: usize,
    /// From which round.
    pub at_round: usize,
    /// Its new quality.
    pub quality: f64,
}

/// How to generate a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceConfig {
    /// Rounds (one per telemetry window).
    pub rounds: usize,
    /// Simulated time per round.
    pub window: Micros,
    /// Offered load over time.
    pub load: LoadProfile,
    /// Deviation of the observed reward.
    pub reward_noise: f64,
    /// Deviation of the log of the observed p99.
    pub latency_noise: f64,
    /// Charge for choosing an infeasible arm.
    pub penalty: f64,
    /// Load levels used to bucket contexts.
    pub load_levels: u16,
    /// Optional quality drift.
    pub quality_shift: Option<QualityShift>,
}

/// One arm's outcome in one round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmObs {
    /// Observed reward (noisy, no penalty).
    pub reward: f64,
    /// Observed window p99 TTFT, ms.
    pub p99_ms: f64,
    /// Memory share.
    pub mem: f64,
    /// Expected reward, penalty included if infeasible.
    pub expected: f64,
    /// Feasible in expectation.
    pub feasible: bool,
}

/// One round's context and oracle.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRound {
    /// Observed load.
    pub load: f64,
    /// Context given to the policies.
    pub ctx: Context,
    /// Best expected reward among feasible arms.
    pub oracle: f64,
    /// The arm achieving it.
    pub best: u8,
}

/// A generated trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BanditTrace {
    /// Number of arms.
    pub arms: usize,
    /// Rounds.
    pub rounds: Vec<TraceRound>,
    /// `rounds × arms` outcomes.
    pub obs: Vec<ArmObs>,
    /// The penalty.
    pub penalty: f64,
    /// SLO, ms.
    pub slo_ms: f64,
    /// Memory limit.
    pub mem_limit: f64,
}

/// One policy's run over a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRun {
    /// Policy name.
    pub name: String,
    /// Cumulative regret.
    pub regret: f64,
    /// Rounds on an infeasible arm.
    pub violations: u64,
    /// The arm chosen each round.
    pub choices: Vec<u8>,
}

impl PolicyRun {
    /// Rounds after `from` until the policy's choices match the oracle's in
    /// at least `frac` of a `span`-round window (`None` if never).
    pub fn time_to_adapt(&self, trace: &BanditTrace, from: usize, span: usize, frac: f64) -> Option<usize> {
        let n = self.choices.len();
        (from..n.saturating_sub(span)).find_map(|t| {
            let hits = (t..t + span).filter(|&i| self.choices[i] == trace.rounds[i].best).count();
            (hits as f64 >= frac * span as f64).then(|| t - from)
        })
    }
}

impl BanditTrace {
    /// Generates a trace from `model` under `cfg`, seeded.
    pub fn generate(model: &ServingModel, cfg: &TraceConfig, seed: u64) -> BanditTrace {
        let mut rng = TunerRng::seeded(seed);
        let mut load_rng = rng.fork(1);
        let arms = model.variants.len();
        let mut shifted = model.clone();
        if let Some(s) = cfg.quality_shift {
            if let Some(v) = shifted.variants.get_mut(s.arm) {
                v.quality = s.quality;
            }
        }
        let mut rounds = Vec::with_capacity(cfg.rounds);
        let mut obs = Vec::with_capacity(cfg.rounds * arms);
        let sd = cfg.latency_noise;
        for t in 0..cfg.rounds {
            let m = match cfg.quality_shift {
                Some(s) if t >= s.at_round => &shifted,
                _ => model,
            };
            let tick = Tick(t as u64 * cfg.window.0);
            let load = cfg.load.sample(tick, &mut load_rng);
            let ctx = Context::bucketed(load, 0.5, 0.5, 0, cfg.load_levels);
            let mut best = (f64::NEG_INFINITY, 0u8);
            let mut best_any = (f64::NEG_INFINITY, 0u8);
            for a in 0..arms {
                let r = m.response(a, load, 0.0);
                let feasible = m.feasible(&r);
                let exp_reward = m.reward(&r);
                let expected = if feasible { exp_reward } else { exp_reward - cfg.penalty };
                let p99_ms = r.ttft_p99_ms * (sd * rng.normal() - 0.5 * sd * sd).exp();
                let reward =
                    r.quality - m.latency_weight * (p99_ms / m.slo_ttft_ms).min(3.0) + cfg.reward_noise * rng.normal();
                if feasible && expected > best.0 {
                    best = (expected, a as u8);
                }
                if expected > best_any.0 {
                    best_any = (expected, a as u8);
                }
                obs.push(ArmObs { reward, p99_ms, mem: r.mem, expected, feasible });
            }
            let (oracle, best) = if best.0.is_finite() { best } else { best_any };
            rounds.push(TraceRound { load, ctx, oracle, best });
        }
        BanditTrace { arms, rounds, obs, penalty: cfg.penalty, slo_ms: model.slo_ttft_ms, mem_limit: model.mem_limit }
    }

    fn at(&self, t: usize, a: usize) -> &ArmObs {
        &self.obs[t * self.arms + a]
    }

    fn account(&self, run: &mut PolicyRun, t: usize, a: ArmId) {
        let o = self.at(t, a.index());
        run.regret += self.rounds[t].oracle - o.expected;
        run.violations += u64::from(!o.feasible);
        run.choices.push(a.0);
    }

    fn empty_run(&self, name: &str) -> PolicyRun {
        PolicyRun { name: name.to_owned(), regret: 0.0, violations: 0, choices: Vec::with_capacity(self.rounds.len()) }
    }

    /// Runs a constrained policy: it sees raw rewards and `[p99_ms, mem]`.
    pub fn run_constrained<P: BanditPolicy>(&self, name: &str, policy: &mut Constrained<P>) -> PolicyRun {
        let mut run = self.empty_run(name);
        for (t, r) in self.rounds.iter().enumerate() {
            let s = policy.select(&r.ctx, ArmMask::all(self.arms));
            let o = self.at(t, s.arm.index());
            policy.update(&r.ctx, s.arm, o.reward, &[o.p99_ms, o.mem]);
            self.account(&mut run, t, s.arm);
        }
        run
    }

    /// Runs an unconstrained policy on penalised observed rewards.
    pub fn run_plain<P: BanditPolicy>(&self, name: &str, policy: &mut P) -> PolicyRun {
        let mut run = self.empty_run(name);
        for (t, r) in self.rounds.iter().enumerate() {
            let a = policy.select(&r.ctx, ArmMask::all(self.arms));
            policy.update(&r.ctx, a, self.penalised(t, a.index()));
            self.account(&mut run, t, a);
        }
        run
    }

    /// The feedback an unconstrained learner gets for arm `a` in round `t`.
    pub fn penalised(&self, t: usize, a: usize) -> f64 {
        let o = self.at(t, a);
        let broke = o.p99_ms > self.slo_ms || o.mem > self.mem_limit;
        o.reward - if broke { self.penalty } else { 0.0 }
    }

    /// The single arm with the best total expected reward, in hindsight.
    pub fn best_fixed(&self) -> PolicyRun {
        let best = (0..self.arms)
            .max_by(|&a, &b| {
                let sa: f64 = (0..self.rounds.len()).map(|t| self.at(t, a).expected).sum();
                let sb: f64 = (0..self.rounds.len()).map(|t| self.at(t, b).expected).sum();
                sa.total_cmp(&sb)
            })
            .unwrap_or(0);
        let mut run = self.empty_run(&format!("best fixed arm ({best})"));
        for t in 0..self.rounds.len() {
            self.account(&mut run, t, ArmId(best as u8));
        }
        run
    }

    /// Regret of an externally chosen sequence of arms (e.g. from Vowpal Wabbit).
    pub fn score(&self, name: &str, choices: &[u8]) -> PolicyRun {
        let mut run = self.empty_run(name);
        for (t, &a) in choices.iter().enumerate().take(self.rounds.len()) {
            self.account(&mut run, t, ArmId(a.min(self.arms as u8 - 1)));
        }
        run
    }

    /// Writes one JSON object per round: context, and per arm the observed
    /// reward, p99, memory, the penalised feedback and the expected reward.
    pub fn write_jsonl(&self, w: &mut impl Write) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct Arm {
            reward: f64,
            penalised: f64,
            p99_ms: f64,
            mem: f64,
            expected: f64,
            feasible: bool,
        }
        #[derive(Serialize)]
        struct Line<'a> {
            t: usize,
            load: f64,
            bucket: u16,
            features: &'a [f64],
            oracle: f64,
            best: u8,
            arms: Vec<Arm>,
        }
        for (t, r) in self.rounds.iter().enumerate() {
            let arms = (0..self.arms)
                .map(|a| {
                    let o = self.at(t, a);
                    Arm {
                        reward: o.reward,
                        penalised: self.penalised(t, a),
                        p99_ms: o.p99_ms,
                        mem: o.mem,
                        expected: o.expected,
                        feasible: o.feasible,
                    }
                })
                .collect();
            let line = Line {
                t,
                load: r.load,
                bucket: r.ctx.bucket.0,
                features: &r.ctx.features.0,
                oracle: r.oracle,
                best: r.best,
                arms,
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }
}
