//! The live swap's cost: `Slot::store` (the control thread's swap) and the
//! next admission's `Slot::load` + pin, in nanoseconds.
//!
//! Run: `cargo bench -p arqon-variants --bench slot`. The goal is under 1 µs
//! for a swap plus the load that follows it.

use std::hint::black_box;

use arqon_variants::slot::{Pinned, Reaper, Slot};
use criterion::{criterion_group, criterion_main, Criterion};

/// Stands in for a loaded variant: the protocol never touches its contents.
struct Weights {
    id: u32,
    _bytes: Vec<u8>,
}

struct Routing {
    active: Pinned<Weights>,
}

fn bench(c: &mut Criterion) {
    let reaper = Reaper::spawn("bench-reaper", |_: &Weights| {}).expect("reaper");
    let a = reaper.pin(Weights { id: 1, _bytes: vec![0; 1 << 20] });
    let b = reaper.pin(Weights { id: 2, _bytes: vec![0; 1 << 20] });
    let slot = Slot::new(Routing { active: a.clone() });

    c.bench_function("cpu/slot/load_and_pin", |bench| {
        bench.iter(|| {
            let pin = slot.load().active.clone();
            black_box(pin.id);
        })
    });

    let mut flip = false;
    c.bench_function("cpu/slot/swap_then_load_and_pin", |bench| {
        bench.iter(|| {
            flip = !flip;
            let next = if flip { b.clone() } else { a.clone() };
            drop(slot.store(Routing { active: next }));
            let pin = slot.load().active.clone();
            black_box(pin.id);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
