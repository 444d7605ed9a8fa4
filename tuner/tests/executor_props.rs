//! Property tests of the guardrail executor under arbitrary (adversarial)
//! input sequences: bounds, deltas, rate limits, allowlists, tier rules,
//! rollback on breach, and exact replay from the audit log.

use std::collections::VecDeque;

use arqon_tuner::audit::{self, AuditLog, FsyncPolicy};
use arqon_tuner::executor::{
    breach_of, is_empty, Change, ControlError, Decision, Driver, Effect, Evidence, Executor, GuardConfig,
    OperatorAction, OperatorCommand, Phase, RollbackReason, ServingControl, Slo, StageToken, Verdict,
};
use arqon_tuner::governance::{
    ChangeKind, Constraints, ExpectedImpact, Governance, OperatorId, Proposal, Risk, RollbackPlan, Scope, TargetId,
    Tier, TraceId,
};
use arqon_tuner::knobs::{Config, KnobId, KnobSpace, KnobSpec, KnobValue, Patch, Unit, VariantId};
use arqon_tuner::summary::{CohortHealth, HealthSummary};
use arqon_tuner::telemetry::Cohort;
use arqon_tuner::units::{CanaryFraction, Micros, Permille, Probability, Tick};
use arqon_tuner::Input;
use proptest::prelude::*;

const SEC: u64 = 1_000_000;

fn guard() -> GuardConfig {
    let space = KnobSpace::new(vec![
        KnobSpec::continuous("k0", Unit::Micros, 0.0, 100.0, 50.0).unwrap(),
        KnobSpec::continuous("k1", Unit::Ratio, 0.0, 1.0, 0.5).unwrap(),
        KnobSpec::integer("k2", Unit::Tokens, 1, 64, 8).unwrap(),
        KnobSpec::categorical("k3", 3, 0).unwrap(),
    ])
    .unwrap();
    let slo = Slo {
        ttft_p99: Micros::from_millis(400),
        itl_p99: Micros::from_millis(80),
        max_error_rate: Permille::new(20).unwrap(),
        max_mem: Permille::new(900).unwrap(),
    };
    let mut g = GuardConfig::new(Scope::Prod, TargetId(1), space, slo);
    g.knobs[0].lo = 10.0;
    g.knobs[0].hi = 90.0;
    g.knobs[0].max_delta = 5.0;
    g.knobs[0].min_interval = Micros::from_secs(30);
    g.knobs[1].allowed = false;
    g.knobs[2].max_delta = 4.0;
    g.variants = vec![VariantId(0), VariantId(1), VariantId(2), VariantId(3)];
    g.variant_min_interval = Micros::from_secs(60);
    g.canary.min_windows = 1;
    g.canary.min_samples = 50;
    g.stale_after = Micros::from_secs(45);
    g.evidence = Evidence { min_samples: 10, min_errors: 2 };
    g
}

/// A runtime that fails calls on a script.
#[derive(Debug)]
struct Flaky {
    active: Config,
    fails: VecDeque<bool>,
    next: u64,
}

impl Flaky {
    fn fail(&mut self) -> bool {
        self.fails.pop_front().unwrap_or(false)
    }
}

impl ServingControl for Flaky {
    fn stage(&mut self, _c: &Change) -> Result<StageToken, ControlError> {
        if self.fail() {
            return Err(ControlError::Rejected { reason: "scripted".into() });
        }
        self.next += 1;
        Ok(StageToken(self.next))
    }
    fn commit(&mut self, _t: StageToken, _f: CanaryFraction) -> Result<(), ControlError> {
        if self.fail() {
            return Err(ControlError::Unavailable { reason: "scripted".into() });
        }
        Ok(())
    }
    fn rollback(&mut self, to: &Config) -> Result<(), ControlError> {
        if self.fail() {
            return Err(ControlError::Unavailable { reason: "scripted".into() });
        }
        self.active = *to;
        Ok(())
    }
    fn active(&self) -> Config {
        self.active
    }
}

#[allow(clippy::large_enum_variant)] // test data, built once per case
#[derive(Clone, Debug)]
enum Op {
    Propose(Proposal),
    Telemetry(HealthSummary),
    Tick,
    Operator(OperatorAction),
}

