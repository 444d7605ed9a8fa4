//! Criterion benchmarks of the tuner's hot calls.
//!
//! Goals (issue 4): bandit select < 200 ns with 32 arms and update < 1 µs;
//! ES/SPSA ask+tell < 10 µs for 16 knobs; executor validate < 1 µs; ring
//! push < 50 ns uncontended. Names are `{area}/{thing}/{shape}`.
//!
//! Run: `cargo bench -p arqon-tuner --bench tuner` (add `-- --quick` for a
//! short pass).

use std::hint::black_box;
use std::time::{Duration, Instant};

use arqon_tuner::audit::{AuditLog, FsyncPolicy, Record};
use arqon_tuner::bandit::{
    ArmMask, BanditPolicy, ComputeBudget, Constrained, ConstrainedConfig, ConstraintSpec, Context, Discount, LinUcb,
    LinUcbConfig, ThompsonConfig, ThompsonSampling, Ucb, UcbConfig,
};
use arqon_tuner::executor::{Executor, GuardConfig, Slo};
use arqon_tuner::governance::{ChangeKind, Governance, OperatorId, Proposal, Scope, TargetId, TraceId};
use arqon_tuner::knobs::{Config, KnobValue, Patch, VariantId};
use arqon_tuner::optim::{CmaEs, CmaEsConfig, Es, EsConfig, Optimizer, Pbt, PbtConfig, Spsa, SpsaConfig};
use arqon_tuner::serving::{serving_space, ServingKnob};
use arqon_tuner::summary::{HealthSummary, Summarizer};
use arqon_tuner::telemetry::{Cohort, ContextBucket, Event, RequestEvent, TelemetryRing};
use arqon_tuner::units::{Micros, Permille, Tick};
use arqon_tuner::Input;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const ARMS: usize = 32;
const DIM: usize = 16;

fn contexts() -> Vec<Context> {
    (0..16).map(|i| Context::bucketed(i as f64 / 16.0, 0.5, 0.3, (i % 2) as u16, 4)).collect()
}

fn warm(p: &mut impl BanditPolicy, ctxs: &[Context]) {
    for i in 0..5_000 {
        let c = &ctxs[i % ctxs.len()];
        let a = p.select(c, ArmMask::all(ARMS));
        p.update(c, a, ((i * 7919) % 101) as f64 / 101.0);
    }
}

fn bench_bandit<P: BanditPolicy>(c: &mut Criterion, name: &str, mut p: P) {
    let ctxs = contexts();
    warm(&mut p, &ctxs);
    let mut i = 0usize;
    c.bench_function(&format!("bandit/{name}/select/{ARMS}-arms"), |b| {
        b.iter(|| {
            i = (i + 1) % ctxs.len();
            black_box(p.select(black_box(&ctxs[i]), ArmMask::all(ARMS)))
        })
    });
    let mut k = 0usize;
    c.bench_function(&format!("bandit/{name}/update/{ARMS}-arms"), |b| {
        b.iter(|| {
            k = (k + 1) % ctxs.len();
            let a = arqon_tuner::bandit::ArmId((k % ARMS) as u8);
            p.update(black_box(&ctxs[k]), a, black_box(0.5))
        })
    });
}

fn bandits(c: &mut Criterion) {
    bench_bandit(c, "thompson", ThompsonSampling::new(ThompsonConfig::new(ARMS, 8), 1).unwrap());
    bench_bandit(c, "ucb", Ucb::new(UcbConfig::new(ARMS, 8)).unwrap());
    bench_bandit(c, "linucb", LinUcb::new(LinUcbConfig::new(ARMS)).unwrap());
    let cfg = ConstrainedConfig {
        constraints: vec![
            ConstraintSpec { limit: 400.0, z: 1.0, noise_floor: 40.0 },
            ConstraintSpec { limit: 0.9, z: 0.0, noise_floor: 0.0 },
        ],
        buckets: 8,
        discount: Discount::new(0.998).unwrap(),
        min_obs: 0.5,
        confident_obs: 3.0,
        explore_unknown: true,
        budget: ComputeBudget::DEFAULT,
    };
    let mut cons = Constrained::new(ThompsonSampling::new(ThompsonConfig::new(ARMS, 8), 2).unwrap(), &cfg).unwrap();
    let ctxs = contexts();
    for i in 0..5_000 {
        let ctx = &ctxs[i % ctxs.len()];
        let s = cons.select(ctx, ArmMask::all(ARMS));
        cons.update(ctx, s.arm, 0.5, &[f64::from(s.arm.0) * 15.0, 0.5]);
    }
    let mut i = 0usize;
    c.bench_function(&format!("bandit/constrained-thompson/select/{ARMS}-arms"), |b| {
        b.iter(|| {
            i = (i + 1) % ctxs.len();
            black_box(cons.select(black_box(&ctxs[i]), ArmMask::all(ARMS)))
        })
    });
    c.bench_function(&format!("bandit/constrained-thompson/update/{ARMS}-arms"), |b| {
        b.iter(|| {
            i = (i + 1) % ctxs.len();
            let a = arqon_tuner::bandit::ArmId((i % ARMS) as u8);
            cons.update(black_box(&ctxs[i]), a, 0.5, black_box(&[200.0, 0.5]))
        })
    });
}

