//! The seeded scenarios behind the adaptation tests and `tuner-sim`.
//!
//! * [`run_bandit_scenario`]: regret, violations and time to adapt of the
//!   constrained bandits against ε-greedy, uniform random and the best fixed
//!   arm in hindsight, on a shared [`BanditTrace`] (a load shift, or a
//!   quality drift within one context).
//! * [`run_optimizer_scenario`]: SPSA, ES, CMA-ES and PBT on a noisy
//!   [`Surface`].
//! * [`run_guardrail_scenario`]: the whole loop — simulated runtime →
//!   telemetry ring → summaries → constrained bandit proposals → guardrail
//!   executor → runtime — under a load shift, a spike, a telemetry outage,
//!   a kill switch and scripted adversarial proposals, optionally with an
//!   audit log that is then replayed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditLog, FsyncPolicy};
use crate::bandit::{
    ArmId, ArmMask, ComputeBudget, Constrained, ConstrainedConfig, ConstraintSpec, Context, Discount, EpsilonGreedy,
    LinUcb, LinUcbConfig, ThompsonConfig, ThompsonSampling, Ucb, UcbConfig, UniformRandom,
};
use crate::error::TunerError;
use crate::executor::{
    breach_of, Decision, Driver, Evidence, Executor, GuardConfig, Input, OperatorAction, OperatorCommand, Phase, Slo,
    Verdict,
};
use crate::governance::{ChangeKind, ExpectedImpact, Governance, OperatorId, Proposal, Scope, TargetId, Tier, TraceId};
use crate::knobs::{Config, KnobId, KnobSpace, KnobSpec, KnobValue, Patch, Unit, VariantId};
use crate::optim::{CmaEs, CmaEsConfig, Es, EsConfig, Optimizer, Pbt, PbtConfig, Spsa, SpsaConfig};
use crate::rng::TunerRng;
use crate::sim::{BanditTrace, LoadEvent, LoadProfile, QualityShift, ServingModel, SimRuntime, Surface, TraceConfig};
use crate::summary::Summarizer;
use crate::telemetry::{Cohort, ContextBucket, TelemetryRing};
use crate::units::{Micros, Permille, Probability, Tick};

/// Which bandit scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BanditScenario {
    /// Load steps from 0.3 to 0.9 halfway: the best eligible arm changes
    /// and the old best breaks the SLO.
    LoadShift,
    /// Constant load; halfway the best arm's quality drops (drift within a
    /// context, which only discounting can follow).
    Drift,
}

impl BanditScenario {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            BanditScenario::LoadShift => "load-shift",
            BanditScenario::Drift => "drift",
        }
    }
}

/// Load levels used to bucket contexts.
pub const LOAD_LEVELS: u16 = 4;

/// Simulated time per bandit round / executor window.
pub const WINDOW: Micros = Micros::from_secs(10);

/// The trace configuration of a scenario.
pub fn trace_config(s: BanditScenario, rounds: usize) -> TraceConfig {
    let half = rounds / 2;
    let (load, quality_shift) = match s {
        BanditScenario::LoadShift => (
            LoadProfile {
                base: 0.3,
                events: vec![LoadEvent::Step { at: Tick(half as u64 * WINDOW.0), to: 0.9 }],
                noise_sd: 0.03,
            },
            None,
        ),
        BanditScenario::Drift => (
            LoadProfile { base: 0.3, events: Vec::new(), noise_sd: 0.03 },
            Some(QualityShift { arm: 0, at_round: half, quality: 0.80 }),
        ),
    };
    TraceConfig {
        rounds,
        window: WINDOW,
        load,
        reward_noise: 0.02,
        latency_noise: 0.15,
        penalty: 1.0,
        load_levels: LOAD_LEVELS,
        quality_shift,
    }
}

/// The constraint tracker used by every constrained policy here: p99 TTFT
/// (ms) within the SLO with one standard error of pessimism, and memory.
pub fn constraints(model: &ServingModel) -> ConstrainedConfig {
    ConstrainedConfig {
        constraints: vec![
            ConstraintSpec { limit: model.slo_ttft_ms, z: 1.0, noise_floor: 40.0 },
            ConstraintSpec { limit: model.mem_limit, z: 0.0, noise_floor: 0.0 },
        ],
        buckets: usize::from(LOAD_LEVELS),
        discount: Discount::new(0.998).unwrap_or(Discount::NONE),
        min_obs: 0.5,
        confident_obs: 3.0,
        explore_unknown: true,
        budget: ComputeBudget::DEFAULT,
    }
}

