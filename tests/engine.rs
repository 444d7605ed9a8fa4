//! Engine-level behaviour on the default model: batching, sampling, stops.

mod common;

use arqon_runtime::{FinishReason, GenerateRequest, SamplingParams};

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1, 2, 3,",
];

#[test]
fn batched_greedy_equals_each_sequence_alone() {
    let mut e = common::default_engine();
    let reqs: Vec<GenerateRequest> =
        PROMPTS.iter().map(|p| GenerateRequest::greedy(e.encode_prompt(p).unwrap(), 24)).collect();
    let lens: Vec<usize> = reqs.iter().map(|r| r.prompt_ids.len()).collect();
    assert!(lens.windows(2).all(|w| w[0] != w[1]), "prompts should differ in length: {lens:?}");
    let together = e.generate_batch(reqs.clone(), &mut |_, _| {}).unwrap();
    for (req, t) in reqs.into_iter().zip(&together) {
        let alone = e.generate(req, &mut |_| {}).unwrap();
        assert_eq!(alone.token_ids, t.token_ids, "prompt {:?}", t.prompt_token_ids);
        assert_eq!(alone.text, t.text);
    }
    assert_eq!(e.kv().num_sequences(), 0, "every sequence is freed");
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let mut e = common::default_engine();
    let ids = e.encode_prompt("Write a short poem about the sea.").unwrap();
    let req = |seed| GenerateRequest {
        sampling: SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..Default::default() },
        ..GenerateRequest::greedy(ids.clone(), 24)
    };
    let a = e.generate(req(1), &mut |_| {}).unwrap();
    let b = e.generate(req(1), &mut |_| {}).unwrap();
    let c = e.generate(req(2), &mut |_| {}).unwrap();
    assert_eq!(a.token_ids, b.token_ids);
    assert_ne!(a.token_ids, c.token_ids);
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let mut e = common::default_engine();
    let ids = e.encode_prompt("The capital of France is").unwrap();
    // Greedy continuation is " Paris.\n\nThe United States ...".
    let req = GenerateRequest { stop: vec![".".into()], ..GenerateRequest::greedy(ids.clone(), 32) };
    let g = e.generate(req, &mut |_| {}).unwrap();
    assert_eq!(g.text, " Paris");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    let g = e.generate(GenerateRequest::greedy(ids, 3), &mut |_| {}).unwrap();
    assert_eq!(g.token_ids.len(), 3);
    assert_eq!(g.finish_reason, FinishReason::Length);
}

#[test]
fn a_stop_token_releases_the_text_held_for_a_stop_string_and_a_logit_bias_steers() {
    let mut e = common::default_engine();
    let ids = e.encode_prompt("The capital of France is").unwrap();
    let g = e.generate(GenerateRequest::greedy(ids.clone(), 2), &mut |_| {}).unwrap();
    assert_eq!(g.text, " Paris.");
    let dot = g.token_ids[1];
    // " Paris" could begin the stop string " Paris!", so it is held back; the
    // stop token that follows ends the choice and releases it.
    let req = GenerateRequest {
        stop: vec![" Paris!".into()],
        stop_token_ids: vec![dot],
        ..GenerateRequest::greedy(ids.clone(), 32)
    };
    let mut streamed = String::new();
    let g = e.generate(req, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!((g.text.as_str(), g.finish_reason), (" Paris", FinishReason::Stop));
    assert_eq!(streamed, g.text);
    // A bias of -100 bans the greedy token; +100 forces one, sampled or not.
    let biased = |bias: Vec<(u32, f32)>, temperature: f32| GenerateRequest {
        sampling: SamplingParams { temperature, seed: Some(1), logit_bias: bias, ..SamplingParams::default() },
        ..GenerateRequest::greedy(ids.clone(), 3)
    };
    let g = e.generate(biased(vec![(dot, -100.0)], 0.0), &mut |_| {}).unwrap();
    assert_ne!(g.token_ids[1], dot, "{g:?}");
    for t in [0.0, 1.0] {
        let g = e.generate(biased(vec![(dot, 100.0)], t), &mut |_| {}).unwrap();
        assert_eq!(g.token_ids, vec![dot; 3], "temperature {t}");
    }
}

#[test]
fn chat_turn_ends_on_end_of_turn_token() {
    let mut e = common::default_engine();
    let ids = e.encode_chat(&[arqon_runtime::chat::Message::new("user", "Say hello.")]).unwrap();
    let g = e.generate(GenerateRequest::greedy(ids, 200), &mut |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop, "{g:?}");
    let last = *g.token_ids.last().unwrap();
    assert!(e.tokenizer().stop_ids().contains(&last));
    assert!(!g.text.contains("<|im_end|>"), "special tokens are not in the text");
    assert!(!g.text.is_empty());
}

#[test]
fn min_tokens_holds_off_every_stop() {
    let mut e = common::default_engine();
    let ids = e.encode_chat(&[arqon_runtime::chat::Message::new("user", "Say hello.")]).unwrap();
    let g = e.generate(GenerateRequest::greedy(ids.clone(), 200), &mut |_| {}).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop, "{g:?}");
    // The end-of-turn token is masked until min_tokens.
    let n = g.token_ids.len() + 6;
    let req = GenerateRequest { min_tokens: n, ..GenerateRequest::greedy(ids, n) };
    let g = e.generate(req, &mut |_| {}).unwrap();
    assert_eq!((g.token_ids.len(), g.finish_reason), (n, FinishReason::Length));
    assert!(!g.token_ids.iter().any(|t| e.tokenizer().stop_ids().contains(t)), "{g:?}");
    // A stop string is not looked for before min_tokens either.
    let ids = e.encode_prompt("The capital of France is").unwrap();
    let req = GenerateRequest { stop: vec![".".into()], min_tokens: 4, ..GenerateRequest::greedy(ids, 32) };
    let g = e.generate(req, &mut |_| {}).unwrap();
    assert!(g.text.starts_with(" Paris.") && g.token_ids.len() >= 4, "{g:?}");
    assert!(!g.text[" Paris.".len()..].contains('.'), "it stops at the first '.' after min_tokens: {g:?}");
}