fn value() -> impl Strategy<Value = KnobValue> {
    prop_oneof![
        4 => (-50.0f64..150.0).prop_map(KnobValue::Continuous),
        1 => Just(KnobValue::Continuous(f64::NAN)),
        1 => Just(KnobValue::Continuous(f64::INFINITY)),
        1 => Just(KnobValue::Continuous(-1e300)),
        2 => (-10i64..100).prop_map(KnobValue::Integer),
        1 => (0u16..5).prop_map(KnobValue::Categorical),
    ]
}

fn patch() -> impl Strategy<Value = Patch> {
    (proptest::option::weighted(0.4, 0u16..6), proptest::collection::vec((0u8..6, value()), 0..4)).prop_map(
        |(v, knobs)| {
            let mut p = Patch::default();
            p.variant = v.map(VariantId);
            for (id, val) in knobs {
                p.set(KnobId(id), val);
            }
            p
        },
    )
}

/// A plausible tier-1/2 prod proposal: right scope and target, consistent
/// kind, values of the right kind (possibly out of bounds).
fn well_formed() -> impl Strategy<Value = Proposal> {
    let knob_patch = proptest::collection::vec(
        prop_oneof![
            (-20.0f64..120.0).prop_map(|v| (0u8, KnobValue::Continuous(v))),
            (-5i64..80).prop_map(|v| (2u8, KnobValue::Integer(v))),
            (0u16..3).prop_map(|v| (3u8, KnobValue::Categorical(v))),
        ],
        1..3,
    )
    .prop_map(|ks| {
        let mut p = Patch::default();
        for (id, v) in ks {
            p.set(KnobId(id), v);
        }
        (ChangeKind::Knob, p)
    });
    let variant_patch = (0u16..5).prop_map(|v| (ChangeKind::Structure, Patch::variant(VariantId(v))));
    let tier = prop_oneof![1 => Just(Tier::One), 4 => Just(Tier::Two)];
    (prop_oneof![3 => knob_patch, 1 => variant_patch], tier, 0u64..8, proptest::bool::weighted(0.1)).prop_map(
        |((kind, patch), tier, trace, approval)| {
            let mut meta =
                Governance::tier2(OperatorId { id: 3, version: 1 }, Scope::Prod, TargetId(1), kind, TraceId(trace));
            meta.tier = tier;
            meta.approval_required = approval;
            Proposal { meta, patch }
        },
    )
}

fn proposal() -> impl Strategy<Value = Proposal> {
    prop_oneof![3 => well_formed(), 2 => adversarial()]
}

/// Anything at all: wrong scopes, targets, tiers, kinds, ids and values.
fn adversarial() -> impl Strategy<Value = Proposal> {
    let tier = prop_oneof![1 => Just(Tier::One), 3 => Just(Tier::Two), 1 => Just(Tier::Omega)];
    let scope = prop_oneof![4 => Just(Scope::Prod), 1 => Just(Scope::Staging), 1 => Just(Scope::Sandbox)];
    let kind =
        prop_oneof![3 => Just(ChangeKind::Knob), 2 => Just(ChangeKind::Structure), 1 => Just(ChangeKind::Policy)];
    let risk = prop_oneof![Just(Risk::Low), Just(Risk::Medium), Just(Risk::High)];
    (tier, scope, kind, risk, any::<bool>(), 0u32..3, 0u64..8, patch(), proptest::option::of(50u64..600)).prop_map(
        |(tier, scope, kind, risk, approval, target, trace, patch, slo_ms)| Proposal {
            meta: Governance {
                operator: OperatorId { id: 7, version: 2 },
                tier,
                risk,
                scope,
                target: TargetId(if target == 0 { 2 } else { 1 }),
                kind,
                constraints: Constraints { ttft_p99: slo_ms.map(Micros::from_millis), ..Constraints::default() },
                expected: ExpectedImpact { reward_delta: 0.1, confidence: Probability::new(0.7).unwrap() },
                rollback: if trace % 2 == 0 { RollbackPlan::Previous } else { RollbackPlan::Baseline },
                approval_required: approval && trace % 3 == 0,
                trace: TraceId(trace),
            },
            patch,
        },
    )
}

fn cohort() -> impl Strategy<Value = CohortHealth> {
    (0u64..400, 0u64..20, 10u64..900, 5u64..120).prop_map(|(requests, errors, ttft, itl)| CohortHealth {
        requests,
        errors: errors.min(requests),
        ttft_p99: Micros::from_millis(ttft),
        itl_p99: Micros::from_millis(itl),
    })
}

