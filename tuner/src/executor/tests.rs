//! Deterministic state-machine tests: exact inputs, exact decisions.

use super::*;
use crate::governance::{ChangeKind, Governance, Scope, TargetId, Tier};
use crate::knobs::{KnobId, KnobSpace, KnobValue, Patch, VariantId};
use crate::summary::CohortHealth;
use crate::units::{CanaryFraction, Micros, Permille};

const SEC: u64 = 1_000_000;

fn guard() -> GuardConfig {
    let slo = Slo {
        ttft_p99: Micros::from_millis(500),
        itl_p99: Micros::from_millis(50),
        max_error_rate: Permille::new(10).unwrap(),
        max_mem: Permille::new(900).unwrap(),
    };
    let mut g = GuardConfig::new(Scope::Prod, TargetId(7), KnobSpace::unit_cube(3).unwrap(), slo);
    g.knobs[0].min_interval = Micros::from_secs(100);
    g.knobs[2].allowed = false;
    g.variants = vec![VariantId(0), VariantId(1)];
    g
}

fn exec() -> Executor {
    let g = guard();
    let initial = Config::defaults(&g.space, VariantId(0));
    Executor::new(g, initial, Tick(0)).unwrap()
}

fn proposal(trace: u64, patch: Patch) -> Proposal {
    let kind = if patch.variant.is_some() { ChangeKind::Structure } else { ChangeKind::Knob };
    Proposal {
        meta: Governance::tier2(
            crate::governance::OperatorId { id: 1, version: 3 },
            Scope::Prod,
            TargetId(7),
            kind,
            TraceId(trace),
        ),
        patch,
    }
}

fn knob(id: u8, v: f64) -> Patch {
    Patch::knob(KnobId(id), KnobValue::Continuous(v))
}

fn health(start: u64, control: u64, canary: u64, canary_p99_ms: u64) -> HealthSummary {
    let c = |requests, p99| CohortHealth {
        requests,
        errors: 0,
        ttft_p99: Micros::from_millis(p99),
        itl_p99: Micros::from_millis(20),
    };
    HealthSummary {
        start: Tick(start * SEC),
        end: Tick((start + 1) * SEC),
        control: c(control, 100),
        canary: c(canary, canary_p99_ms),
        mem_share: Permille::new(500).unwrap(),
        device_samples: 1,
        dropped: 0,
    }
}

fn ok(op: ControlOp) -> Input {
    Input::Control(ControlOutcome { op, error: None })
}

fn at(s: u64) -> Tick {
    Tick(s * SEC)
}

/// Feeds a healthy window at `s` and proposes; returns the proposal's decision.
fn warm_and_propose(e: &mut Executor, s: u64, p: Proposal) -> Decision {
    e.handle(at(s), &Input::Telemetry(health(s.saturating_sub(1), 500, 0, 100)));
    e.handle(at(s), &Input::Propose(p))
}

/// Stage ok + commit ok for the first step.
fn start_canary(e: &mut Executor, s: u64) {
    let d = e.handle(at(s), &ok(ControlOp::Stage));
    assert_eq!(d.verdict, Verdict::CanaryStarted(CanaryFraction::new(50).unwrap()));
    assert_eq!(d.effect, Some(Effect::Commit(CanaryFraction::new(50).unwrap())));
    let d = e.handle(at(s), &ok(ControlOp::Commit));
    assert_eq!(d.verdict, Verdict::Noted);
}

#[test]
fn no_proposal_before_telemetry() {
    let mut e = exec();
    let d = e.handle(at(1), &Input::Propose(proposal(1, knob(0, 0.55))));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::NoTelemetry));
    assert_eq!(d.effect, None);
}