#[test]
fn streamed_pieces_concatenate_to_the_text() {
    let mut e = common::default_engine();
    let ids = e.encode_prompt("Les misérables est un roman de").unwrap();
    let mut streamed = String::new();
    let g = e.generate(GenerateRequest::greedy(ids, 20), &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, g.text);
}

/// The paged attention op (our CUDA kernel's entry; on the CPU its f64
/// reference) wired into the decoder gives what the CPU decode kernel gives:
/// the same greedy tokens for a batch of prompts of different lengths (so
/// block tables of different widths), close logits, and a speculative step
/// (per-row verification through the op) as lossless as plain decoding.
#[test]
fn the_paged_attention_op_decodes_as_the_cpu_kernel_does() {
    use arqon_runtime::model::{rows, LogitsFor, SeqChunk};
    use arqon_runtime::{engine, Engine};
    use arqon_variants::DepthProfile;

    let plain = common::default_engine();
    let mut loaded = engine::load(common::default_model()).unwrap();
    loaded.model = loaded.model.with_paged_attention(true).unwrap();
    assert!(loaded.model.paged_attention());
    let mut paged = Engine::new(loaded);
    let mut plain = plain;

    let reqs: Vec<GenerateRequest> =
        PROMPTS.iter().map(|p| GenerateRequest::greedy(plain.encode_prompt(p).unwrap(), 20)).collect();
    let a = plain.generate_batch(reqs.clone(), &mut |_, _| {}).unwrap();
    let b = paged.generate_batch(reqs.clone(), &mut |_, _| {}).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.token_ids, y.token_ids, "prompt {:?}", x.prompt_token_ids);
    }

    // Logits of one decode step after a 40-token history (three blocks).
    let ids = &a[2].prompt_token_ids;
    let step_logits = |e: &mut Engine| {
        let seq = e.add_sequence().unwrap();
        e.step(&[SeqChunk { seq, tokens: ids, adapter: None }], LogitsFor::LastOfEachChunk).unwrap();
        let l = e.step(&[SeqChunk { seq, tokens: &[a[2].token_ids[0]], adapter: None }], LogitsFor::LastOfEachChunk);
        e.remove_sequence(seq);
        rows(&l.unwrap()).unwrap().remove(0)
    };
    let (x, y) = (step_logits(&mut plain), step_logits(&mut paged));
    let worst = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst < 1e-3, "largest logit difference {worst}");
    // Decode rows really take the op: on a cache with host pools (which the
    // CPU kernel reads and the op refuses), prefill runs and decode is refused.
    {
        use arqon_runtime::model::{KvCache, SeqId};
        let m = &paged.loaded().model;
        let mut host = KvCache::growable(m.kv_shape(), candle_core::Device::Cpu);
        host.add(SeqId(0)).unwrap();
        m.forward(&[SeqChunk { seq: SeqId(0), tokens: ids, adapter: None }], &mut host, LogitsFor::LastOfEachChunk)
            .unwrap();
        let e = m.forward(
            &[SeqChunk { seq: SeqId(0), tokens: &[7], adapter: None }],
            &mut host,
            LogitsFor::LastOfEachChunk,
        );
        assert!(e.unwrap_err().to_string().contains("paged attention op"));
    }

    // Self-speculation verifies drafts row by row through the same op, so
    // it stays lossless against plain decoding on the op.
    let greedy = paged.generate(reqs[0].clone(), &mut |_| {}).unwrap();
    paged.set_depth(DepthProfile::SelfSpeculative { draft_layers: 12, draft_tokens: 3 }).unwrap();
    let spec = paged.generate(reqs[0].clone(), &mut |_| {}).unwrap();
    assert_eq!(spec.token_ids, greedy.token_ids);
    assert!(spec.depth.drafted > 0, "{:?}", spec.depth);
    assert_eq!(paged.kv().num_sequences(), 0);
}