fn bench_optim(c: &mut Criterion, name: &str, mut o: impl Optimizer) {
    let mut x = vec![0.0; DIM];
    let mut n = 0u64;
    c.bench_function(&format!("optim/{name}/ask+tell/{DIM}-knobs"), |b| {
        b.iter(|| {
            let id = o.ask(black_box(&mut x));
            n += 1;
            let r = -x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum::<f64>() + (n % 5) as f64 * 1e-3;
            o.tell(id, black_box(r)).unwrap();
        })
    });
}

fn optimisers(c: &mut Criterion) {
    bench_optim(c, "spsa", Spsa::new(SpsaConfig::new(DIM), 1).unwrap());
    bench_optim(c, "es-antithetic", Es::new(EsConfig::new(DIM), 1).unwrap());
    bench_optim(c, "cma-es", CmaEs::new(CmaEsConfig::new(DIM), 1).unwrap());
    bench_optim(c, "pbt-lite", Pbt::new(PbtConfig::new(DIM), 1).unwrap());
}

fn executor_setup() -> (Executor, Proposal, HealthSummary) {
    let slo = Slo {
        ttft_p99: Micros::from_millis(400),
        itl_p99: Micros::from_millis(80),
        max_error_rate: Permille::new(20).unwrap(),
        max_mem: Permille::new(900).unwrap(),
    };
    let space = serving_space();
    let mut g = GuardConfig::new(Scope::Prod, TargetId(1), space.clone(), slo);
    g.variants = vec![VariantId(0), VariantId(1)];
    let mut e = Executor::new(g, Config::defaults(&space, VariantId(0)), Tick(0)).unwrap();
    let h = HealthSummary { start: Tick(0), end: Tick(1_000_000), device_samples: 1, ..HealthSummary::default() };
    e.handle(Tick(1_000_000), &Input::Telemetry(h));
    let mut patch = Patch::knob(ServingKnob::TokenBudget.id(), KnobValue::Integer(12_000));
    patch.set(ServingKnob::BatchWindow.id(), KnobValue::Integer(2_500));
    patch.set(ServingKnob::MaxBatch.id(), KnobValue::Integer(80));
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
    (e, p, h)
}

fn executor(c: &mut Criterion) {
    let (mut e, p, h) = executor_setup();
    c.bench_function("executor/validate/3-knob-proposal", |b| {
        b.iter(|| black_box(e.validate(black_box(Tick(2_000_000)), black_box(&p))))
    });
    let mut t = 2_000_000u64;
    c.bench_function("executor/handle/telemetry-idle", |b| {
        b.iter(|| {
            t += 1;
            black_box(e.handle(Tick(t), &Input::Telemetry(black_box(h))))
        })
    });
    c.bench_function("executor/handle/propose-accept", |b| {
        b.iter_batched(
            || e.clone(),
            |mut e| black_box(e.handle(Tick(3_000_000), &Input::Propose(p))),
            BatchSize::SmallInput,
        )
    });
}

fn event(i: u64) -> Event {
    Event::Request(RequestEvent {
        at: Tick(i * 1_000),
        variant: VariantId((i % 3) as u16),
        cohort: if i.is_multiple_of(20) { Cohort::Canary } else { Cohort::Control },
        context: ContextBucket((i % 4) as u16),
        ttft: Micros(50_000 + (i * 7919) % 200_000),
        itl: Micros(20_000 + (i * 104_729) % 10_000),
        tokens: 200,
        error: i.is_multiple_of(500),
    })
}

fn telemetry(c: &mut Criterion) {
    let ring = TelemetryRing::new(1 << 16).unwrap();
    let ev = event(1);
    let mut g = c.benchmark_group("telemetry");
    g.throughput(Throughput::Elements(1));
    // Time pushes only; drain (untimed) whenever the ring would fill.
    g.bench_function("ring/push/uncontended", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(60_000);
                let t0 = Instant::now();
                for _ in 0..n {
                    ring.try_push(black_box(ev));
                }
                total += t0.elapsed();
                while ring.pop().is_some() {}
                left -= n;
            }
            total
        })
    });
    let mut s = Summarizer::new(Micros::from_secs(10)).unwrap();
    let mut out = Vec::with_capacity(4);
    let mut i = 0u64;
    g.bench_function("summary/ingest/request", |b| {
        b.iter(|| {
            i += 1;
            s.ingest(&event(i), &mut out).unwrap();
            out.clear();
        })
    });
    g.finish();
}

fn audit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (_, p, _) = executor_setup();
    let mut log = AuditLog::open(&dir.path().join("bench.jsonl"), FsyncPolicy::Never).unwrap();
    let rec = Record::Input { at: Tick(1), input: Input::Propose(p) };
    c.bench_function("audit/append/proposal-no-fsync", |b| b.iter(|| log.append(black_box(&rec)).unwrap()));
}

criterion_group!(benches, bandits, optimisers, executor, telemetry, audit);
criterion_main!(benches);