#[test]
fn happy_path_clips_ramps_and_promotes() {
    let mut e = exec();
    let d = warm_and_propose(&mut e, 1, proposal(1, knob(0, 0.9)));
    assert_eq!(d.verdict, Verdict::Accepted);
    assert_eq!(d.clips, ClipSet { bound: 0, delta: 1 });
    let Some(Effect::Stage(change)) = d.effect else { panic!("expected a stage effect, got {d:?}") };
    assert_eq!(change.base, *e.baseline());
    let v = change.candidate.knobs.get(KnobId(0)).unwrap().as_f64();
    assert!((v - 0.6).abs() < 1e-12, "delta clipped to 0.1: {v}");
    start_canary(&mut e, 1);
    let steps = [250, 500, 1000];
    let mut s = 2;
    // Windows starting at or after the step's commit count towards its gate.
    for (i, next) in steps.iter().enumerate() {
        let d = e.handle(at(s + 1), &Input::Telemetry(health(s, 1000, 150, 200)));
        assert_eq!(d.verdict, Verdict::Hold(HoldReason::Gathering { windows: 1, samples: 150 }));
        let d = e.handle(at(s + 2), &Input::Telemetry(health(s + 1, 1000, 150, 200)));
        let f = CanaryFraction::new(*next).unwrap();
        assert_eq!(d.verdict, Verdict::CanaryAdvanced(f), "step {i}");
        assert_eq!(d.effect, Some(Effect::Commit(f)));
        // A window straddling the new commit does not count.
        let d = e.handle(at(s + 2), &ok(ControlOp::Commit));
        assert_eq!(d.verdict, Verdict::Noted);
        let d = e.handle(at(s + 3), &Input::Telemetry(health(s + 1, 1000, 150, 200)));
        assert_eq!(d.verdict, Verdict::Hold(HoldReason::Gathering { windows: 0, samples: 0 }));
        s += 2;
    }
    let d = e.handle(at(s + 1), &Input::Telemetry(health(s + 1, 0, 1000, 200)));
    assert!(matches!(d.verdict, Verdict::Hold(_)));
    let d = e.handle(at(s + 2), &Input::Telemetry(health(s + 2, 0, 1000, 200)));
    assert_eq!(d.verdict, Verdict::Promoted);
    assert_eq!(e.active(), &change.candidate);
    assert_eq!(e.baseline(), &change.candidate);
    assert_eq!(e.state().phase, Phase::Idle);
    assert_eq!(e.state().counters.promotions, 1);
    assert_eq!(e.state().counters.clipped, 1);
}

#[test]
fn breach_in_canary_rolls_back_on_that_window() {
    let mut e = exec();
    let base = *e.active();
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    start_canary(&mut e, 1);
    // 19 canary requests: below evidence.min_samples, not evidence.
    let d = e.handle(at(3), &Input::Telemetry(health(2, 500, 19, 900)));
    assert!(matches!(d.verdict, Verdict::Hold(HoldReason::Gathering { .. })));
    let d = e.handle(at(4), &Input::Telemetry(health(3, 500, 20, 900)));
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::Breach(BreachKind::TtftP99)));
    assert_eq!(d.effect, Some(Effect::Rollback(base)));
    assert_eq!(d.trace, Some(TraceId(1)));
    let d = e.handle(at(4), &ok(ControlOp::Rollback));
    assert_eq!(d.verdict, Verdict::RolledBack);
    assert_eq!(e.active(), &base);
    assert_eq!(e.state().phase, Phase::Idle);
    assert_eq!(e.state().counters.breaches, 1);
}

#[test]
fn memory_breach_counts_without_samples() {
    let mut e = exec();
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    start_canary(&mut e, 1);
    let mut h = health(2, 0, 0, 100);
    h.mem_share = Permille::new(950).unwrap();
    let d = e.handle(at(3), &Input::Telemetry(h));
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::Breach(BreachKind::Memory)));
}

