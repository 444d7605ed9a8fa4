//! The hot calls do not allocate in steady state: bandit select/update,
//! optimiser ask/tell, executor validate and handle, ring push.
//!
//! Uses a counting global allocator (the one `unsafe` in this crate's tree,
//! confined to this test binary), so everything runs in one test function.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use arqon_tuner::bandit::{
    ArmMask, BanditPolicy, ComputeBudget, Constrained, ConstrainedConfig, ConstraintSpec, Context, Discount, LinUcb,
    LinUcbConfig, ThompsonConfig, ThompsonSampling, Ucb, UcbConfig,
};
use arqon_tuner::executor::{Executor, GuardConfig, Slo};
use arqon_tuner::governance::{ChangeKind, Governance, OperatorId, Proposal, Scope, TargetId, TraceId};
use arqon_tuner::knobs::{Config, KnobValue, Patch, VariantId};
use arqon_tuner::optim::{CmaEs, CmaEsConfig, Es, EsConfig, Optimizer, Pbt, PbtConfig, Spsa, SpsaConfig};
use arqon_tuner::serving::{serving_space, ServingKnob};
use arqon_tuner::summary::HealthSummary;
use arqon_tuner::telemetry::{Cohort, ContextBucket, Event, RequestEvent, TelemetryRing};
use arqon_tuner::units::{Micros, Permille, Tick};
use arqon_tuner::Input;

struct Counting;

thread_local! {
    // Per thread: the test harness's own threads allocate now and then, and
    // a process-wide count made this test fail when one did mid-loop.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: allocations during thread teardown are not ours to count.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count_one();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

fn bandit_loop(p: &mut impl BanditPolicy, ctxs: &[Context]) {
    for i in 0..2_000 {
        let c = &ctxs[i % ctxs.len()];
        let a = p.select(c, ArmMask::all(p.arms()));
        p.update(c, a, (i % 7) as f64 / 7.0);
    }
}

fn optim_loop(o: &mut impl Optimizer, x: &mut [f64]) {
    for i in 0..2_000 {
        let id = o.ask(x);
        o.tell(id, -x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum::<f64>() + (i % 3) as f64 * 1e-3).unwrap();
    }
}

#[test]
fn hot_paths_do_not_allocate() {
    // The counter sees this thread's allocations.
    assert!(allocations(|| drop(std::hint::black_box(vec![0u8; 64]))) >= 1);
    let ctxs: Vec<Context> = (0..8).map(|i| Context::bucketed(i as f64 / 8.0, 0.5, 0.5, 0, 4)).collect();

    let mut ts = ThompsonSampling::new(ThompsonConfig::new(32, 4), 1).unwrap();
    let mut ucb = Ucb::new(UcbConfig::new(32, 4)).unwrap();
    let mut lin = LinUcb::new(LinUcbConfig::new(32)).unwrap();
    bandit_loop(&mut ts, &ctxs);
    bandit_loop(&mut ucb, &ctxs);
    bandit_loop(&mut lin, &ctxs);
    assert_eq!(allocations(|| bandit_loop(&mut ts, &ctxs)), 0, "thompson");
    assert_eq!(allocations(|| bandit_loop(&mut ucb, &ctxs)), 0, "ucb");
    assert_eq!(allocations(|| bandit_loop(&mut lin, &ctxs)), 0, "linucb");

    let cfg = ConstrainedConfig {
        constraints: vec![ConstraintSpec { limit: 100.0, z: 1.0, noise_floor: 5.0 }],
        buckets: 4,
        discount: Discount::new(0.99).unwrap(),
        min_obs: 0.5,
        confident_obs: 3.0,
        explore_unknown: true,
        budget: ComputeBudget::DEFAULT,
    };
    let mut c = Constrained::new(ThompsonSampling::new(ThompsonConfig::new(32, 4), 2).unwrap(), &cfg).unwrap();
    let run = |c: &mut Constrained<ThompsonSampling>| {
        for i in 0..2_000 {
            let ctx = &ctxs[i % ctxs.len()];
            let s = c.select(ctx, ArmMask::all(32));
            c.update(ctx, s.arm, 0.5, &[f64::from(s.arm.0) * 5.0]);
        }
    };
    run(&mut c);
    assert_eq!(allocations(|| run(&mut c)), 0, "constrained");

    let mut x = vec![0.0; 16];
    let mut spsa = Spsa::new(SpsaConfig::new(16), 1).unwrap();
    let mut es = Es::new(EsConfig::new(16), 1).unwrap();
    let mut cma = CmaEs::new(CmaEsConfig::new(16), 1).unwrap();
    let mut pbt = Pbt::new(PbtConfig::new(16), 1).unwrap();
    assert_eq!(allocations(|| optim_loop(&mut spsa, &mut x)), 0, "spsa");
    assert_eq!(allocations(|| optim_loop(&mut es, &mut x)), 0, "es");
    assert_eq!(allocations(|| optim_loop(&mut cma, &mut x)), 0, "cma-es");
    assert_eq!(allocations(|| optim_loop(&mut pbt, &mut x)), 0, "pbt");

    let slo = Slo {
        ttft_p99: Micros::from_millis(400),
        itl_p99: Micros::from_millis(80),
        max_error_rate: Permille::new(20).unwrap(),
        max_mem: Permille::new(900).unwrap(),
    };
    let space = serving_space();
    let mut g = GuardConfig::new(Scope::Prod, TargetId(1), space.clone(), slo);
    g.variants = vec![VariantId(0), VariantId(1)];
    let initial = Config::defaults(&space, VariantId(0));
    let mut e = Executor::new(g, initial, Tick(0)).unwrap();
    let h = HealthSummary { start: Tick(0), end: Tick(1_000_000), device_samples: 1, ..HealthSummary::default() };
    e.handle(Tick(1_000_000), &Input::Telemetry(h));
    let mut patch = Patch::knob(ServingKnob::TokenBudget.id(), KnobValue::Integer(9_000));
    patch.set(ServingKnob::BatchWindow.id(), KnobValue::Integer(2_500));
    let p = Proposal {
        meta: Governance::tier2(
            OperatorId { id: 1, version: 1 },
            Scope::Prod,
            TargetId(1),
            ChangeKind::Knob,
            TraceId(1),
        ),
        patch,
    };
    let n = allocations(|| {
        for i in 0..2_000u64 {
            assert!(e.validate(Tick(1_000_000 + i), &p).is_ok());
            e.handle(Tick(1_000_000 + i), &Input::Tick);
            e.handle(Tick(1_000_000 + i), &Input::Telemetry(h));
        }
    });
    assert_eq!(n, 0, "executor validate/handle");

    let ring = TelemetryRing::new(1 << 12).unwrap();
    let ev = Event::Request(RequestEvent {
        at: Tick(1),
        variant: VariantId(0),
        cohort: Cohort::Control,
        context: ContextBucket(0),
        ttft: Micros(1_000),
        itl: Micros(50),
        tokens: 10,
        error: false,
    });
    let n = allocations(|| {
        for _ in 0..10_000 {
            ring.try_push(ev);
        }
        while ring.pop().is_some() {}
    });
    assert_eq!(n, 0, "ring push/pop");
}
