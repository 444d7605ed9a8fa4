//! The same model on every device this build can open, compared with the CPU:
//! the CPU always (the body then checks itself against itself, and that the
//! loaders place nothing elsewhere), CUDA device 0 under the `cuda` feature.
//! Where no GPU opens the CUDA half is skipped with a note on stderr.
//!
//! Tolerances are dtype-aware: on a GPU dense weights are bf16 (8 bits of
//! mantissa, ~4e-3 relative per weight) and quantized matrices run candle's
//! kernels, which quantize activations differently from our CPU Q4_1 kernel.

mod common;

use std::path::Path;

use arqon_runtime::config::DeviceChoice;
use arqon_runtime::model::{LogitsFor, SeqChunk, SeqId};
use arqon_runtime::{device, engine};
use candle_core::Device;

/// The devices to run on: the CPU, then CUDA 0 where the build has it and it opens.
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if device::CUDA_COMPILED {
        match device::open(DeviceChoice::Cuda(0)) {
            Ok(d) => out.push(d),
            Err(e) => eprintln!("skipping CUDA: {e}"),
        }
    }
    out
}

/// Logits at every position of `ids`, one prefill step.
fn logits_on(device: &Device, path: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let loaded = engine::load_on(path, device).unwrap();
    assert_eq!(device::describe(loaded.model.device()), device::describe(device));
    let mut kv = loaded.model.new_kv_cache();
    kv.add(SeqId(1)).unwrap();
    let chunk = SeqChunk { seq: SeqId(1), tokens: ids, adapter: None };
    let t = loaded.model.forward(&[chunk], &mut kv, LogitsFor::AllPositions).unwrap();
    t.to_vec2::<f32>().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

#[test]
fn dense_tiny_llama_agrees_with_the_cpu_within_bf16_tolerance() {
    let path = common::tests_dir().join("fixtures/tiny-llama");
    let ids: Vec<u32> = (1..=24).map(|i| (i * 37) % 200).collect();
    let cpu = logits_on(&Device::Cpu, &path, &ids);
    for d in devices() {
        let got = logits_on(&d, &path, &ids);
        assert_eq!(got.len(), cpu.len());
        let scale = cpu.iter().flatten().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let tol = if d.is_cpu() { 0.0 } else { 3e-2 * scale };
        let mut same_top1 = 0;
        for (g, c) in got.iter().zip(&cpu) {
            for (x, y) in g.iter().zip(c) {
                assert!(x.is_finite() && (x - y).abs() <= tol, "{}: {x} vs {y} (tol {tol})", device::describe(&d));
            }
            same_top1 += usize::from(argmax(g) == argmax(c));
        }
        assert!(
            same_top1 * 10 >= cpu.len() * 9,
            "{}: top-1 equal at {same_top1} of {}",
            device::describe(&d),
            cpu.len()
        );
    }
}

#[test]
fn the_default_q4_1_model_predicts_paris_on_every_device() {
    let path = common::default_model();
    // "The capital of France is" (tests/cli.rs: llama.cpp's tokenization), then " Paris".
    let ids = [504, 3575, 282, 4649, 314];
    for d in devices() {
        let logits = logits_on(&d, path, &ids);
        assert_eq!(argmax(logits.last().unwrap()), 7042, "{}", device::describe(&d));
    }
}
