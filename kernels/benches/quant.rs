//! The quantized matmul kernels on every path this CPU runs, side by side
//! in one run (the scalar reference is the peer): one thread, the default
//! model's gate/up shape (`1536 x 576`, `Q4_1`) and its LM head's width
//! (`Q8_0`), at 1 and 8 activation rows. Forty copies of each matrix are
//! cycled so the weights stream from memory, as in a model, rather than sit
//! in L2.
//!
//! ```text
//! cargo bench -p arqon-kernels --bench quant
//! ```

use arqon_kernels::quant::{Path, Q4_1Matrix, Q8_0Matrix, QK};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;

const COPIES: usize = 40;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn q4_1_bytes(rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QK {
        bytes.extend(f16::from_f32(0.01 + lcg(seed).abs() * 0.05).to_le_bytes());
        bytes.extend(f16::from_f32(lcg(seed) * 0.4).to_le_bytes());
        bytes.extend((0..QK / 2).map(|_| (lcg(seed).abs() * 255.0) as u8));
    }
    bytes
}

fn q8_0_bytes(rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QK {
        bytes.extend(f16::from_f32(0.002 + lcg(seed).abs() * 0.01).to_le_bytes());
        bytes.extend((0..QK).map(|_| (lcg(seed) * 127.0) as i8 as u8));
    }
    bytes
}

fn bench(c: &mut Criterion) {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    let mut seed = 1;
    let (rows, cols) = (1536, 576);
    let q4: Vec<Q4_1Matrix> = (0..COPIES)
        .map(|_| Q4_1Matrix::from_ggml_bytes(rows, cols, &q4_1_bytes(rows, cols, &mut seed)).expect("valid bytes"))
        .collect();
    let q8: Vec<Q8_0Matrix> = (0..COPIES)
        .map(|_| Q8_0Matrix::from_ggml_bytes(rows, cols, &q8_0_bytes(rows, cols, &mut seed)).expect("valid bytes"))
        .collect();
    for m in [1usize, 8] {
        let x: Vec<f32> = (0..m * cols).map(|_| lcg(&mut seed)).collect();
        let mut out = vec![0f32; m * rows];
        let mut g = c.benchmark_group(format!("matmul_{rows}x{cols}_m{m}"));
        g.throughput(Throughput::Elements((COPIES * rows * cols * m) as u64));
        for path in Path::available() {
            g.bench_function(BenchmarkId::new("q4_1", format!("{path:?}")), |b| {
                b.iter(|| one.install(|| q4.iter().for_each(|w| w.matmul_with(&x, m, &mut out, path).expect("shapes"))))
            });
            g.bench_function(BenchmarkId::new("q8_0", format!("{path:?}")), |b| {
                b.iter(|| one.install(|| q8.iter().for_each(|w| w.matmul_with(&x, m, &mut out, path).expect("shapes"))))
            });
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
