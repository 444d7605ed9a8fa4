//! Proposals, runtime outcomes, clock ticks, operator commands and recovery.

use crate::executor::control::{ControlOp, ControlOutcome};
use crate::executor::decision::{Change, ClipSet, Decision, Effect, HoldReason, RejectReason, RollbackReason, Verdict};
use crate::executor::state::{Experiment, Phase};
use crate::executor::{Executor, OperatorAction, OperatorCommand};
use crate::governance::Proposal;
use crate::knobs::Config;
use crate::units::Tick;

impl Executor {
    pub(super) fn on_propose(&mut self, at: Tick, p: &Proposal) -> Decision {
        self.state.counters.proposals += 1;
        let trace = Some(p.meta.trace);
        match self.validate(at, p) {
            Err(r) => {
                self.state.counters.rejected += 1;
                self.decision(at, trace, Verdict::Rejected(r))
            }
            Ok(_) if p.meta.approval_required => {
                self.state.phase = Phase::AwaitingApproval { proposal: *p, since: at };
                self.decision(at, trace, Verdict::AwaitingApproval)
            }
            Ok(v) => self.start(at, p, v.candidate, v.clips),
        }
    }

    /// Accepts a validated proposal: stage its candidate.
    fn start(&mut self, at: Tick, p: &Proposal, candidate: Config, clips: ClipSet) -> Decision {
        let exp = Experiment {
            meta: p.meta,
            base: self.state.active,
            candidate,
            clips,
            slo: self.guard.slo.tightened(&p.meta.constraints),
            accepted_at: at,
            remedial: self.state.unhealthy,
        };
        self.state.phase = Phase::Staging { exp };
        self.state.counters.accepted += 1;
        if clips.any() {
            self.state.counters.clipped += 1;
        }
        Decision {
            at,
            trace: Some(p.meta.trace),
            verdict: Verdict::Accepted,
            effect: Some(Effect::Stage(Change { trace: p.meta.trace, base: exp.base, candidate })),
            clips,
        }
    }

    /// Enters `RollingBack` towards `to` and asks the runtime for it.
    pub(super) fn begin_rollback(&mut self, at: Tick, to: Config, reason: RollbackReason, freeze: bool) -> Decision {
        self.state.phase = Phase::RollingBack { to, reason, freeze, inflight: true };
        self.state.counters.rollbacks += 1;
        let verdict = if reason == RollbackReason::KillSwitch { Verdict::Frozen } else { Verdict::RollingBack(reason) };
        let mut d = self.decision(at, None, verdict);
        d.effect = Some(Effect::Rollback(to));
        d
    }

    /// The rollback target of the running experiment, if any.
    fn experiment(&self) -> Option<Experiment> {
        match self.state.phase {
            Phase::Staging { exp } | Phase::Canary { exp, .. } => Some(exp),
            _ => None,
        }
    }

    pub(super) fn on_control(&mut self, at: Tick, o: ControlOutcome) -> Decision {
        if o.error.is_some() {
            self.state.counters.control_failures += 1;
        }
        match (self.state.phase, o.op) {
            (Phase::Staging { exp }, ControlOp::Stage) => {
                let trace = Some(exp.meta.trace);
                if o.error.is_some() {
                    let mut d = self.begin_rollback(at, exp.base, RollbackReason::StageFailed, false);
                    d.trace = trace;
                    return d;
                }
                let first = self.guard.canary.steps[0];
                self.state.phase =
                    Phase::Canary { exp, step: 0, acked: false, step_started: at, windows: 0, samples: 0 };
                let mut d = self.decision(at, trace, Verdict::CanaryStarted(first));
                d.effect = Some(Effect::Commit(first));
                d
            }
            (Phase::Canary { exp, step, acked: false, .. }, ControlOp::Commit) => {
                let trace = Some(exp.meta.trace);
                if o.error.is_some() {
                    let mut d = self.begin_rollback(at, exp.base, RollbackReason::CommitFailed, false);
                    d.trace = trace;
                    return d;
                }
                if step == 0 {
                    // The candidate now reaches traffic: start the rate-limit clocks.
                    for (i, (a, b)) in exp.base.knobs.as_slice().iter().zip(exp.candidate.knobs.as_slice()).enumerate()
                    {
                        if a != b {
                            self.state.last_knob_change[i] = Some(at);
                        }
                    }
                    if exp.base.variant != exp.candidate.variant {
                        self.state.last_variant_change = Some(at);
                    }
                }
                self.state.phase = Phase::Canary { exp, step, acked: true, step_started: at, windows: 0, samples: 0 };
                self.decision(at, trace, Verdict::Noted)
            }
            (Phase::RollingBack { to, reason, freeze, inflight: true }, ControlOp::Rollback) => {
                if o.error.is_some() {
                    self.state.phase = Phase::RollingBack { to, reason, freeze, inflight: false };
                    return self.decision(at, None, Verdict::Hold(HoldReason::RollbackRetry));
                }
                self.state.active = to;
                self.state.phase = if freeze { Phase::Frozen } else { Phase::Idle };
                self.decision(at, None, Verdict::RolledBack)
            }
            _ => {
                self.state.counters.unexpected_outcomes += 1;
                self.decision(at, None, Verdict::Noted)
            }
        }
    }

