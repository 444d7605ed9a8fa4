//! What the executor decides: verdicts with reasons, and the effects a
//! driver carries out.
//!
//! Every [`Decision`] names the input's time, the trace it concerns, a
//! [`Verdict`] (with a structured reason when something is refused or rolled
//! back), at most one [`Effect`] for the runtime, and a [`ClipSet`] recording
//! which knobs were clipped to hard bounds or to the per-step delta.
//! Decisions are `Copy` and serialisable: they go verbatim into the audit log
//! and replay compares them field by field.

use serde::{Deserialize, Serialize};

use crate::governance::TraceId;
use crate::knobs::{Config, KnobId, VariantId};
use crate::units::{CanaryFraction, Tick};

/// Why a proposal was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// Adaptation is frozen by the kill switch.
    Frozen,
    /// A tier-Ω proposal targeted prod.
    OmegaInProd,
    /// A policy change was sent to the serving executor.
    PolicyChangeNotServing,
    /// `ChangeKind` does not match the patch.
    KindMismatch,
    /// High risk in prod without `approval_required`.
    ApprovalMissing,
    /// The proposal is for another scope than this executor guards.
    ScopeMismatch,
    /// The proposal is for another deployment.
    TargetMismatch,
    /// Another experiment is active in this scope.
    Busy,
    /// No telemetry has been received yet.
    NoTelemetry,
    /// Telemetry is older than the staleness limit.
    StaleTelemetry,
    /// The patch changes nothing.
    Empty,
    /// The knob id is not in the executor's space.
    UnknownKnob(KnobId),
    /// The knob exists but is not on the allowlist.
    KnobNotAllowed(KnobId),
    /// The value's kind does not match the knob's domain.
    TypeMismatch(KnobId),
    /// The value is NaN or infinite.
    NonFinite(KnobId),
    /// A categorical value names no option of the knob.
    OutOfDomain(KnobId),
    /// The knob changed too recently.
    KnobRateLimited {
        /// Which knob.
        knob: KnobId,
        /// Earliest tick a change is allowed.
        until: Tick,
    },
    /// The variant is not on the allowlist.
    VariantNotAllowed(VariantId),
    /// The variant changed too recently.
    VariantRateLimited {
        /// Earliest tick a change is allowed.
        until: Tick,
    },
    /// After clipping, the candidate equals the active configuration.
    NoOp,
    /// An approval or denial named a trace that is not awaiting approval.
    UnknownTrace,
    /// The operator denied the proposal.
    Denied,
}

/// Which limit a window broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreachKind {
    /// p99 time to first token above its limit.
    TtftP99,
    /// p99 inter-token latency above its limit.
    ItlP99,
    /// Error rate above its limit.
    ErrorRate,
    /// Device memory share above its limit.
    Memory,
}

/// Why the executor is rolling back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackReason {
    /// A window broke a limit.
    Breach(BreachKind),
    /// The runtime failed to stage the candidate.
    StageFailed,
    /// The runtime failed to route traffic to the candidate.
    CommitFailed,
    /// Telemetry went missing or stale.
    StaleTelemetry,
    /// The kill switch.
    KillSwitch,
    /// An operator aborted the experiment.
    OperatorAbort,
    /// The process restarted mid-experiment (or the runtime disagrees with
    /// the recovered state).
    Recovery,
}

/// Why the executor is holding instead of acting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldReason {
    /// Telemetry is missing or stale; the baseline is kept.
    StaleTelemetry,
    /// A breach with nothing to roll back (already on the baseline).
    BreachOnBaseline(BreachKind),
    /// The canary step has not gathered enough clean evidence yet.
    Gathering {
        /// Clean windows so far at this step.
        windows: u32,
        /// Canary requests so far at this step.
        samples: u64,
    },
    /// A rollback failed and will be retried on the next tick.
    RollbackRetry,
}

/// The executor's verdict on one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Proposal accepted; staging the candidate.
    Accepted,
    /// Proposal parked until an operator approves it.
    AwaitingApproval,
    /// Proposal refused.
    Rejected(RejectReason),
    /// Candidate staged; first canary step committed.
    CanaryStarted(CanaryFraction),
    /// Canary moved to the next step.
    CanaryAdvanced(CanaryFraction),
    /// Canary passed its last step: the candidate is active and the baseline.
    Promoted,
    /// Rolling back.
    RollingBack(RollbackReason),
    /// The rollback completed.
    RolledBack,
    /// Not acting, for a reason.
    Hold(HoldReason),
    /// Kill switch engaged: adaptation frozen.
    Frozen,
    /// Adaptation resumed.
    Resumed,
    /// The active configuration is now the baseline.
    BaselineSet,
    /// Input recorded; nothing to do.
    Noted,
}

/// A staged change as handed to the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The proposal this came from.
    pub trace: TraceId,
    /// The configuration serving now (the control).
    pub base: Config,
    /// The configuration to stage (the canary).
    pub candidate: Config,
}

/// What the runtime must do.
// `Stage` is large (two configs) but the enum stays `Copy` and inline on
// purpose: boxing it would allocate on every decision.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Prepare the candidate without affecting traffic.
    Stage(Change),
    /// Route this share of new requests to the staged candidate (1000 ‰
    /// makes it the active configuration).
    Commit(CanaryFraction),
    /// Stop any canary and serve `to` for all new requests.
    Rollback(Config),
}

/// Knobs clipped while building a candidate, as bitmasks over [`KnobId`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipSet {
    /// Clamped to a hard bound.
    pub bound: u16,
    /// Limited to the maximum delta per step.
    pub delta: u16,
}

impl ClipSet {
    /// Whether anything was clipped.
    pub fn any(&self) -> bool {
        self.bound != 0 || self.delta != 0
    }
}

/// One decision: everything the executor concluded from one input.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The input's (monotone) time.
    pub at: Tick,
    /// The proposal concerned, if any.
    pub trace: Option<TraceId>,
    /// The verdict.
    pub verdict: Verdict,
    /// What the runtime must do, if anything.
    pub effect: Option<Effect>,
    /// What was clipped.
    pub clips: ClipSet,
}
