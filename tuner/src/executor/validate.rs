//! Proposal validation: the checks between "proposed" and "accepted".
//!
//! Runs on every proposal, so it is allocation-free and bounded by the
//! number of knobs (at most [`crate::knobs::MAX_KNOBS`]).

use crate::executor::decision::{ClipSet, RejectReason};
use crate::executor::state::Phase;
use crate::executor::Executor;
use crate::governance::{check_tier_rules, Proposal};
use crate::knobs::{Config, KnobValue};
use crate::units::Tick;

/// A proposal that passed validation: the clipped candidate and what was clipped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Validated {
    /// The configuration to stage.
    pub candidate: Config,
    /// Knobs clipped to bounds or to the delta limit.
    pub clips: ClipSet,
}

impl Executor {
    /// Validates `p` at `at` against the rules and the current state, without
    /// changing anything. The first failing check is the reason.
    pub fn validate(&self, at: Tick, p: &Proposal) -> Result<Validated, RejectReason> {
        self.admit(p, false)?;
        self.validate_change(at, p)
    }

    /// Tier rules, kill switch, scope, target and (unless re-validating an
    /// approved proposal) the one-experiment-at-a-time rule.
    pub(crate) fn admit(&self, p: &Proposal, approving: bool) -> Result<(), RejectReason> {
        check_tier_rules(&p.meta, &p.patch)?;
        match self.state.phase {
            Phase::Frozen | Phase::RollingBack { freeze: true, .. } => return Err(RejectReason::Frozen),
            _ => {}
        }
        if p.meta.scope != self.guard.scope {
            return Err(RejectReason::ScopeMismatch);
        }
        if p.meta.target != self.guard.target {
            return Err(RejectReason::TargetMismatch);
        }
        let free = match self.state.phase {
            Phase::Idle => true,
            Phase::AwaitingApproval { .. } => approving,
            _ => false,
        };
        if !free {
            return Err(RejectReason::Busy);
        }
        Ok(())
    }

    /// Freshness, allowlists, kinds, bounds, deltas and rate limits;
    /// builds the candidate.
    pub(crate) fn validate_change(&self, at: Tick, p: &Proposal) -> Result<Validated, RejectReason> {
        match self.state.last_telemetry {
            None => return Err(RejectReason::NoTelemetry),
            Some(t) if at.since(t) > self.guard.stale_after => return Err(RejectReason::StaleTelemetry),
            Some(_) => {}
        }
        if p.patch.is_empty() {
            return Err(RejectReason::Empty);
        }
        let active = &self.state.active;
        let mut candidate = *active;
        let mut clips = ClipSet::default();
        for (id, v) in p.patch.iter() {
            let (Some(spec), Some(g), Some(cur)) =
                (self.guard.space.spec(id), self.guard.knob(id), active.knobs.get(id))
            else {
                return Err(RejectReason::UnknownKnob(id));
            };
            if !g.allowed {
                return Err(RejectReason::KnobNotAllowed(id));
            }
            if !spec.same_kind(v) {
                return Err(RejectReason::TypeMismatch(id));
            }
            if let KnobValue::Continuous(x) = v {
                if !x.is_finite() {
                    return Err(RejectReason::NonFinite(id));
                }
            }
            let Some((bounded, bound_clip)) = g.clamp_bounds(spec.domain, v) else {
                return Err(RejectReason::OutOfDomain(id));
            };
            let (stepped, delta_clip) = g.clip_delta(cur, bounded);
            // Re-clamp: rounding in the delta step must not leave the bounds.
            let stepped = g.clamp_bounds(spec.domain, stepped).map_or(cur, |(x, _)| x);
            if stepped != cur {
                if let Some(last) = self.state.last_knob_change[id.index()] {
                    let until = last.plus(g.min_interval);
                    if at < until {
                        return Err(RejectReason::KnobRateLimited { knob: id, until });
                    }
                }
            }
            let bit = 1u16 << id.0;
            if bound_clip {
                clips.bound |= bit;
            }
            if delta_clip {
                clips.delta |= bit;
            }
            candidate.knobs.set(id, stepped);
        }
        if let Some(v) = p.patch.variant {
            if v != active.variant {
                if !self.guard.variant_allowed(v) {
                    return Err(RejectReason::VariantNotAllowed(v));
                }
                if let Some(last) = self.state.last_variant_change {
                    let until = last.plus(self.guard.variant_min_interval);
                    if at < until {
                        return Err(RejectReason::VariantRateLimited { until });
                    }
                }
                candidate.variant = v;
            }
        }
        if candidate == *active {
            return Err(RejectReason::NoOp);
        }
        Ok(Validated { candidate, clips })
    }
}
