//! Tier 1: the deterministic guardrail executor.
//!
//! Purpose: the only component that changes what serves traffic. It is a
//! pure state machine: [`Executor::handle`] takes one [`Input`] (a proposal,
//! a telemetry summary, a clock tick, an operator command, or the outcome of
//! a runtime call) with its [`Tick`] and returns one [`Decision`] with a
//! reason and at most one [`Effect`]. It never calls the runtime itself;
//! [`Driver`] carries effects out through [`ServingControl`] and feeds the
//! outcomes back as inputs, appending everything to the audit log.
//!
//! What it enforces, in order, on a proposal ([`Executor::validate`]): tier
//! rules (Ω never in prod), kill switch, scope and target, one experiment at
//! a time, fresh telemetry, knob and variant allowlists, value
//! kinds, finiteness, hard bounds (clip and record), maximum delta per step
//! (clip and record), per-knob and variant rate limits, and no-op detection.
//! Accepted changes are staged, then ramped through the canary plan; each
//! step advances only after enough clean windows and samples entirely inside
//! it. Any breach during an experiment rolls back on the window that shows
//! it (a breach of the *control* does not roll back a remediation, i.e. an
//! experiment accepted while the active configuration was already
//! breaching: refusing every change while overloaded would lock the system
//! in its failure); stale or missing telemetry holds and returns to the
//! baseline; the kill switch freezes adaptation and snaps back to the
//! baseline.
//!
//! Scope: one executor guards one (scope, target) pair and runs at most one
//! experiment at a time, which is how "one active experiment per scope"
//! holds; a proposal for another scope or target is rejected, an Ω proposal
//! for prod always.
//!
//! Invariants: no wall clock, no randomness, no I/O; the same inputs give the
//! same decisions and state ([`Executor::replay`] relies on it). Ticks that go
//! backwards are treated as "now" and counted. Rollbacks and the kill switch
//! ignore rate limits and deltas: returning to a configuration that already
//! served is always allowed. `validate` does not allocate.

mod canary;
mod control;
mod decision;
mod driver;
mod guard;
mod lifecycle;
mod state;
mod validate;

pub use canary::{breach_of, is_empty};
pub use control::{ControlError, ControlErrorKind, ControlOp, ControlOutcome, ServingControl, StageToken};
pub use decision::{BreachKind, Change, ClipSet, Decision, Effect, HoldReason, RejectReason, RollbackReason, Verdict};
pub use driver::Driver;
pub use guard::{CanaryPlan, Evidence, GuardConfig, KnobGuard, Slo};
pub use state::{Counters, ExecutorState, Experiment, Phase};
pub use validate::Validated;

use serde::{Deserialize, Serialize};

use crate::audit::Record;
use crate::error::TunerError;
use crate::governance::{OperatorId, Proposal, TraceId};
use crate::knobs::{Config, MAX_KNOBS};
use crate::summary::HealthSummary;
use crate::units::Tick;

/// What an operator can tell the executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorAction {
    /// Kill switch: freeze adaptation and return to the baseline.
    Kill,
    /// Lift the kill switch.
    Resume,
    /// Approve the parked proposal with this trace.
    Approve(TraceId),
    /// Deny the parked proposal with this trace.
    Deny(TraceId),
    /// Abort the running experiment (roll back).
    Abort,
    /// Make the active configuration the baseline.
    SetBaseline,
}

/// An operator command, attributed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorCommand {
    /// Who.
    pub operator: OperatorId,
    /// What.
    pub action: OperatorAction,
}

/// Everything the executor reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A policy's or operator's proposal.
    Propose(Proposal),
    /// The summary of a closed telemetry window.
    Telemetry(HealthSummary),
    /// Time passed (checks staleness, retries failed rollbacks).
    Tick,
    /// An operator command.
    Operator(OperatorCommand),
    /// The outcome of a runtime call the executor asked for.
    Control(ControlOutcome),
    /// The process restarted and replayed its log; `runtime_active` is what
    /// the runtime reports serving now.
    Recovered {
        /// The runtime's active configuration.
        runtime_active: Config,
    },
}