/// Decode steps on fixed buffers (what a CUDA graph captures; on the CPU
/// they run eagerly) give the ordinary paged steps' logits and tokens: with
/// rows padded to a bucket (3 sequences in a step of 4), as the batch
/// shrinks (new shapes: 2, then 1 row), as block tables widen past 128
/// tokens, and as a growable pool moves. Steps that do not qualify run
/// eagerly, and an error leaves the cache as it was.
#[test]
fn fixed_buffer_decode_steps_equal_ordinary_ones() {
    use arqon_runtime::engine;
    use arqon_runtime::model::{argmax, rows, DecodeGraphs, DecodePath, LogitsFor, SeqChunk, SeqId, StepPlan};

    let mut loaded = engine::load(common::default_model()).unwrap();
    loaded.model = loaded.model.with_paged_attention(true).unwrap();
    let m = &loaded.model;
    let vocab = m.config().vocab_size;
    let (mut kv_a, mut kv_b) = (m.new_kv_cache(), m.new_kv_cache());
    let prompts: Vec<Vec<u32>> =
        [5usize, 30, 118].iter().map(|&n| (0..n).map(|i| ((i * 7919 + n * 31 + 1) % vocab) as u32).collect()).collect();
    let seqs: Vec<SeqId> = (0..3).map(SeqId).collect();
    let mut graphs = DecodeGraphs::new(true);
    for (s, p) in seqs.iter().zip(&prompts) {
        kv_a.add(*s).unwrap();
        kv_b.add(*s).unwrap();
        let chunk = [SeqChunk { seq: *s, tokens: p, adapter: None }];
        m.forward(&chunk, &mut kv_a, LogitsFor::LastOfEachChunk).unwrap();
        // A prompt is not a decode step: it runs eagerly.
        let (_, path) = graphs.forward(m, &chunk, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
        assert_eq!(path, DecodePath::Eager);
    }
    let mut next: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
    let mut worst = 0f32;
    for step in 0..24 {
        let live = match step {
            0..=9 => 3,
            10..=17 => 2,
            _ => 1,
        };
        let toks: Vec<[u32; 1]> = next[..live].iter().map(|t| [*t]).collect();
        let chunks: Vec<SeqChunk<'_>> =
            seqs[..live].iter().zip(&toks).map(|(s, t)| SeqChunk { seq: *s, tokens: t, adapter: None }).collect();
        let a = rows(&m.forward(&chunks, &mut kv_a, LogitsFor::LastOfEachChunk).unwrap()).unwrap();
        let (out, path) = graphs.forward(m, &chunks, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
        assert_eq!(path, DecodePath::Fixed, "step {step}");
        assert_eq!(out.layers_run, vec![m.config().num_layers; live]);
        let b = rows(&out.logits).unwrap();
        assert_eq!(b.len(), live, "one row per sequence, not per padded row");
        for (x, y) in a.iter().zip(&b) {
            worst = x.iter().zip(y).fold(worst, |w, (p, q)| w.max((p - q).abs()));
            assert_eq!(argmax(x), argmax(y), "step {step}");
        }
        for (t, row) in next.iter_mut().zip(&a) {
            *t = argmax(row);
        }
    }
    assert!(worst < 1e-4, "largest logit difference {worst}");
    for s in &seqs {
        assert_eq!(kv_a.len(*s).unwrap(), kv_b.len(*s).unwrap());
    }
    // An unknown sequence fails the step and leaves the others' lengths.
    let before = kv_b.len(seqs[0]).unwrap();
    let bad = [
        SeqChunk { seq: seqs[0], tokens: &[1], adapter: None },
        SeqChunk { seq: SeqId(99), tokens: &[1], adapter: None },
    ];
    assert!(graphs.forward(m, &bad, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).is_err());
    assert_eq!(kv_b.len(seqs[0]).unwrap(), before);
    // Off, or for every position's logits, the same step runs eagerly.
    let one = [SeqChunk { seq: seqs[0], tokens: &[1], adapter: None }];
    let (_, path) = graphs.forward(m, &one, &mut kv_b, LogitsFor::AllPositions, StepPlan::FULL).unwrap();
    assert_eq!(path, DecodePath::Eager);
    let (_, path) =
        DecodeGraphs::new(false).forward(m, &one, &mut kv_b, LogitsFor::LastOfEachChunk, StepPlan::FULL).unwrap();
    assert_eq!(path, DecodePath::Eager);
    assert_eq!(graphs.captured(), 0, "nothing is captured on the CPU");

    // The offline engine's decode steps on fixed buffers: the same tokens.
    let mut plain = arqon_runtime::Engine::new(loaded);
    let reqs: Vec<GenerateRequest> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest::greedy(plain.encode_prompt(p).unwrap(), 8 + 6 * i))
        .collect();
    let want = plain.generate_batch(reqs.clone(), &mut |_, _| {}).unwrap();
    plain.set_decode_graphs(true);
    let got = plain.generate_batch(reqs, &mut |_, _| {}).unwrap();
    for (x, y) in want.iter().zip(&got) {
        assert_eq!(x.token_ids, y.token_ids, "prompt {:?}", x.prompt_token_ids);
    }
}
