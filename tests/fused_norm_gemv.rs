//! Under a kernel plan that names our dense GEMV (`dense_gemv=warp_per_row`,
//! set once for this test process, as `--kernel-plan` sets it for a server),
//! a fixed-buffer decode step of a dense model takes each pending residual
//! add and its RMSNorm into the stacked product after it (q/k/v and gate/up:
//! `Linear::forward_stacked_norm`, one op each, so on a GPU one launch each
//! instead of two). On the CPU the fused op computes the norm as the unfused
//! one does, so the step gives the ordinary step's logits bit for bit. Up to
//! 32 rows take the fused route (the LM head, a bigger product, stays on
//! candle's at more than 8).

mod common;

use arqon_kernels::plan::DenseGemvVariant;
use arqon_kernels::KernelPlan;
use arqon_runtime::engine;
use arqon_runtime::model::llama::Llama;
use arqon_runtime::model::plan::set_kernel_plan;
use arqon_runtime::model::weights::Linear;
use arqon_runtime::model::{argmax, rows, DecodeGraphs, DecodePath, LogitsFor, SeqChunk, SeqId, StepPlan};
use candle_core::{DType, Device, Tensor};

#[test]
fn fused_norm_decode_steps_equal_ordinary_ones() {
    set_kernel_plan(KernelPlan { dense_gemv: DenseGemvVariant::WarpPerRow, ..KernelPlan::default() }).unwrap();
    let loaded = engine::load(common::default_model()).unwrap();
    // SmolLM2's matrices dense in f32 and stacked as at load (64-wide heads: the paged op).
    let dense = loaded.model.dequantized(&arqon_runtime::model::lora::LoraTarget::ALL).unwrap();
    let w = dense.weights().dense_layers_as(DType::F32).unwrap();
    let m = Llama::new(loaded.model.config().clone(), w, Device::Cpu).unwrap().with_paged_attention(true).unwrap();
    let (hidden, vocab, eps) = (m.config().hidden_size, m.config().vocab_size, m.config().rms_norm_eps as f32);

    // The fused route is there for every layer's two stacks, at 1 to 32 rows (the kernels' tiles of 8,
    // and more).
    for (i, l) in m.weights().layers.iter().enumerate() {
        // Every layer at one and eight rows; the first at the others (the CPU's reference is slow).
        let all: &[usize] = if i == 0 { &[1, 3, 8, 9, 32] } else { &[1, 8] };
        for &rows in all {
            let x = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
            let d = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
            let qkv = Linear::forward_stacked_norm(&[&l.wq, &l.wk, &l.wv], (&x, &d), &l.attn_norm, eps).unwrap();
            let gu = Linear::forward_stacked_norm(&[&l.w_gate, &l.w_up], (&x, &d), &l.ffn_norm, eps).unwrap();
            let (sum, y) = gu.expect("gate/up takes the norm");
            assert!(qkv.is_some(), "q/k/v takes the norm");
            assert_eq!((sum.dims(), y.dims()), (&[rows, hidden][..], &[rows, 2 * m.config().intermediate_size][..]));
            assert_eq!(sum.to_vec2::<f32>().unwrap(), (&x + &d).unwrap().to_vec2::<f32>().unwrap());
        }
        // 33 rows do not fit our GEMV: the caller norms and multiplies apart.
        let tall = Tensor::zeros((33, hidden), DType::F32, &Device::Cpu).unwrap();
        assert!(Linear::forward_stacked_norm(&[&l.w_gate, &l.w_up], (&tall, &tall), &l.ffn_norm, eps)
            .unwrap()
            .is_none());
    }

    // Ten sequences (a step of 16 rows: two tiles) decoded for three steps, ordinary and on fixed buffers:
    // the same logits, bit for bit.
    let (mut kv_a, mut kv_b) = (m.new_kv_cache(), m.new_kv_cache());
    let seqs: Vec<SeqId> = (0..10u64).map(SeqId).collect();
    let prompts: Vec<Vec<u32>> = (0..10u32).map(|i| (100 * i + 3..100 * i + 10 + 3 * i).collect()).collect();
    let mut graphs = DecodeGraphs::new(true);
    for (s, p) in seqs.iter().zip(&prompts) {
        kv_a.add(*s).unwrap();
        kv_b.add(*s).unwrap();
        let chunk = [SeqChunk { seq: *s, tokens: p, adapter: None }];
        m.forward(&chunk, &mut kv_a, LogitsFor::LastOfEachChunk).unwrap();
        graphs.forward(&m, &chunk, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
    }
    let mut next: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
    for step in 0..3 {
        let toks: Vec<[u32; 1]> = next.iter().map(|t| [*t]).collect();
        let chunks: Vec<SeqChunk<'_>> =
            seqs.iter().zip(&toks).map(|(s, t)| SeqChunk { seq: *s, tokens: t, adapter: None }).collect();
        let a = rows(&m.forward(&chunks, &mut kv_a, LogitsFor::LastOfEachChunk).unwrap()).unwrap();
        let (out, path) = graphs.forward(&m, &chunks, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
        assert_eq!(path, DecodePath::Fixed, "step {step}");
        let b = rows(&out.logits).unwrap();
        assert_eq!(a, b, "step {step}");
        assert!(a.iter().all(|r| r.len() == vocab));
        next = a.iter().map(|r| argmax(r)).collect();
    }
}
