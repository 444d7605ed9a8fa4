//! The host sampler on one row of a 49,152-token vocabulary (SmolLM2's):
//! its draw per setting, next to a peer in the same run, the sampler that
//! sorts the whole row first (what ours did before: `sort_whole_row`).
//!
//! `cargo bench -p arqon-bench --bench sampling`

use arqon_runtime::sampling::{Sampler, SamplingParams};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 49_152;

/// Logits shaped like a language model's: a few likely tokens over a long tail.
fn row(seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..VOCAB).map(|_| rng.gen::<f32>().powi(8) * 30.0 - 10.0).collect()
}

/// The peer: scale, sort the whole row by logit, softmax, cut by top_p and
/// min_p, draw by walking the sorted row.
fn sort_whole_row(logits: &[f32], p: &SamplingParams, u: f64, cand: &mut Vec<(u32, f32)>) -> u32 {
    cand.clear();
    cand.extend(logits.iter().enumerate().map(|(i, l)| (i as u32, l / p.temperature)));
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cand[0].1;
    let mut sum = 0.0f64;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        sum += c.1 as f64;
    }
    let mut keep = cand.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0f64;
        for (i, c) in cand.iter().enumerate() {
            acc += c.1 as f64 / sum;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        keep = keep.min(cand.iter().take_while(|c| c.1 >= p.min_p).count().max(1));
    }
    let total: f64 = cand[..keep].iter().map(|c| c.1 as f64).sum();
    let mut r = u * total;
    for c in &cand[..keep] {
        r -= c.1 as f64;
        if r <= 0.0 {
            return c.0;
        }
    }
    cand[keep - 1].0
}

fn bench(c: &mut Criterion) {
    let logits = row(1);
    let settings = [
        ("temperature 1", SamplingParams { temperature: 1.0, ..Default::default() }),
        ("top_p 0.9", SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() }),
        ("min_p 0.05", SamplingParams { temperature: 1.0, min_p: 0.05, ..Default::default() }),
        ("top_k 40", SamplingParams { temperature: 0.8, top_k: 40, ..Default::default() }),
    ];
    let mut g = c.benchmark_group("sample one row of 49152");
    for (name, p) in settings {
        let mut s = Sampler::new(SamplingParams { seed: Some(3), ..p.clone() }, &[]).unwrap();
        let mut buf = logits.clone();
        g.bench_function(format!("arqon {name}"), |b| {
            b.iter(|| {
                buf.copy_from_slice(&logits);
                s.sample(&mut buf)
            })
        });
        let mut cand = Vec::with_capacity(VOCAB);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        g.bench_function(format!("sort whole row {name}"), |b| {
            b.iter(|| {
                buf.copy_from_slice(&logits);
                sort_whole_row(&buf, &p, rng.gen(), &mut cand)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
