//! The safetensors path against Hugging Face transformers, on tiny random
//! Llamas made by `tests/fixtures/make_tiny_llama.py` (GQA; untied and tied
//! embeddings; plain and Llama-3-scaled RoPE).

mod common;

use arqon_runtime::chat::Message;
use arqon_runtime::model::{rows, LogitsFor, SeqChunk};
use arqon_runtime::{engine, Engine, GenerateRequest};
use serde_json::Value;

const FIXTURES: [&str; 2] = ["tiny-llama", "tiny-llama-llama3"];

struct Reference {
    text: String,
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
}

fn load(name: &str) -> (Engine, Reference) {
    let dir = common::tests_dir().join("fixtures").join(name);
    let e = Engine::new(engine::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}")));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let r = Reference {
        text: v["text"].as_str().unwrap().to_string(),
        input_ids: ids(&v["input_ids"]),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect(),
        greedy_ids: ids(&v["greedy_ids"]),
    };
    (e, r)
}

/// Largest |ours - theirs| relative to the largest |theirs| in the row.
fn rel_err(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    ours.iter().zip(theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

#[test]
fn tokenizer_json_matches_transformers() {
    for name in FIXTURES {
        let (e, r) = load(name);
        assert_eq!(e.tokenizer().encode(&r.text, false).unwrap(), r.input_ids, "{name}");
        assert_eq!(e.tokenizer().decode(&r.input_ids, true).unwrap(), r.text, "{name}");
    }
}

#[test]
fn logits_at_every_position_match_transformers() {
    for name in FIXTURES {
        let (mut e, r) = load(name);
        let seq = e.add_sequence().unwrap();
        let logits = e.step(&[SeqChunk { seq, tokens: &r.input_ids, adapter: None }], LogitsFor::AllPositions).unwrap();
        let ours = rows(&logits).unwrap();
        assert_eq!(ours.len(), r.logits.len());
        for (pos, (o, t)) in ours.iter().zip(&r.logits).enumerate() {
            let err = rel_err(o, t);
            assert!(err < 1e-4, "{name}: position {pos}: relative error {err:e}");
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for name in FIXTURES {
        let (mut e, r) = load(name);
        let g = e
            .generate(
                GenerateRequest { ignore_eos: true, ..GenerateRequest::greedy(r.input_ids.clone(), 16) },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(g.token_ids, r.greedy_ids, "{name}");
    }
}

/// Prefill in pieces (as chunked prefill and decode do) gives the logits of
/// prefill in one go: the KV cache holds exactly what attention needs.
#[test]
fn chunked_prefill_equals_one_shot() {
    let (mut e, r) = load("tiny-llama-llama3");
    let seq = e.add_sequence().unwrap();
    let mut pieces = Vec::new();
    for chunk in [&r.input_ids[..7], &r.input_ids[7..8], &r.input_ids[8..20], &r.input_ids[20..]] {
        let l = e.step(&[SeqChunk { seq, tokens: chunk, adapter: None }], LogitsFor::AllPositions).unwrap();
        pieces.extend(rows(&l).unwrap());
    }
    for (pos, (o, t)) in pieces.iter().zip(&r.logits).enumerate() {
        let err = rel_err(o, t);
        assert!(err < 1e-4, "position {pos}: relative error {err:e}");
    }
}

#[test]
fn chat_template_from_tokenizer_config() {
    let (e, _) = load("tiny-llama");
    let ids = e.encode_chat(&[Message::new("user", "hello")]).unwrap();
    let text = e.tokenizer().decode(&ids, false).unwrap();
    assert_eq!(text, "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
}
