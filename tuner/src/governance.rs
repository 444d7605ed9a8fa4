//! Governance metadata carried by every proposal, and the tier rules.
//!
//! Purpose: a [`Proposal`] is a [`Patch`] plus [`Governance`]: who proposes
//! (operator id and version), at which [`Tier`], with what [`Risk`], for
//! which [`Scope`] and [`TargetId`], what [`ChangeKind`], under which
//! [`Constraints`], with what [`ExpectedImpact`], how to roll back, whether a
//! human must approve, and a [`TraceId`] that follows it through the audit log.
//!
//! Tiers: **1** is the guardrail executor itself and operator tooling;
//! **2** is online policies (bandits, ES/SPSA) that may move prod only through
//! bounded deltas and the canary; **Ω** is open-ended exploration (new
//! variants, structural search) and may never target prod.
//!
//! Invariants: [`check_tier_rules`] is pure and is the first thing the
//! executor runs on a proposal; an Ω proposal for prod is rejected no matter
//! what else it says. Policies only *emit* proposals: nothing in this module
//! (or in `bandit`/`optim`) can change serving state.

use serde::{Deserialize, Serialize};

use crate::executor::RejectReason;
use crate::knobs::Patch;
use crate::units::{serde_f64, Micros, Permille, Probability};

/// Who proposes: an operator (policy instance, tool or person) and its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OperatorId {
    /// Stable operator number (mapped to a name outside the tuner).
    pub id: u32,
    /// Version of that operator's code or policy.
    pub version: u32,
}

/// The tier a proposal comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// Guardrails and operator tooling.
    One,
    /// Online policies: bounded deltas through the canary only.
    Two,
    /// Open-ended exploration: never prod.
    Omega,
}

/// Declared risk of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Risk {
    /// Small, well-understood change.
    Low,
    /// Default.
    Medium,
    /// Needs a human in prod.
    High,
}

/// Which environment a proposal is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Serving real users.
    Prod,
    /// Pre-production mirror.
    Staging,
    /// Throwaway experiments.
    Sandbox,
}

/// The deployment a proposal targets (one executor guards one target).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TargetId(pub u32);

/// What sort of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Knob values only.
    Knob,
    /// The serving variant (optionally with knobs).
    Structure,
    /// The tuning policy itself: reviewed offline, never applied by the executor.
    Policy,
}

/// Limits the proposer asks the executor to hold; the executor enforces the
/// stricter of these and its own SLO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraints {
    /// p99 time-to-first-token limit.
    pub ttft_p99: Option<Micros>,
    /// p99 inter-token latency limit.
    pub itl_p99: Option<Micros>,
    /// Highest acceptable error rate.
    pub max_error_rate: Option<Permille>,
    /// Highest acceptable device memory share.
    pub max_mem: Option<Permille>,
}

/// The proposer's prediction.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpectedImpact {
    /// Predicted change of the reward (policy units; may be non-finite in
    /// adversarial input, which is logged but never trusted).
    #[serde(with = "serde_f64")]
    pub reward_delta: f64,
    /// Confidence in the prediction.
    pub confidence: Probability,
}

/// Where to go if the change is rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RollbackPlan {
    /// The configuration active before the change.
    Previous,
    /// The known-good baseline snapshot.
    Baseline,
}

/// Correlates a proposal with its decisions in the audit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceId(pub u64);

/// Governance metadata on every proposal.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Governance {
    /// Who proposes.
    pub operator: OperatorId,
    /// From which tier.
    pub tier: Tier,
    /// Declared risk.
    pub risk: Risk,
    /// For which environment.
    pub scope: Scope,
    /// For which deployment.
    pub target: TargetId,
    /// What sort of change.
    pub kind: ChangeKind,
    /// Limits to hold.
    pub constraints: Constraints,
    /// Predicted impact.
    pub expected: ExpectedImpact,
    /// Where a rollback goes.
    pub rollback: RollbackPlan,
    /// Whether an operator must approve before staging.
    pub approval_required: bool,
    /// Correlation id.
    pub trace: TraceId,
}