fn healthy_cohort() -> impl Strategy<Value = CohortHealth> {
    (0u64..400, 0u64..2, 20u64..380, 5u64..70).prop_map(|(requests, errors, ttft, itl)| CohortHealth {
        requests,
        errors: errors.min(requests),
        ttft_p99: Micros::from_millis(ttft),
        itl_p99: Micros::from_millis(itl),
    })
}

fn op() -> impl Strategy<Value = (u64, Op)> {
    let healthy = (healthy_cohort(), healthy_cohort(), 300u16..850).prop_map(|(control, canary, mem)| HealthSummary {
        start: Tick(0),
        end: Tick(0),
        control,
        canary,
        mem_share: Permille::new(mem).unwrap(),
        device_samples: 1,
        dropped: 0,
    });
    let health = (cohort(), cohort(), 300u16..1000, 0u64..3).prop_map(|(control, canary, mem, dev)| HealthSummary {
        start: Tick(0),
        end: Tick(0),
        control,
        canary,
        mem_share: Permille::new(mem).unwrap(),
        device_samples: dev,
        dropped: 0,
    });
    let action = prop_oneof![
        Just(OperatorAction::Kill),
        Just(OperatorAction::Resume),
        (0u64..8).prop_map(|t| OperatorAction::Approve(TraceId(t))),
        (0u64..8).prop_map(|t| OperatorAction::Deny(TraceId(t))),
        Just(OperatorAction::Abort),
        Just(OperatorAction::SetBaseline),
    ];
    let op = prop_oneof![
        4 => proposal().prop_map(Op::Propose),
        4 => healthy.prop_map(Op::Telemetry),
        2 => health.prop_map(Op::Telemetry),
        2 => Just(Op::Tick),
        1 => action.prop_map(Op::Operator),
    ];
    (0u64..25 * SEC, op)
}

fn within_guard(g: &GuardConfig, c: &Config, initial: &Config) -> Result<(), String> {
    for (i, v) in c.knobs.as_slice().iter().enumerate() {
        let spec = &g.space.specs()[i];
        if !spec.contains(*v) {
            return Err(format!("knob {i} = {v:?} outside its domain"));
        }
        let kg = &g.knobs[i];
        if let KnobValue::Continuous(x) = v {
            if *x < kg.lo || *x > kg.hi {
                return Err(format!("knob {i} = {x} outside hard bounds"));
            }
        }
        if !kg.allowed && *v != initial.knobs.as_slice()[i] {
            return Err(format!("non-allowlisted knob {i} moved"));
        }
    }
    if c.variant != initial.variant && !g.variants.contains(&c.variant) {
        return Err(format!("variant {:?} not allowlisted", c.variant));
    }
    Ok(())
}

