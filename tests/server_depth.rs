//! Depth profiles through `arqon serve`: a self-speculative server gives
//! every greedy client exactly the full model's greedy output (lossless), with
//! several streams speculating in one step; sampled requests on it still work.

mod common;
mod server_support;

use std::sync::Arc;

use arqon_runtime::GenerateRequest;
use serde_json::json;
use server_support::{stream_texts, Server};

const PROMPTS: [&str; 4] = ["The capital of France is", "def add(a, b):", "1, 2, 3, 4,", "To make a cup of tea, first"];

#[test]
fn a_self_speculative_server_equals_full_depth_greedy() {
    let max_tokens = 20;
    let mut e = common::default_engine();
    let full: Vec<String> = PROMPTS
        .iter()
        .map(|p| {
            let ids = e.encode_prompt(p).unwrap();
            e.generate(GenerateRequest::greedy(ids, max_tokens), &mut |_| {}).unwrap().text
        })
        .collect();
    drop(e);

    let model = common::default_model();
    let s = Arc::new(Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        "smol",
        "--depth",
        "spec:20:3",
    ]));
    let handles: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let s = s.clone();
            let body =
                json!({"model": "smol", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": true});
            std::thread::spawn(move || {
                let (chunks, done) = s.stream("/v1/completions", &body).collect();
                assert!(done, "the stream ended early");
                stream_texts(&chunks, 1).remove(0)
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&full) {
        assert_eq!(&h.join().unwrap(), want);
    }
    // The server did speculate (and the drafts were checked, some accepted).
    let (drafted, accepted) =
        (s.metric("arqon_spec_drafted_tokens_total"), s.metric("arqon_spec_accepted_tokens_total"));
    assert!(drafted > 0.0 && accepted > 0.0 && accepted <= drafted, "drafted {drafted}, accepted {accepted}");
    // Sampled requests run normal steps on the same variant.
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": "smol", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0.8, "seed": 3}),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 8);
    let (_, v) = s.get("/v1/variants");
    assert!(v.contains("self_speculative"), "{v}");
}
