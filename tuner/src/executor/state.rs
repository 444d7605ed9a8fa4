//! The executor's state: the phase of the (at most one) experiment, the
//! active and baseline configurations, freshness, rate-limit clocks and
//! counters.
//!
//! Invariant: this is *all* the state; it is `PartialEq` and serialisable,
//! and replaying the audit log rebuilds it exactly.

use serde::{Deserialize, Serialize};

use crate::executor::decision::{ClipSet, RollbackReason};
use crate::executor::guard::Slo;
use crate::governance::{Governance, Proposal};
use crate::knobs::{Config, MAX_KNOBS};
use crate::summary::HealthSummary;
use crate::units::Tick;

/// An accepted proposal on its way through the canary.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    /// The proposal's governance metadata.
    pub meta: Governance,
    /// The configuration active when it was accepted (the control).
    pub base: Config,
    /// The validated, clipped candidate.
    pub candidate: Config,
    /// What validation clipped.
    pub clips: ClipSet,
    /// The SLO in force: the guard's, tightened by the proposal's constraints.
    pub slo: Slo,
    /// When it was accepted.
    pub accepted_at: Tick,
    /// Accepted while the active configuration was breaching: a remediation.
    /// Breaches of the control cohort (the thing being remedied) then do not
    /// roll it back; breaches of the canary still do.
    pub remedial: bool,
}

/// Where the executor is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// No experiment; proposals are considered.
    Idle,
    /// A proposal waits for an operator's approval.
    AwaitingApproval {
        /// The parked proposal (re-validated on approval).
        proposal: Proposal,
        /// When it was parked.
        since: Tick,
    },
    /// The runtime is staging the candidate.
    Staging {
        /// The experiment.
        exp: Experiment,
    },
    /// The candidate takes `steps[step]` of new requests.
    Canary {
        /// The experiment.
        exp: Experiment,
        /// Index into the canary plan's steps.
        step: u8,
        /// Whether the runtime confirmed the commit of this step.
        acked: bool,
        /// When the commit was confirmed.
        step_started: Tick,
        /// Clean windows entirely inside this step.
        windows: u32,
        /// Canary requests in those windows.
        samples: u64,
    },
    /// Returning to `to`.
    RollingBack {
        /// Target configuration.
        to: Config,
        /// Why.
        reason: RollbackReason,
        /// Enter `Frozen` (kill switch) rather than `Idle` when done.
        freeze: bool,
        /// Whether a rollback call is outstanding (false after a failure:
        /// the next tick retries).
        inflight: bool,
    },
    /// Kill switch engaged: no adaptation until an operator resumes.
    Frozen,
}

/// Running totals, for reports and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Proposals received.
    pub proposals: u64,
    /// Proposals accepted.
    pub accepted: u64,
    /// Proposals rejected.
    pub rejected: u64,
    /// Accepted proposals that had something clipped.
    pub clipped: u64,
    /// Canaries that reached 100 % and were promoted.
    pub promotions: u64,
    /// Rollbacks started.
    pub rollbacks: u64,
    /// Windows that breached a limit.
    pub breaches: u64,
    /// Times telemetry went stale.
    pub stale_events: u64,
    /// Runtime calls that failed.
    pub control_failures: u64,
    /// Control outcomes that matched no pending call (ignored).
    pub unexpected_outcomes: u64,
    /// Inputs whose tick was earlier than the last one (treated as "now").
    pub clock_regressions: u64,
}

/// The executor's complete state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutorState {
    /// Life-cycle phase.
    pub phase: Phase,
    /// Serving the control share (all traffic outside a canary).
    pub active: Config,
    /// Known-good snapshot: kill switch and staleness return here.
    pub baseline: Config,
    /// Latest input time (monotone).
    pub now: Tick,
    /// When the executor was created.
    pub started: Tick,
    /// When the last telemetry summary arrived.
    pub last_telemetry: Option<Tick>,
    /// The last summary.
    pub last_health: Option<HealthSummary>,
    /// The last window breached a limit on the active configuration.
    pub unhealthy: bool,
    /// Telemetry is stale.
    pub stale: bool,
    /// Per knob: when a change last reached traffic.
    pub last_knob_change: [Option<Tick>; MAX_KNOBS],
    /// When a variant change last reached traffic.
    pub last_variant_change: Option<Tick>,
    /// Totals.
    pub counters: Counters,
}