fn check_change(g: &GuardConfig, change: &Change) -> Result<(), String> {
    for (i, (a, b)) in change.base.knobs.as_slice().iter().zip(change.candidate.knobs.as_slice()).enumerate() {
        let d = (b.as_f64() - a.as_f64()).abs();
        let lim = match a {
            KnobValue::Integer(_) => g.knobs[i].max_delta.floor().max(1.0),
            KnobValue::Continuous(_) => g.knobs[i].max_delta * (1.0 + 1e-9) + 1e-12,
            KnobValue::Categorical(_) => f64::INFINITY,
        };
        if d > lim {
            return Err(format!("knob {i} moved {d} > max delta {lim}"));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn executor_invariants_hold_for_any_input(ops in proptest::collection::vec(op(), 1..120),
                                               fails in proptest::collection::vec(proptest::bool::weighted(0.15), 0..64)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let g = guard();
        let initial = Config::defaults(&g.space, VariantId(0));
        let exec = Executor::new(g.clone(), initial, Tick(0)).unwrap();
        let control = Flaky { active: initial, fails: fails.into_iter().collect(), next: 0 };
        let log = AuditLog::open(&path, FsyncPolicy::Never).unwrap();
        let mut driver = Driver::new(exec, control, Some(log)).unwrap();
        let mut now = 0u64;
        let mut last_change = [None::<Tick>; 16];
        let mut last_variant_change = None::<Tick>;
        for (dt, op) in ops {
            now += dt;
            let before = *driver.executor().state();
            let input = match op {
                Op::Propose(p) => Input::Propose(p),
                Op::Telemetry(mut h) => {
                    h.start = Tick(now.saturating_sub(10 * SEC));
                    h.end = Tick(now);
                    Input::Telemetry(h)
                }
                Op::Tick => Input::Tick,
                Op::Operator(action) => Input::Operator(OperatorCommand { operator: OperatorId { id: 1, version: 1 }, action }),
            };
            let decisions: Vec<Decision> = driver.handle(Tick(now), input).unwrap().to_vec();
            let first = decisions[0];
            // Tier rules: Ω never reaches prod; only prod-scope, right-target proposals are accepted.
            if let Input::Propose(p) = input {
                if matches!(first.verdict, Verdict::Accepted | Verdict::AwaitingApproval) {
                    prop_assert!(p.meta.tier != Tier::Omega, "Ω accepted for prod");
                    prop_assert_eq!(p.meta.scope, Scope::Prod);
                    prop_assert_eq!(p.meta.target, TargetId(1));
                }
            }
            // Every breach in an experiment rolls back on the window that shows it.
            if let (Input::Telemetry(h), Phase::Canary { exp, .. }) = (input, before.phase) {
                if !is_empty(&h) && breach_of(&h, &exp.slo, g.evidence, Cohort::Canary).is_some() {
                    prop_assert!(matches!(first.verdict, Verdict::RollingBack(RollbackReason::Breach(_))),
                        "breach not rolled back: {:?}", first);
                    prop_assert!(matches!(first.effect, Some(Effect::Rollback(_))));
                }
            }
            for d in &decisions {
                match d.effect {
                    Some(Effect::Stage(c)) => {
                        within_guard(&g, &c.candidate, &initial).map_err(TestCaseError::fail)?;
                        check_change(&g, &c).map_err(TestCaseError::fail)?;
                    }
                    Some(Effect::Rollback(to)) => within_guard(&g, &to, &initial).map_err(TestCaseError::fail)?,
                    _ => {}
                }
            }
            let s = driver.executor().state();
            within_guard(&g, &s.active, &initial).map_err(TestCaseError::fail)?;
            within_guard(&g, &s.baseline, &initial).map_err(TestCaseError::fail)?;
            // Rate limits: a knob's changes reach traffic at least min_interval apart.
            for (i, kg) in g.knobs.iter().enumerate() {
                if s.last_knob_change[i] != last_change[i] {
                    if let (Some(a), Some(b)) = (last_change[i], s.last_knob_change[i]) {
                        prop_assert!(b.since(a) >= kg.min_interval, "knob {} changed after {:?}", i, b.since(a));
                    }
                    last_change[i] = s.last_knob_change[i];
                }
            }
            if s.last_variant_change != last_variant_change {
                if let (Some(a), Some(b)) = (last_variant_change, s.last_variant_change) {
                    prop_assert!(b.since(a) >= g.variant_min_interval);
                }
                last_variant_change = s.last_variant_change;
            }
        }
        // Replaying the audit log rebuilds exactly the live executor.
        let (records, report) = audit::recover(&path).unwrap();
        prop_assert!(report.torn.is_none());
        let replayed = Executor::replay(&records).unwrap();
        prop_assert_eq!(&replayed, driver.executor());
        prop_assert_eq!(serde_json::to_string(&replayed).unwrap(), serde_json::to_string(driver.executor()).unwrap());
    }

    #[test]
    fn validate_never_admits_out_of_bounds(p in proposal()) {
        let g = guard();
        let initial = Config::defaults(&g.space, VariantId(0));
        let mut e = Executor::new(g.clone(), initial, Tick(0)).unwrap();
        let h = HealthSummary { start: Tick(0), end: Tick(SEC), device_samples: 1, ..HealthSummary::default() };
        e.handle(Tick(SEC), &Input::Telemetry(h));
        if let Ok(v) = e.validate(Tick(SEC), &p) {
            within_guard(&g, &v.candidate, &initial).map_err(TestCaseError::fail)?;
            check_change(&g, &Change { trace: p.meta.trace, base: initial, candidate: v.candidate })
                .map_err(TestCaseError::fail)?;
            prop_assert!(p.meta.tier != Tier::Omega);
        }
    }
}