impl Governance {
    /// Typical metadata for a tier-2 policy proposal (low risk, no approval,
    /// roll back to previous); adjust fields as needed.
    pub fn tier2(operator: OperatorId, scope: Scope, target: TargetId, kind: ChangeKind, trace: TraceId) -> Governance {
        Governance {
            operator,
            tier: Tier::Two,
            risk: Risk::Low,
            scope,
            target,
            kind,
            constraints: Constraints::default(),
            expected: ExpectedImpact {
                reward_delta: 0.0,
                confidence: Probability::new(0.5).unwrap_or_else(|_| unreachable!()),
            },
            rollback: RollbackPlan::Previous,
            approval_required: false,
            trace,
        }
    }
}

/// A proposed change: what and the governance around it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Governance metadata.
    pub meta: Governance,
    /// The change.
    pub patch: Patch,
}

/// The tier and kind rules that hold regardless of executor state.
///
/// * Ω never targets prod.
/// * A policy change is never applied through the serving path.
/// * The kind matches the patch: `Knob` touches no variant, `Structure`
///   changes the variant.
/// * High risk in prod requires approval.
pub fn check_tier_rules(meta: &Governance, patch: &Patch) -> Result<(), RejectReason> {
    if meta.tier == Tier::Omega && meta.scope == Scope::Prod {
        return Err(RejectReason::OmegaInProd);
    }
    match meta.kind {
        ChangeKind::Policy => return Err(RejectReason::PolicyChangeNotServing),
        ChangeKind::Knob if patch.variant.is_some() => return Err(RejectReason::KindMismatch),
        ChangeKind::Structure if patch.variant.is_none() => return Err(RejectReason::KindMismatch),
        _ => {}
    }
    if meta.scope == Scope::Prod && meta.risk == Risk::High && !meta.approval_required {
        return Err(RejectReason::ApprovalMissing);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knobs::{KnobId, KnobValue, VariantId};

    fn meta(tier: Tier, scope: Scope, kind: ChangeKind) -> Governance {
        let mut m = Governance::tier2(OperatorId { id: 1, version: 1 }, scope, TargetId(0), kind, TraceId(1));
        m.tier = tier;
        m
    }

    #[test]
    fn omega_never_in_prod() {
        let p = Patch::knob(KnobId(0), KnobValue::Integer(1));
        let m = meta(Tier::Omega, Scope::Prod, ChangeKind::Knob);
        assert_eq!(check_tier_rules(&m, &p), Err(RejectReason::OmegaInProd));
        let m = meta(Tier::Omega, Scope::Sandbox, ChangeKind::Knob);
        assert_eq!(check_tier_rules(&m, &p), Ok(()));
    }

    #[test]
    fn kind_must_match_patch() {
        let knob = Patch::knob(KnobId(0), KnobValue::Integer(1));
        let var = Patch::variant(VariantId(1));
        let m = meta(Tier::Two, Scope::Prod, ChangeKind::Structure);
        assert_eq!(check_tier_rules(&m, &knob), Err(RejectReason::KindMismatch));
        assert_eq!(check_tier_rules(&m, &var), Ok(()));
        let m = meta(Tier::Two, Scope::Prod, ChangeKind::Knob);
        assert_eq!(check_tier_rules(&m, &var), Err(RejectReason::KindMismatch));
        let m = meta(Tier::One, Scope::Prod, ChangeKind::Policy);
        assert_eq!(check_tier_rules(&m, &knob), Err(RejectReason::PolicyChangeNotServing));
    }

    #[test]
    fn high_risk_prod_needs_approval() {
        let p = Patch::knob(KnobId(0), KnobValue::Integer(1));
        let mut m = meta(Tier::Two, Scope::Prod, ChangeKind::Knob);
        m.risk = Risk::High;
        assert_eq!(check_tier_rules(&m, &p), Err(RejectReason::ApprovalMissing));
        m.approval_required = true;
        assert_eq!(check_tier_rules(&m, &p), Ok(()));
    }

    #[test]
    fn proposal_serde_round_trips_non_finite_impact() {
        let mut m = meta(Tier::Two, Scope::Prod, ChangeKind::Knob);
        m.expected.reward_delta = f64::INFINITY;
        let p = Proposal { meta: m, patch: Patch::knob(KnobId(2), KnobValue::Continuous(f64::NEG_INFINITY)) };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Proposal>(&s).unwrap(), p);
    }
}