#[test]
fn rejections_name_their_reason() {
    let mut e = exec();
    e.handle(at(1), &Input::Telemetry(health(0, 500, 0, 100)));
    let cases: Vec<(Proposal, RejectReason)> = vec![
        (
            {
                let mut p = proposal(1, knob(1, 0.6));
                p.meta.tier = Tier::Omega;
                p
            },
            RejectReason::OmegaInProd,
        ),
        (
            {
                let mut p = proposal(2, knob(1, 0.6));
                p.meta.scope = Scope::Staging;
                p
            },
            RejectReason::ScopeMismatch,
        ),
        (
            {
                let mut p = proposal(3, knob(1, 0.6));
                p.meta.target = TargetId(8);
                p
            },
            RejectReason::TargetMismatch,
        ),
        (proposal(4, knob(2, 0.6)), RejectReason::KnobNotAllowed(KnobId(2))),
        (proposal(5, knob(9, 0.6)), RejectReason::UnknownKnob(KnobId(9))),
        (proposal(6, knob(1, f64::NAN)), RejectReason::NonFinite(KnobId(1))),
        (proposal(7, Patch::knob(KnobId(1), KnobValue::Integer(1))), RejectReason::TypeMismatch(KnobId(1))),
        (proposal(8, Patch::variant(VariantId(5))), RejectReason::VariantNotAllowed(VariantId(5))),
        (proposal(9, knob(1, 0.5)), RejectReason::NoOp),
        (proposal(10, Patch::default()), RejectReason::Empty),
    ];
    for (p, want) in cases {
        let d = e.handle(at(1), &Input::Propose(p));
        assert_eq!(d.verdict, Verdict::Rejected(want), "{p:?}");
        assert_eq!(d.effect, None);
    }
    assert_eq!(e.state().phase, Phase::Idle);
    assert_eq!(e.state().counters.rejected, 10);
}

#[test]
fn one_experiment_at_a_time_and_rate_limits() {
    let mut e = exec();
    warm_and_propose(&mut e, 1, proposal(1, knob(0, 0.55)));
    let d = e.handle(at(1), &Input::Propose(proposal(2, knob(1, 0.55))));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::Busy));
    start_canary(&mut e, 1);
    e.handle(
        at(2),
        &Input::Operator(OperatorCommand {
            operator: crate::governance::OperatorId { id: 9, version: 1 },
            action: OperatorAction::Abort,
        }),
    );
    e.handle(at(2), &ok(ControlOp::Rollback));
    assert_eq!(e.state().phase, Phase::Idle);
    // Knob 0 reached traffic at 1 s; its interval is 100 s.
    let d = warm_and_propose(&mut e, 50, proposal(3, knob(0, 0.45)));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::KnobRateLimited { knob: KnobId(0), until: at(101) }));
    // Knob 1 has no interval.
    let d = warm_and_propose(&mut e, 50, proposal(4, knob(1, 0.45)));
    assert_eq!(d.verdict, Verdict::Accepted);
}

#[test]
fn kill_switch_freezes_and_returns_to_baseline() {
    let mut e = exec();
    let baseline = *e.baseline();
    warm_and_propose(&mut e, 1, proposal(1, Patch::variant(VariantId(1))));
    start_canary(&mut e, 1);
    let kill = Input::Operator(OperatorCommand {
        operator: crate::governance::OperatorId { id: 9, version: 1 },
        action: OperatorAction::Kill,
    });
    let d = e.handle(at(2), &kill);
    assert_eq!(d.verdict, Verdict::Frozen);
    assert_eq!(d.effect, Some(Effect::Rollback(baseline)));
    e.handle(at(2), &ok(ControlOp::Rollback));
    assert_eq!(e.state().phase, Phase::Frozen);
    let d = warm_and_propose(&mut e, 3, proposal(2, knob(1, 0.55)));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::Frozen));
    let d = e.handle(
        at(4),
        &Input::Operator(OperatorCommand {
            operator: crate::governance::OperatorId { id: 9, version: 1 },
            action: OperatorAction::Resume,
        }),
    );
    assert_eq!(d.verdict, Verdict::Resumed);
    assert_eq!(e.state().phase, Phase::Idle);
}

#[test]
fn stale_telemetry_holds_and_keeps_baseline() {
    let mut e = exec();
    let baseline = *e.baseline();
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    start_canary(&mut e, 1);
    let d = e.handle(at(30), &Input::Tick);
    assert_eq!(d.verdict, Verdict::Noted, "30 s is not yet stale");
    let d = e.handle(at(32), &Input::Tick);
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::StaleTelemetry));
    assert_eq!(d.effect, Some(Effect::Rollback(baseline)));
    e.handle(at(32), &ok(ControlOp::Rollback));
    let d = e.handle(at(33), &Input::Tick);
    assert_eq!(d.verdict, Verdict::Hold(HoldReason::StaleTelemetry));
    let d = e.handle(at(33), &Input::Propose(proposal(2, knob(1, 0.55))));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::StaleTelemetry));
    assert_eq!(e.state().counters.stale_events, 1);
}

