//! Early exit (static and CALM dynamic) and lossless self-speculative
//! decoding: each profile against an independent reference, bitwise where
//! the claim is bitwise.

mod common;

use arqon_runtime::engine::{self, GenerateRequest};
use arqon_runtime::model::{rows, Attention, Depth, KvCache, Llama, LogitsFor, ModelConfig, SeqChunk, SeqId, StepPlan};
use arqon_runtime::{Engine, FinishReason, SpecInput};
use arqon_variants::DepthProfile;
use serde_json::Value;

fn tiny(name: &str) -> Engine {
    Engine::new(engine::load(&common::tests_dir().join("fixtures").join(name)).unwrap())
}

fn tiny_prompt(e: &Engine) -> Vec<u32> {
    e.encode_prompt("the quick brown fox jumps over the lazy dog and then").unwrap()
}

/// Prompt ids of the llama.cpp fixtures (`shared/fixtures/llamacpp_greedy.json`).
fn fixture_prompts() -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(common::shared_fixture("llamacpp_greedy.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let ids = f["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            (f["name"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// Bit patterns of a logits tensor, for exact comparison.
fn bits(t: &candle_core::Tensor) -> Vec<Vec<u32>> {
    rows(t).unwrap().iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
}

fn argmax_rows(t: &candle_core::Tensor) -> Vec<u32> {
    rows(t).unwrap().iter().map(|r| arqon_runtime::model::argmax(r)).collect()
}

/// Greedy decoding on `model` at `depth`: prefill at `prefill` depth, then
/// one token per step. Returns each step's logits bits and the tokens.
fn decode_trace(
    model: &Llama,
    prompt: &[u32],
    prefill: Depth,
    depth: Depth,
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<u32>) {
    let mut kv = model.new_kv_cache();
    let seq = SeqId(0);
    kv.add(seq).unwrap();
    let out = model
        .forward_with(
            &[SeqChunk { seq, tokens: prompt, adapter: None }],
            &mut kv,
            LogitsFor::LastOfEachChunk,
            StepPlan::at(prefill),
        )
        .unwrap();
    let mut trace = bits(&out.logits);
    let mut toks = argmax_rows(&out.logits);
    for _ in 0..steps {
        let last = [*toks.last().unwrap()];
        let out = model
            .forward_with(
                &[SeqChunk { seq, tokens: &last, adapter: None }],
                &mut kv,
                LogitsFor::LastOfEachChunk,
                StepPlan::at(depth),
            )
            .unwrap();
        trace.extend(bits(&out.logits));
        toks.extend(argmax_rows(&out.logits));
    }
    (trace, toks)
}

fn ignore_eos(prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(prompt, n) }
}

#[test]
fn exit_at_the_last_layer_equals_the_full_model_bitwise() {
    for name in ["tiny-llama", "tiny-llama-llama3"] {
        let e = tiny(name);
        let m = &e.loaded().model;
        let l = m.config().num_layers;
        let p = tiny_prompt(&e);
        let full = decode_trace(m, &p, Depth::Full, Depth::Full, 6);
        let exit = decode_trace(m, &p, Depth::Static { layers: l }, Depth::Static { layers: l }, 6);
        assert_eq!(full, exit, "{name}");
    }
    let e = common::default_engine();
    let m = &e.loaded().model;
    let p = e.encode_prompt("The capital of France is").unwrap();
    let full = decode_trace(m, &p, Depth::Full, Depth::Full, 3);
    let exit = decode_trace(m, &p, Depth::Static { layers: 30 }, Depth::Static { layers: 30 }, 3);
    assert_eq!(full, exit);
}

/// A model built from only the first `k` layers' weights.
fn truncated(m: &Llama, k: usize) -> Llama {
    let mut w = m.weights().clone();
    w.layers.truncate(k);
    let cfg = ModelConfig { num_layers: k, ..m.config().clone() };
    Llama::new(cfg, w, m.device().clone()).unwrap()
}

#[test]
fn static_exit_equals_a_model_with_only_the_first_layers() {
    for (name, k) in [("tiny-llama", 1), ("tiny-llama", 2), ("tiny-llama-llama3", 2)] {
        let e = tiny(name);
        let m = &e.loaded().model;
        let p = tiny_prompt(&e);
        let exit = decode_trace(m, &p, Depth::Static { layers: k }, Depth::Static { layers: k }, 6);
        let short = decode_trace(&truncated(m, k), &p, Depth::Full, Depth::Full, 6);
        assert_eq!(exit, short, "{name} k={k}");
        let full = decode_trace(m, &p, Depth::Full, Depth::Full, 6);
        assert_ne!(exit.0, full.0, "{name} k={k}: exiting early should change the logits");
    }
    let e = common::default_engine();
    let m = &e.loaded().model;
    let p = e.encode_prompt("The capital of France is").unwrap();
    let exit = decode_trace(m, &p, Depth::Static { layers: 12 }, Depth::Static { layers: 12 }, 2);
    assert_eq!(exit, decode_trace(&truncated(m, 12), &p, Depth::Full, Depth::Full, 2));
}

#[test]
fn dynamic_exit_bounds_are_full_and_static() {
    let e = common::default_engine();
    let m = &e.loaded().model;
    let p = e.encode_prompt("The capital of France is").unwrap();
    // Above 1 never exits: the full model, bitwise.
    let never = decode_trace(m, &p, Depth::Full, Depth::Dynamic { min_layers: 4, threshold: 1.5 }, 4);
    assert_eq!(never, decode_trace(m, &p, Depth::Full, Depth::Full, 4));
    // Threshold 0: every decode token exits at min_layers, as static exit
    // there (prompt tokens still run every layer; static exit reads only the
    // first min_layers layers' KV, which are the same).
    let (dyn0, _) = decode_trace(m, &p, Depth::Full, Depth::Dynamic { min_layers: 10, threshold: 0.0 }, 4);
    let (stat, _) = decode_trace(m, &p, Depth::Full, Depth::Static { layers: 10 }, 4);
    let (full, _) = decode_trace(m, &p, Depth::Full, Depth::Full, 4);
    assert_eq!(dyn0[0], full[0], "the prompt runs every layer");
    assert_eq!(dyn0[1..], stat[1..], "decode tokens exit at min_layers");
    assert_ne!(dyn0[1..], full[1..]);
}

#[test]
fn dynamic_exit_leaves_the_sub_batch_and_fills_skipped_kv() {
    let e = common::default_engine();
    let m = &e.loaded().model;
    let a = e.encode_prompt("The capital of France is").unwrap();
    let b = e.encode_prompt("Once upon a time").unwrap();
    let mut kv: KvCache = m.new_kv_cache();
    let (sa, sb) = (SeqId(1), SeqId(2));
    kv.add(sa).unwrap();
    kv.add(sb).unwrap();
    let pre =
        m.forward(&[SeqChunk { seq: sa, tokens: &a, adapter: None }], &mut kv, LogitsFor::LastOfEachChunk).unwrap();
    let ta = [argmax_rows(&pre)[0]];
    // One step: sequence b's prompt (never exits) beside a's decode token (exits at 6).
    let plan = StepPlan::at(Depth::Dynamic { min_layers: 6, threshold: 0.0 });
    let out = m
        .forward_with(
            &[SeqChunk { seq: sb, tokens: &b, adapter: None }, SeqChunk { seq: sa, tokens: &ta, adapter: None }],
            &mut kv,
            LogitsFor::LastOfEachChunk,
            plan,
        )
        .unwrap();
    assert_eq!(out.layers_run, vec![30, 6]);
    assert!((out.mean_layers() - 18.0).abs() < 1e-9);
    // Each row equals its own solo computation: b's full prefill, a's static exit at 6.
    let mut kv2 = m.new_kv_cache();
    kv2.add(sb).unwrap();
    let solo_b =
        m.forward(&[SeqChunk { seq: sb, tokens: &b, adapter: None }], &mut kv2, LogitsFor::LastOfEachChunk).unwrap();
    kv2.add(sa).unwrap();
    m.forward(&[SeqChunk { seq: sa, tokens: &a, adapter: None }], &mut kv2, LogitsFor::LastOfEachChunk).unwrap();
    let solo_a = m
        .forward_with(
            &[SeqChunk { seq: sa, tokens: &ta, adapter: None }],
            &mut kv2,
            LogitsFor::LastOfEachChunk,
            StepPlan::at(Depth::Static { layers: 6 }),
        )
        .unwrap();
    let got = bits(&out.logits);
    assert_eq!(got[0], bits(&solo_b)[0]);
    assert_eq!(got[1], bits(&solo_a.logits)[0]);
    // The exited token's layers 6.. hold propagated KV, not the zeros a static
    // exit leaves: a full-depth step after it sees different keys there.
    let next = [argmax_rows(&out.logits)[1]];
    let after_dyn =
        m.forward(&[SeqChunk { seq: sa, tokens: &next, adapter: None }], &mut kv, LogitsFor::LastOfEachChunk).unwrap();
    let after_static =
        m.forward(&[SeqChunk { seq: sa, tokens: &next, adapter: None }], &mut kv2, LogitsFor::LastOfEachChunk).unwrap();
    assert_ne!(bits(&after_dyn), bits(&after_static));
    // And a mid threshold runs between min_layers and every layer on average.
    let mut eng = common::default_engine();
    eng.set_depth(DepthProfile::Dynamic { min_layers: 8, threshold: 0.9 }).unwrap();
    let g = eng.generate(ignore_eos(a.clone(), 8), &mut |_| {}).unwrap();
    assert_eq!(g.token_ids.len(), 8);
    assert!(g.depth.mean_layers >= 8.0 && g.depth.mean_layers <= 30.0, "{:?}", g.depth);
}

/// A verification chunk computes each position bit for bit as a one-token
/// decode step does. (Measured: on this CPU path the batched masked attention
/// happens to give the same bits too, but nothing guarantees it — gemm may
/// block a `[group * n, len]` product differently from `[group, len']` — so
/// verification uses the per-row order, whose equality holds by construction.)
#[test]
fn per_row_verification_logits_equal_decode_steps_bitwise() {
    let e = common::default_engine();
    let m = &e.loaded().model;
    let p = e.encode_prompt("The history of computing is a story of layers.").unwrap();
    let (trace, toks) = decode_trace(m, &p, Depth::Full, Depth::Full, 5);
    let mut kv = m.new_kv_cache();
    let seq = SeqId(0);
    kv.add(seq).unwrap();
    m.forward(&[SeqChunk { seq, tokens: &p, adapter: None }], &mut kv, LogitsFor::LastOfEachChunk).unwrap();
    let plan = StepPlan { depth: Depth::Full, attention: Attention::PerRow };
    let out = m
        .forward_with(&[SeqChunk { seq, tokens: &toks[..5], adapter: None }], &mut kv, LogitsFor::AllPositions, plan)
        .unwrap();
    assert_eq!(bits(&out.logits), trace[1..].to_vec());
}

fn full_greedy(e: &mut Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    e.set_depth(DepthProfile::Full).unwrap();
    e.generate(ignore_eos(prompt.to_vec(), n), &mut |_| {}).unwrap().token_ids
}

#[test]
fn self_speculative_greedy_equals_full_on_the_fixture_prompts() {
    let mut e = common::default_engine();
    let prompts = fixture_prompts();
    let full: Vec<Vec<u32>> = prompts.iter().map(|(_, p)| full_greedy(&mut e, p, 32)).collect();
    for (draft_layers, draft_tokens) in [(8, 4), (20, 3)] {
        e.set_depth(DepthProfile::SelfSpeculative { draft_layers, draft_tokens }).unwrap();
        let reqs = prompts.iter().map(|(_, p)| ignore_eos(p.clone(), 32)).collect();
        let gens = e.generate_batch(reqs, &mut |_, _| {}).unwrap();
        let (mut drafted, mut accepted) = (0, 0);
        for ((name, _), (g, f)) in prompts.iter().zip(gens.iter().zip(&full)) {
            assert_eq!(&g.token_ids, f, "{name}: spec{draft_layers}x{draft_tokens} differs from full greedy");
            drafted += g.depth.drafted;
            accepted += g.depth.accepted;
        }
        eprintln!("spec{draft_layers}x{draft_tokens}: accepted {accepted} of {drafted} drafts");
        assert!(drafted > 0 && accepted <= drafted);
    }
    assert_eq!(e.kv().num_sequences(), 0);
}

#[test]
fn self_speculative_greedy_equals_full_on_the_tiny_llamas() {
    for name in ["tiny-llama", "tiny-llama-llama3"] {
        let mut e = tiny(name);
        let p = tiny_prompt(&e);
        let full = full_greedy(&mut e, &p, 24);
        for (k, d) in [(1, 1), (1, 4), (2, 5)] {
            e.set_depth(DepthProfile::SelfSpeculative { draft_layers: k, draft_tokens: d }).unwrap();
            let g = e.generate(ignore_eos(p.clone(), 24), &mut |_| {}).unwrap();
            assert_eq!(g.token_ids, full, "{name} spec{k}x{d}");
        }
    }
}

#[test]
fn self_speculative_respects_stops() {
    let mut e = common::default_engine();
    let p = e.encode_prompt("The capital of France is").unwrap();
    let full = full_greedy(&mut e, &p, 24);
    e.set_depth(DepthProfile::SelfSpeculative { draft_layers: 12, draft_tokens: 6 }).unwrap();
    // max_tokens falls inside a draft window: never more tokens than asked.
    for n in [1, 2, 5, 7] {
        let g = e.generate(ignore_eos(p.clone(), n), &mut |_| {}).unwrap();
        assert_eq!(g.token_ids, full[..n], "max_tokens {n}");
        assert_eq!(g.finish_reason, FinishReason::Length);
    }
    // A stop id ends generation at its first occurrence, as in plain decoding.
    let stop = full[9];
    let first = full.iter().position(|t| *t == stop).unwrap();
    let req = GenerateRequest { stop_token_ids: vec![stop], ..ignore_eos(p.clone(), 24) };
    let g = e.generate(req.clone(), &mut |_| {}).unwrap();
    assert_eq!(g.token_ids, full[..=first]);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    e.set_depth(DepthProfile::Full).unwrap();
    let plain = e.generate(req, &mut |_| {}).unwrap();
    assert_eq!((g.token_ids, g.text), (plain.token_ids, plain.text));
    // Sampled requests are refused rather than silently made greedy.
    e.set_depth(DepthProfile::SelfSpeculative { draft_layers: 12, draft_tokens: 6 }).unwrap();
    let mut hot = ignore_eos(p, 4);
    hot.sampling.temperature = 0.7;
    assert!(e.generate(hot, &mut |_| {}).is_err());
}

/// After speculative steps the KV cache is what plain decoding leaves:
/// plain decode steps continue with bit-identical logits.
#[test]
fn kv_after_speculation_lets_generation_continue_identically() {
    let mut e = common::default_engine();
    let p = e.encode_prompt("Once upon a time").unwrap();
    let m = &e.loaded().model;
    let (trace, full) = decode_trace(m, &p, Depth::Full, Depth::Full, 20);

    let seq = e.add_sequence().unwrap();
    let out = e.step(&[SeqChunk { seq, tokens: &p, adapter: None }], LogitsFor::LastOfEachChunk).unwrap();
    let mut toks = argmax_rows(&out);
    while toks.len() < 12 {
        let input = SpecInput { seq, last: *toks.last().unwrap(), max_new: 12 - toks.len() };
        let r = e.speculative_step(&[input], 10, 4).unwrap().remove(0);
        assert_eq!(r.tokens.len(), r.accepted + 1);
        assert!(r.drafted <= 4 && r.tokens.len() <= input.max_new);
        toks.extend(r.tokens);
        assert_eq!(e.kv().len(seq).unwrap(), p.len() + toks.len() - 1, "KV holds every token but the last");
    }
    assert_eq!(toks, full[..12]);
    for i in 12..=20 {
        let last = [toks[i - 1]];
        let out = e.step(&[SeqChunk { seq, tokens: &last, adapter: None }], LogitsFor::LastOfEachChunk).unwrap();
        assert_eq!(bits(&out)[0], trace[i], "decode step {i} after speculation");
        toks.extend(argmax_rows(&out));
    }
    assert_eq!(toks, full);
    assert!(e.speculative_step(&[SpecInput { seq, last: 0, max_new: 0 }], 10, 4).is_err());
    assert!(e.speculative_step(&[SpecInput { seq, last: 0, max_new: 3 }], 30, 4).is_err());
    assert_eq!(e.kv().len(seq).unwrap(), p.len() + 20, "a refused step leaves the cache alone");
}

#[test]
fn cli_depth_flag_reports_stats() {
    let model = common::default_model().to_str().unwrap().to_string();
    let o = common::arqon(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--depth",
        "spec:10:4",
        "--json",
    ]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["depth"]["profile"], "spec10x4");
    assert!(v["depth"]["acceptance_rate"].as_f64().unwrap() >= 0.0);
    assert!(err.contains("acceptance"), "{err}");
    let o = common::arqon(&["generate", "--model", &model, "--prompt", "hi", "--depth", "exit:99"]);
    assert!(!o.status.success());
    assert!(common::texts(&o).1.contains("depth profile"), "{}", common::texts(&o).1);
}