/// Our default policy: Thompson sampling inside the constraint filter.
pub fn constrained_thompson(model: &ServingModel, seed: u64) -> Result<Constrained<ThompsonSampling>, TunerError> {
    let mut c = ThompsonConfig::new(model.variants.len(), usize::from(LOAD_LEVELS));
    c.prior_mean = 0.5;
    c.prior_sd = 0.5;
    c.noise_sd = 0.03;
    c.discount = Discount::new(0.99)?;
    Constrained::new(ThompsonSampling::new(c, seed)?, &constraints(model))
}

/// One policy's line in a bandit report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Policy.
    pub name: String,
    /// Cumulative regret (expected reward units, penalty 1 per infeasible round).
    pub regret: f64,
    /// Rounds spent on an infeasible arm.
    pub violations: u64,
    /// Rounds after the change until ≥ 80 % of 20 consecutive picks are the
    /// new best eligible arm.
    pub time_to_adapt: Option<usize>,
}

/// A bandit scenario's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BanditReport {
    /// Scenario name.
    pub scenario: String,
    /// Rounds (windows).
    pub rounds: usize,
    /// Round of the change.
    pub change_round: usize,
    /// One line per policy.
    pub policies: Vec<PolicyReport>,
}

impl BanditReport {
    /// The line of the named policy.
    pub fn policy(&self, name: &str) -> Option<&PolicyReport> {
        self.policies.iter().find(|p| p.name == name)
    }
}

/// Runs every policy over one shared trace; returns the trace and the report.
pub fn run_bandit_scenario(
    s: BanditScenario,
    rounds: usize,
    seed: u64,
) -> Result<(BanditTrace, BanditReport), TunerError> {
    let model = ServingModel::catalog();
    let arms = model.variants.len();
    let buckets = usize::from(LOAD_LEVELS);
    let trace = BanditTrace::generate(&model, &trace_config(s, rounds), seed);
    let change = rounds / 2;
    let mut runs = Vec::new();
    let mut ours = constrained_thompson(&model, seed ^ 0x51)?;
    runs.push(trace.run_constrained("constrained-thompson", &mut ours));
    let mut ucb = UcbConfig::new(arms, buckets);
    ucb.noise_sd = 0.03;
    ucb.c = 1.0;
    ucb.discount = Discount::new(0.99)?;
    let mut cu = Constrained::new(Ucb::new(ucb)?, &constraints(&model))?;
    runs.push(trace.run_constrained("constrained-ucb", &mut cu));
    let mut lin = LinUcbConfig::new(arms);
    lin.alpha = 0.4;
    lin.prior_mean = 0.5;
    lin.discount = Discount::new(0.995)?;
    let mut cl = Constrained::new(LinUcb::new(lin)?, &constraints(&model))?;
    runs.push(trace.run_constrained("constrained-linucb", &mut cl));
    let mut eg = EpsilonGreedy::new(arms, buckets, 0.1, seed ^ 0x52)?;
    runs.push(trace.run_plain("epsilon-greedy-0.1", &mut eg));
    let mut un = UniformRandom::new(arms, seed ^ 0x53)?;
    runs.push(trace.run_plain("uniform-random", &mut un));
    runs.push(trace.best_fixed());
    let policies = runs
        .iter()
        .map(|r| PolicyReport {
            name: r.name.clone(),
            regret: r.regret,
            violations: r.violations,
            time_to_adapt: r.time_to_adapt(&trace, change, 20, 0.8),
        })
        .collect();
    Ok((trace, BanditReport { scenario: s.name().to_owned(), rounds, change_round: change, policies }))
}

/// One optimiser's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerReport {
    /// Optimiser.
    pub name: String,
    /// Dimension.
    pub dim: usize,
    /// Noisy evaluations used.
    pub evaluations: u64,
    /// Noiseless value of the incumbent (the optimum is 1).
    pub value: f64,
    /// Distance to the optimum's value, percent.
    pub gap_pct: f64,
}

