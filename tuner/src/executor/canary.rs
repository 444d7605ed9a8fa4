//! Telemetry handling: breach detection, the canary's confidence gate, the
//! ramp, and promotion.
//!
//! At a 100 % step the runtime serves the candidate as its active
//! configuration and reports its requests as the control cohort, so both
//! cohorts count as the candidate's evidence (and breaches).
//!
//! A window is evidence for the current canary step only if it started at or
//! after the step's commit was confirmed: windows straddling a traffic change
//! mix two configurations and are neither counted as clean nor ignored for
//! breaches (any breach, in any window, rolls back).

use crate::executor::decision::{BreachKind, Decision, Effect, HoldReason, RollbackReason, Verdict};
use crate::executor::guard::{Evidence, Slo};
use crate::executor::state::Phase;
use crate::executor::Executor;
use crate::governance::RollbackPlan;
use crate::summary::{CohortHealth, HealthSummary};
use crate::telemetry::Cohort;
use crate::units::Tick;

/// The first limit `h` breaches for `cohort` under `slo`, if any.
///
/// Device memory is judged whenever device samples are present; latency only
/// once the cohort has `evidence.min_samples` requests in the window; error
/// rate only with `evidence.min_errors` errors as well.
pub fn breach_of(h: &HealthSummary, slo: &Slo, evidence: Evidence, cohort: Cohort) -> Option<BreachKind> {
    if h.device_samples > 0 && h.mem_share > slo.max_mem {
        return Some(BreachKind::Memory);
    }
    let c: &CohortHealth = match cohort {
        Cohort::Control => &h.control,
        Cohort::Canary => &h.canary,
    };
    if c.requests == 0 || c.requests < evidence.min_samples {
        return None;
    }
    if c.ttft_p99 > slo.ttft_p99 {
        return Some(BreachKind::TtftP99);
    }
    if c.itl_p99 > slo.itl_p99 {
        return Some(BreachKind::ItlP99);
    }
    let rate_broken = u128::from(c.errors) * 1000 > u128::from(slo.max_error_rate.get()) * u128::from(c.requests);
    if rate_broken && c.errors >= evidence.min_errors {
        return Some(BreachKind::ErrorRate);
    }
    None
}

/// Whether a summary carries no information at all (no requests and no
/// device samples): a silent pipeline, not a quiet server. Such windows do
/// not refresh telemetry freshness.
pub fn is_empty(h: &HealthSummary) -> bool {
    h.device_samples == 0 && h.control.requests == 0 && h.canary.requests == 0
}

impl Executor {
    pub(super) fn on_telemetry(&mut self, at: Tick, h: &HealthSummary) -> Decision {
        if is_empty(h) {
            // Missing telemetry: leave freshness alone so ticks can detect staleness.
            return self.decision(at, None, Verdict::Noted);
        }
        self.state.last_telemetry = Some(at);
        self.state.last_health = Some(*h);
        self.state.stale = false;
        let min = self.guard.evidence;
        let control_breach = breach_of(h, &self.guard.slo, min, Cohort::Control);
        self.state.unhealthy = control_breach.is_some();
        match self.state.phase {
            Phase::Staging { exp } | Phase::Canary { exp, .. } => {
                let canary_breach = match self.state.phase {
                    // At 100 % the runtime serves the candidate as its active
                    // configuration, so the control cohort is the candidate too.
                    Phase::Canary { .. } if self.at_full_step() => breach_of(h, &exp.slo, min, Cohort::Canary)
                        .or_else(|| breach_of(h, &exp.slo, min, Cohort::Control)),
                    Phase::Canary { .. } => breach_of(h, &exp.slo, min, Cohort::Canary),
                    _ => None,
                };
                let control_breach = if exp.remedial { None } else { control_breach };
                if let Some(kind) = canary_breach.or(control_breach) {
                    self.state.counters.breaches += 1;
                    let to = match exp.meta.rollback {
                        RollbackPlan::Previous => exp.base,
                        RollbackPlan::Baseline => self.state.baseline,
                    };
                    let mut d = self.begin_rollback(at, to, RollbackReason::Breach(kind), false);
                    d.trace = Some(exp.meta.trace);
                    return d;
                }
                self.gate(at, h)
            }
            Phase::Idle => match control_breach {
                Some(kind) => {
                    self.state.counters.breaches += 1;
                    if self.state.active != self.state.baseline {
                        let to = self.state.baseline;
                        self.begin_rollback(at, to, RollbackReason::Breach(kind), false)
                    } else {
                        self.decision(at, None, Verdict::Hold(HoldReason::BreachOnBaseline(kind)))
                    }
                }
                None => self.decision(at, None, Verdict::Noted),
            },
            Phase::AwaitingApproval { .. } | Phase::RollingBack { .. } | Phase::Frozen => {
                if control_breach.is_some() {
                    self.state.counters.breaches += 1;
                }
                self.decision(at, None, Verdict::Noted)
            }
        }
    }

    /// Whether the running canary is at a 100 % step (all new requests on
    /// the candidate, which the runtime then reports as its control cohort).
    fn at_full_step(&self) -> bool {
        match self.state.phase {
            Phase::Canary { step, .. } => self.guard.canary.steps.get(usize::from(step)).is_some_and(|f| f.is_full()),
            _ => false,
        }
    }

    /// The confidence gate of the current canary step, on a clean window.
    fn gate(&mut self, at: Tick, h: &HealthSummary) -> Decision {
        let Phase::Canary { exp, step, acked: true, step_started, windows, samples } = self.state.phase else {
            return self.decision(at, None, Verdict::Noted);
        };
        let trace = Some(exp.meta.trace);
        let evidence = if self.at_full_step() { h.canary.requests + h.control.requests } else { h.canary.requests };
        let (windows, samples) =
            if h.start >= step_started { (windows + 1, samples + evidence) } else { (windows, samples) };
        let plan = &self.guard.canary;
        if windows < plan.min_windows || samples < plan.min_samples {
            self.state.phase = Phase::Canary { exp, step, acked: true, step_started, windows, samples };
            return self.decision(at, trace, Verdict::Hold(HoldReason::Gathering { windows, samples }));
        }
        let next = usize::from(step) + 1;
        if let Some(&fraction) = plan.steps.get(next) {
            self.state.phase =
                Phase::Canary { exp, step: next as u8, acked: false, step_started: at, windows: 0, samples: 0 };
            let mut d = self.decision(at, trace, Verdict::CanaryAdvanced(fraction));
            d.effect = Some(Effect::Commit(fraction));
            return d;
        }
        // Last step (100 %) passed its gate: the candidate is the new
        // known-good configuration.
        self.state.active = exp.candidate;
        self.state.baseline = exp.candidate;
        self.state.phase = Phase::Idle;
        self.state.counters.promotions += 1;
        self.decision(at, trace, Verdict::Promoted)
    }
}