    pub(super) fn on_tick(&mut self, at: Tick) -> Decision {
        let since = self.state.last_telemetry.unwrap_or(self.state.started);
        let stale = at.since(since) > self.guard.stale_after;
        if stale && !self.state.stale {
            self.state.counters.stale_events += 1;
        }
        self.state.stale = stale;
        match self.state.phase {
            Phase::RollingBack { to, reason, freeze, inflight: false } => {
                self.state.phase = Phase::RollingBack { to, reason, freeze, inflight: true };
                let mut d = self.decision(at, None, Verdict::RollingBack(reason));
                d.effect = Some(Effect::Rollback(to));
                d
            }
            Phase::Staging { .. } | Phase::Canary { .. } if stale => {
                let trace = self.experiment().map(|e| e.meta.trace);
                let baseline = self.state.baseline;
                let mut d = self.begin_rollback(at, baseline, RollbackReason::StaleTelemetry, false);
                d.trace = trace;
                d
            }
            Phase::Idle | Phase::AwaitingApproval { .. } if stale => {
                self.state.phase = Phase::Idle;
                if self.state.active != self.state.baseline {
                    let baseline = self.state.baseline;
                    self.begin_rollback(at, baseline, RollbackReason::StaleTelemetry, false)
                } else {
                    self.decision(at, None, Verdict::Hold(HoldReason::StaleTelemetry))
                }
            }
            _ => self.decision(at, None, Verdict::Noted),
        }
    }

    pub(super) fn on_operator(&mut self, at: Tick, cmd: &OperatorCommand) -> Decision {
        match cmd.action {
            OperatorAction::Kill => match self.state.phase {
                Phase::Frozen | Phase::RollingBack { freeze: true, .. } => self.decision(at, None, Verdict::Noted),
                Phase::Staging { .. } | Phase::Canary { .. } | Phase::RollingBack { .. } => {
                    let baseline = self.state.baseline;
                    self.begin_rollback(at, baseline, RollbackReason::KillSwitch, true)
                }
                Phase::Idle | Phase::AwaitingApproval { .. } => {
                    if self.state.active != self.state.baseline {
                        let baseline = self.state.baseline;
                        self.begin_rollback(at, baseline, RollbackReason::KillSwitch, true)
                    } else {
                        self.state.phase = Phase::Frozen;
                        self.decision(at, None, Verdict::Frozen)
                    }
                }
            },
            OperatorAction::Resume => match self.state.phase {
                Phase::Frozen => {
                    self.state.phase = Phase::Idle;
                    self.decision(at, None, Verdict::Resumed)
                }
                Phase::RollingBack { to, reason, freeze: true, inflight } => {
                    self.state.phase = Phase::RollingBack { to, reason, freeze: false, inflight };
                    self.decision(at, None, Verdict::Resumed)
                }
                _ => self.decision(at, None, Verdict::Noted),
            },
            OperatorAction::Approve(trace) => match self.state.phase {
                Phase::AwaitingApproval { proposal, .. } if proposal.meta.trace == trace => {
                    let checked = self.admit(&proposal, true).and_then(|()| self.validate_change(at, &proposal));
                    match checked {
                        Ok(v) => self.start(at, &proposal, v.candidate, v.clips),
                        Err(r) => {
                            self.state.phase = Phase::Idle;
                            self.state.counters.rejected += 1;
                            self.decision(at, Some(trace), Verdict::Rejected(r))
                        }
                    }
                }
                _ => self.decision(at, Some(trace), Verdict::Rejected(RejectReason::UnknownTrace)),
            },
            OperatorAction::Deny(trace) => match self.state.phase {
                Phase::AwaitingApproval { proposal, .. } if proposal.meta.trace == trace => {
                    self.state.phase = Phase::Idle;
                    self.state.counters.rejected += 1;
                    self.decision(at, Some(trace), Verdict::Rejected(RejectReason::Denied))
                }
                _ => self.decision(at, Some(trace), Verdict::Rejected(RejectReason::UnknownTrace)),
            },
            OperatorAction::Abort => match self.state.phase {
                Phase::Staging { exp } | Phase::Canary { exp, .. } => {
                    let mut d = self.begin_rollback(at, exp.base, RollbackReason::OperatorAbort, false);
                    d.trace = Some(exp.meta.trace);
                    d
                }
                Phase::AwaitingApproval { proposal, .. } => {
                    self.state.phase = Phase::Idle;
                    self.state.counters.rejected += 1;
                    self.decision(at, Some(proposal.meta.trace), Verdict::Rejected(RejectReason::Denied))
                }
                _ => self.decision(at, None, Verdict::Noted),
            },
            OperatorAction::SetBaseline => match self.state.phase {
                Phase::Idle => {
                    self.state.baseline = self.state.active;
                    self.decision(at, None, Verdict::BaselineSet)
                }
                _ => self.decision(at, None, Verdict::Rejected(RejectReason::Busy)),
            },
        }
    }

    pub(super) fn on_recovered(&mut self, at: Tick, runtime_active: &Config) -> Decision {
        match self.state.phase {
            Phase::Staging { exp } | Phase::Canary { exp, .. } => {
                let mut d = self.begin_rollback(at, exp.base, RollbackReason::Recovery, false);
                d.trace = Some(exp.meta.trace);
                d
            }
            Phase::RollingBack { to, reason, freeze, .. } => {
                self.state.phase = Phase::RollingBack { to, reason, freeze, inflight: true };
                let mut d = self.decision(at, None, Verdict::RollingBack(reason));
                d.effect = Some(Effect::Rollback(to));
                d
            }
            Phase::Idle | Phase::AwaitingApproval { .. } | Phase::Frozen => {
                if *runtime_active != self.state.active {
                    let freeze = self.state.phase == Phase::Frozen;
                    let active = self.state.active;
                    self.begin_rollback(at, active, RollbackReason::Recovery, freeze)
                } else {
                    self.decision(at, None, Verdict::Noted)
                }
            }
        }
    }
}