/// Runs SPSA, ES, CMA-ES and PBT for `evals` noisy evaluations each on a
/// random surface of `dim` coordinates with noise deviation `noise`.
pub fn run_optimizer_scenario(
    dim: usize,
    evals: u64,
    noise: f64,
    seed: u64,
) -> Result<Vec<OptimizerReport>, TunerError> {
    let surface = Surface::random(dim, noise, seed);
    let mut opts: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("spsa", Box::new(Spsa::new(SpsaConfig::new(dim), seed)?)),
        ("es-antithetic", Box::new(Es::new(EsConfig::new(dim), seed)?)),
        ("cma-es", Box::new(CmaEs::new(CmaEsConfig::new(dim), seed)?)),
        ("pbt-lite", Box::new(Pbt::new(PbtConfig::new(dim), seed)?)),
    ];
    let mut out = Vec::new();
    for (name, opt) in &mut opts {
        let mut rng = TunerRng::seeded(seed ^ 0x0b5e);
        let mut x = vec![0.0; dim];
        for _ in 0..evals {
            let id = opt.ask(&mut x);
            opt.tell(id, surface.sample(&x, &mut rng))?;
        }
        let value = surface.value(opt.incumbent());
        out.push(OptimizerReport {
            name: (*name).to_owned(),
            dim,
            evaluations: opt.evaluations(),
            value,
            gap_pct: 100.0 * (1.0 - value / surface.peak),
        });
    }
    Ok(out)
}

/// The guardrail scenario's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardrailReport {
    /// Windows simulated.
    pub windows: usize,
    /// Proposals made (policy and scripted).
    pub proposals: u64,
    /// Proposals accepted.
    pub accepted: u64,
    /// Rejections by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Accepted proposals with a clipped knob.
    pub clipped: u64,
    /// Canaries promoted.
    pub promotions: u64,
    /// Rollbacks by reason.
    pub rollbacks: BTreeMap<String, u64>,
    /// Kill-switch activations.
    pub freezes: u64,
    /// Holds by reason (stale telemetry, breach on baseline, ...).
    pub holds: BTreeMap<String, u64>,
    /// Windows in which any cohort breached the SLO.
    pub slo_violation_windows: u64,
    /// Of those, windows in which the canary breached.
    pub canary_violation_windows: u64,
    /// Windows after the load shift until the active variant was feasible.
    pub time_to_feasible: Option<usize>,
    /// Windows after the load shift until the active variant was the best
    /// eligible one.
    pub time_to_best: Option<usize>,
    /// Active variant at the end.
    pub final_variant: u16,
    /// Audit records written (0 without a log).
    pub audit_records: u64,
    /// Replaying the log rebuilt the live executor exactly.
    pub replay_matches: Option<bool>,
}

const OPERATOR: OperatorId = OperatorId { id: 1, version: 1 };
const SHIFT_WINDOW: usize = 150;

fn guard_setup() -> Result<(GuardConfig, Config, Slo), TunerError> {
    let space = KnobSpace::new(vec![
        KnobSpec::continuous("batch_window", Unit::Ratio, 0.0, 1.0, 0.0)?,
        KnobSpec::integer("max_batch", Unit::Requests, 1, 512, 64)?,
    ])?;
    let slo = Slo {
        ttft_p99: Micros::from_millis(400),
        itl_p99: Micros::from_millis(100),
        max_error_rate: Permille::new(20)?,
        max_mem: Permille::new(900)?,
    };
    let mut g = GuardConfig::new(Scope::Prod, TargetId(1), space.clone(), slo);
    g.variants = (0..8u16).filter(|&v| v != 1).map(VariantId).collect();
    g.knobs[0].max_delta = 0.2;
    g.knobs[0].min_interval = Micros::from_secs(60);
    g.knobs[1].allowed = false;
    g.canary.min_windows = 2;
    g.canary.min_samples = 50;
    g.stale_after = Micros::from_secs(30);
    g.evidence = Evidence { min_samples: 10, min_errors: 3 };
    let initial = Config::defaults(&space, VariantId(0));
    Ok((g, initial, slo))
}

fn proposal(trace: u64, kind: ChangeKind, patch: Patch) -> Proposal {
    Proposal { meta: Governance::tier2(OPERATOR, Scope::Prod, TargetId(1), kind, TraceId(trace)), patch }
}