#[test]
fn approval_flow() {
    let mut e = exec();
    let mut p = proposal(5, knob(1, 0.55));
    p.meta.approval_required = true;
    let d = warm_and_propose(&mut e, 1, p);
    assert_eq!(d.verdict, Verdict::AwaitingApproval);
    assert_eq!(d.effect, None);
    let op = crate::governance::OperatorId { id: 2, version: 1 };
    let d = e
        .handle(at(2), &Input::Operator(OperatorCommand { operator: op, action: OperatorAction::Approve(TraceId(6)) }));
    assert_eq!(d.verdict, Verdict::Rejected(RejectReason::UnknownTrace));
    let d = e
        .handle(at(2), &Input::Operator(OperatorCommand { operator: op, action: OperatorAction::Approve(TraceId(5)) }));
    assert_eq!(d.verdict, Verdict::Accepted);
    assert!(matches!(d.effect, Some(Effect::Stage(_))));
}

#[test]
fn failed_rollback_is_retried_on_tick() {
    let mut e = exec();
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    let d = e.handle(
        at(1),
        &Input::Control(ControlOutcome { op: ControlOp::Stage, error: Some(ControlErrorKind::Rejected) }),
    );
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::StageFailed));
    let d = e.handle(
        at(1),
        &Input::Control(ControlOutcome { op: ControlOp::Rollback, error: Some(ControlErrorKind::Unavailable) }),
    );
    assert_eq!(d.verdict, Verdict::Hold(HoldReason::RollbackRetry));
    let d = e.handle(at(2), &Input::Tick);
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::StageFailed));
    assert!(matches!(d.effect, Some(Effect::Rollback(_))));
    assert_eq!(e.state().counters.control_failures, 2);
}

#[test]
fn backwards_ticks_are_clamped_and_counted() {
    let mut e = exec();
    e.handle(at(10), &Input::Tick);
    let d = e.handle(at(5), &Input::Tick);
    assert_eq!(d.at, at(10));
    assert_eq!(e.state().counters.clock_regressions, 1);
}

#[test]
fn idle_breach_off_baseline_rolls_back_to_baseline() {
    let mut e = exec();
    let baseline = *e.baseline();
    // After a promotion the candidate is the baseline: a breach there has
    // nothing to roll back to, so the executor holds; a proposal made now is
    // a remediation, and control breaches do not roll it back.
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    start_canary(&mut e, 1);
    for s in 2..20 {
        e.handle(at(s + 1), &Input::Telemetry(health(s, 1000, 1000, 100)));
        if e.state().phase == Phase::Idle {
            break;
        }
        e.handle(at(s + 1), &ok(ControlOp::Commit));
    }
    assert_eq!(e.state().counters.promotions, 1);
    let mut h = health(30, 1000, 0, 100);
    h.control.ttft_p99 = Micros::from_millis(800);
    let d = e.handle(at(31), &Input::Telemetry(h));
    assert_eq!(d.verdict, Verdict::Hold(HoldReason::BreachOnBaseline(BreachKind::TtftP99)));
    assert_ne!(e.active(), &baseline, "promotion moved the baseline");
    let d = e.handle(at(31), &Input::Propose(proposal(2, knob(1, 0.6))));
    assert_eq!(d.verdict, Verdict::Accepted);
    start_canary(&mut e, 31);
    let d = e.handle(at(32), &Input::Telemetry(h));
    assert!(matches!(d.verdict, Verdict::Hold(HoldReason::Gathering { .. })), "{d:?}");
    let mut bad = health(32, 1000, 100, 900);
    bad.control.ttft_p99 = Micros::from_millis(800);
    let d = e.handle(at(33), &Input::Telemetry(bad));
    assert_eq!(d.verdict, Verdict::RollingBack(RollbackReason::Breach(BreachKind::TtftP99)));
}

#[test]
fn executor_state_round_trips_through_json() {
    let mut e = exec();
    warm_and_propose(&mut e, 1, proposal(1, knob(1, 0.55)));
    let s = serde_json::to_string(&e).unwrap();
    let back: Executor = serde_json::from_str(&s).unwrap();
    assert_eq!(back, e);
}