/// The guardrail executor: rules plus state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Executor {
    guard: GuardConfig,
    state: ExecutorState,
}

impl Executor {
    /// An executor at `at`, serving `initial` (which becomes the baseline).
    /// Errors if the guard is inconsistent or `initial` breaks it.
    pub fn new(guard: GuardConfig, initial: Config, at: Tick) -> Result<Executor, TunerError> {
        guard.check()?;
        if initial.knobs.len() != guard.space.len() {
            return Err(TunerError::config(
                "Executor",
                "initial config has a different number of knobs than the space",
            ));
        }
        for (i, (spec, g)) in guard.space.specs().iter().zip(&guard.knobs).enumerate() {
            let v = initial.knobs.as_slice()[i];
            if !spec.contains(v) || !g.within(v) {
                return Err(TunerError::config(
                    "Executor",
                    format!("initial value of {:?} is outside its bounds", spec.name),
                ));
            }
        }
        Ok(Executor {
            guard,
            state: ExecutorState {
                phase: Phase::Idle,
                active: initial,
                baseline: initial,
                now: at,
                started: at,
                last_telemetry: None,
                last_health: None,
                unhealthy: false,
                stale: false,
                last_knob_change: [None; MAX_KNOBS],
                last_variant_change: None,
                counters: Counters::default(),
            },
        })
    }

    /// The rules.
    pub fn guard(&self) -> &GuardConfig {
        &self.guard
    }

    /// The state.
    pub fn state(&self) -> &ExecutorState {
        &self.state
    }

    /// The configuration serving the control share.
    pub fn active(&self) -> &Config {
        &self.state.active
    }

    /// The known-good baseline.
    pub fn baseline(&self) -> &Config {
        &self.state.baseline
    }

    /// Feeds one input; returns the decision.
    pub fn handle(&mut self, at: Tick, input: &Input) -> Decision {
        let at = if at < self.state.now {
            self.state.counters.clock_regressions += 1;
            self.state.now
        } else {
            at
        };
        self.state.now = at;
        match input {
            Input::Propose(p) => self.on_propose(at, p),
            Input::Telemetry(h) => self.on_telemetry(at, h),
            Input::Tick => self.on_tick(at),
            Input::Operator(cmd) => self.on_operator(at, cmd),
            Input::Control(o) => self.on_control(at, *o),
            Input::Recovered { runtime_active } => self.on_recovered(at, runtime_active),
        }
    }

    /// Rebuilds an executor from an audit log: the first record must be the
    /// genesis; every input is re-applied and every logged decision must
    /// equal the recomputed one.
    pub fn replay(records: &[Record]) -> Result<Executor, TunerError> {
        let (guard, initial, at) = match records.first() {
            Some(Record::Genesis { guard, initial, at }) => (guard.clone(), *initial, *at),
            _ => {
                return Err(TunerError::ReplayDivergence { index: 0, why: "log does not start with a genesis record" })
            }
        };
        let mut exec = Executor::new(guard, initial, at)?;
        let mut pending: Option<Decision> = None;
        for (i, r) in records.iter().enumerate().skip(1) {
            match r {
                Record::Input { at, input } => pending = Some(exec.handle(*at, input)),
                Record::Decision(d) => match pending.take() {
                    Some(computed) if computed == *d => {}
                    Some(_) => {
                        return Err(TunerError::ReplayDivergence {
                            index: i as u64,
                            why: "logged decision differs from the recomputed one",
                        })
                    }
                    None => {
                        return Err(TunerError::ReplayDivergence { index: i as u64, why: "decision without an input" })
                    }
                },
                Record::Genesis { .. } => {
                    return Err(TunerError::ReplayDivergence { index: i as u64, why: "second genesis record" })
                }
            }
        }
        Ok(exec)
    }

    fn decision(&self, at: Tick, trace: Option<TraceId>, verdict: Verdict) -> Decision {
        Decision { at, trace, verdict, effect: None, clips: ClipSet::default() }
    }
}

#[cfg(test)]
mod tests;
