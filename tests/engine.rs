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
fn streamed_pieces_concatenate_to_the_text() {
    let mut e = common::default_engine();
    let ids = e.encode_prompt("Les misérables est un roman de").unwrap();
    let mut streamed = String::new();
    let g = e.generate(GenerateRequest::greedy(ids, 20), &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, g.text);
}