/// The scripted adversarial and operator inputs of window `w`.
fn scripted(w: usize) -> Option<Input> {
    let knob = |v: f64| Patch::knob(KnobId(0), KnobValue::Continuous(v));
    let t = 1_000_000 + w as u64;
    let p = match w {
        40 => {
            let mut p = proposal(t, ChangeKind::Structure, Patch::variant(VariantId(2)));
            p.meta.tier = Tier::Omega;
            p
        }
        60 => proposal(t, ChangeKind::Structure, Patch::variant(VariantId(1))),
        80 => proposal(t, ChangeKind::Knob, knob(f64::NAN)),
        100 => proposal(t, ChangeKind::Knob, Patch::knob(KnobId(1), KnobValue::Integer(512))),
        120 => proposal(t, ChangeKind::Policy, knob(0.1)),
        140 => proposal(t, ChangeKind::Knob, knob(5.0)),
        280 => return Some(Input::Operator(OperatorCommand { operator: OPERATOR, action: OperatorAction::Kill })),
        285 => return Some(Input::Operator(OperatorCommand { operator: OPERATOR, action: OperatorAction::Resume })),
        _ => return None,
    };
    Some(Input::Propose(p))
}

fn tally(report: &mut GuardrailReport, decisions: &[Decision]) {
    for d in decisions {
        match d.verdict {
            Verdict::Rejected(r) => *report.rejected.entry(format!("{r:?}")).or_default() += 1,
            Verdict::RollingBack(r) => *report.rollbacks.entry(format!("{r:?}")).or_default() += 1,
            Verdict::Frozen => {
                report.freezes += 1;
                if d.effect.is_some() {
                    *report.rollbacks.entry("KillSwitch".into()).or_default() += 1;
                }
            }
            Verdict::Hold(h) => {
                let key = match h {
                    crate::executor::HoldReason::Gathering { .. } => continue,
                    other => format!("{other:?}"),
                };
                *report.holds.entry(key).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Runs the closed loop for `windows` windows (at least 300 to include every
/// scripted event); with `log`, writes the audit log there and replays it.
pub fn run_guardrail_scenario(seed: u64, windows: usize, log: Option<&Path>) -> Result<GuardrailReport, TunerError> {
    let model = ServingModel::catalog();
    let (guard, initial, slo) = guard_setup()?;
    let allowed = ArmMask(guard.variants.iter().fold(0, |m, v| m | 1u64 << v.0));
    let evidence = guard.evidence;
    let exec = Executor::new(guard, initial, Tick(0))?;
    let w = |n: usize| Tick(n as u64 * WINDOW.0);
    let load = LoadProfile {
        base: 0.3,
        events: vec![
            LoadEvent::Step { at: w(SHIFT_WINDOW), to: 0.9 },
            LoadEvent::Spike { at: w(220), length: Micros(3 * WINDOW.0), extra: 0.4 },
        ],
        noise_sd: 0.03,
    };
    let rate = 1_000.0;
    let mut runtime = SimRuntime::new(model.clone(), load, initial, Some(KnobId(0)), seed);
    runtime.set_rate(rate);
    let audit = match log {
        Some(p) => Some(AuditLog::open(p, FsyncPolicy::Never)?),
        None => None,
    };
    let mut driver = Driver::new(exec, runtime, audit)?;
    let ring = TelemetryRing::new(1 << 16)?;
    let mut summarizer = Summarizer::new(WINDOW)?;
    let mut policy = constrained_thompson(&model, seed ^ 0x77)?;
    let mut report = GuardrailReport { windows, ..GuardrailReport::default() };
    let mut summaries = Vec::new();
    let mut ctx = Context::bucketed(0.3, 0.5, 0.5, 0, LOAD_LEVELS);
    let mut last_proposal = 0usize;
    let mut trace = 0u64;
    let mut queued: Vec<Input> = Vec::new();
    let best_after = model.best_feasible(0.9).unwrap_or(0) as u16;
    for n in 0..windows {
        let end = w(n + 1);
        driver.control_mut().outage = (260..265).contains(&n);
        driver.control_mut().run_window(w(n), WINDOW, &ring);
        summarizer.drain(&ring, &mut summaries)?;
        summarizer.close_until(end, &mut summaries);
        for s in summaries.drain(..) {
            let h = s.health();
            let canary_breach = breach_of(&h, &slo, evidence, Cohort::Canary).is_some();
            if canary_breach || breach_of(&h, &slo, evidence, Cohort::Control).is_some() {
                report.slo_violation_windows += 1;
                report.canary_violation_windows += u64::from(canary_breach);
            }
            let requests = h.control.requests + h.canary.requests;
            if requests > 0 {
                ctx = Context::bucketed(requests as f64 / rate, 0.5, 0.5, 0, LOAD_LEVELS);
                for (key, st) in &s.by_key {
                    let v = usize::from(key.variant.0);
                    if key.context == ContextBucket::ALL || st.requests < 20 || v >= 8 {
                        continue;
                    }
                    let p99_ms = st.ttft.p99.0 as f64 / 1_000.0;
                    let m = &model.variants[v];
                    let reward = m.quality - model.latency_weight * (p99_ms / model.slo_ttft_ms).min(3.0);
                    policy.update(&ctx, ArmId(v as u8), reward, &[p99_ms, m.mem]);
                }
            }
            let d = driver.handle(end, Input::Telemetry(h))?.to_vec();
            tally(&mut report, &d);
        }
        let d = driver.handle(end, Input::Tick)?.to_vec();
        tally(&mut report, &d);
        if let Some(input) = scripted(n) {
            queued.push(input);
        }
        // Scripted proposals wait for an idle executor (so each exercises its
        // own check, not "busy"); operator commands go straight in.
        while let Some(&input) = queued.first() {
            let idle = driver.executor().state().phase == Phase::Idle;
            if matches!(input, Input::Propose(_)) && !idle {
                break;
            }
            queued.remove(0);
            report.proposals += u64::from(matches!(input, Input::Propose(_)));
            let d = driver.handle(end, input)?.to_vec();
            tally(&mut report, &d);
        }
        let exec = driver.executor();
        if queued.is_empty() && exec.state().phase == Phase::Idle && n >= last_proposal + 3 {
            let active = ArmId(exec.active().variant.0 as u8);
            let sel = policy.select(&ctx, allowed);
            // Canaries cost windows: explore in prod only when the active
            // variant is predicted to break a limit, otherwise move only for
            // a predicted gain (hysteresis against churn between near-ties).
            let (gain, sd) = {
                let ts = policy.inner();
                let (m_new, sd_new) = ts.posterior(&ctx, sel.arm);
                let (m_old, sd_old) = ts.posterior(&ctx, active);
                (m_new - m_old, (sd_new * sd_new + sd_old * sd_old).sqrt())
            };
            let active_ok = policy.eligible(&ctx, allowed).contains(active);
            if sel.arm != active && (!active_ok || gain > 0.01) {
                trace += 1;
                last_proposal = n;
                report.proposals += 1;
                let mut p = proposal(trace, ChangeKind::Structure, Patch::variant(VariantId(u16::from(sel.arm.0))));
                p.meta.expected = ExpectedImpact {
                    reward_delta: gain,
                    confidence: Probability::new(normal_cdf(gain / sd.max(1e-9)))?,
                };
                let d = driver.handle(end, Input::Propose(p))?.to_vec();
                tally(&mut report, &d);
            }
        }
        if n >= SHIFT_WINDOW {
            let active = driver.executor().active().variant;
            let resp = model.response(usize::from(active.0), 0.9, 0.0);
            if report.time_to_feasible.is_none() && model.feasible(&resp) {
                report.time_to_feasible = Some(n - SHIFT_WINDOW);
            }
            if report.time_to_best.is_none() && active.0 == best_after {
                report.time_to_best = Some(n - SHIFT_WINDOW);
            }
        }
    }
    let c = driver.executor().state().counters;
    report.accepted = c.accepted;
    report.clipped = c.clipped;
    report.promotions = c.promotions;
    report.final_variant = driver.executor().active().variant.0;
    if let Some(l) = driver.log() {
        report.audit_records = l.next_seq().0;
        let (records, _) = audit::recover(l.path())?;
        let replayed = Executor::replay(&records)?;
        report.replay_matches = Some(&replayed == driver.executor());
    }
    Ok(report)
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26, |error| < 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.3275911 * z.abs() / std::f64::consts::SQRT_2);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-(z * z) / 2.0).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}
