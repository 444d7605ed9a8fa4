//! `arqon serve` on the default model: continuous batching gives each client
//! exactly its greedy output alone, disconnected clients free their KV cache,
//! and SIGTERM drains in-flight streams, refuses new work, and exits 0.

mod common;
mod server_support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use arqon_runtime::GenerateRequest;
use serde_json::{json, Value};
use server_support::{stream_texts, Server};

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "1, 2, 3, 4,",
    "The three primary colours are",
    "Water boils at",
    "My favourite programming language is",
    "To make a cup of tea, first",
];

fn default_server(extra: &[&str]) -> Server {
    let model = common::default_model();
    let mut args = vec!["--model", model.to_str().unwrap(), "--served-model-name", "smol"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn streaming(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "stream": true, "stream_options": {"include_usage": true}})
}

#[test]
fn concurrent_streams_each_get_their_greedy_output_alone() {
    // Alone, in-process: the reference.
    let max_tokens = 12;
    let mut e = common::default_engine();
    let alone: Vec<(String, usize, usize)> = PROMPTS
        .iter()
        .map(|p| {
            let ids = e.encode_prompt(p).unwrap();
            let g = e.generate(GenerateRequest::greedy(ids.clone(), max_tokens), &mut |_| {}).unwrap();
            (g.text, ids.len(), g.token_ids.len())
        })
        .collect();
    drop(e);

    // A small step budget so newcomers' prompts are spread over many steps,
    // each shared with the running streams' decode tokens. (Prompts that fit
    // in one budget are prefilled whole; see the scheduler's module docs.)
    let s = Arc::new(default_server(&["--max-batch", "32", "--step-tokens", "48"]));
    let clients = 32;
    let barrier = Arc::new(Barrier::new(clients));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let r = s.stream("/v1/completions", &streaming(PROMPTS[i % PROMPTS.len()], max_tokens));
                assert_eq!(r.status, 200);
                r.collect()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (chunks, done) = h.join().unwrap();
        assert!(done, "client {i} got [DONE]");
        let (text, prompt_tokens, completion_tokens) = &alone[i % PROMPTS.len()];
        assert_eq!(&stream_texts(&chunks, 1)[0], text, "client {i}: {:?}", PROMPTS[i % PROMPTS.len()]);
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["prompt_tokens"], *prompt_tokens, "client {i}");
        assert_eq!(usage["completion_tokens"], *completion_tokens, "client {i}");
    }
    eprintln!("32 streams of {max_tokens} tokens in {:.1}s", t0.elapsed().as_secs_f64());
    assert_eq!(s.metric("arqon_kv_cache_sequences"), 0.0);
    assert_eq!(s.metric("arqon_kv_cache_bytes"), 0.0);
    assert!(s.metric("arqon_running_sequences") == 0.0);
}

#[test]
fn disconnected_clients_free_their_kv_cache_and_the_others_finish() {
    let s = Arc::new(default_server(&[]));
    // Four clients that stay; their streams outlast the disconnects.
    let stay = 4;
    let keep_tokens = 48;
    let stayers: Vec<_> = (0..stay)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut req = streaming(PROMPTS[i], keep_tokens);
                req["ignore_eos"] = json!(true);
                s.stream("/v1/completions", &req).collect()
            })
        })
        .collect();
    // Eight clients that read a few tokens, then hang up.
    let mut leavers: Vec<_> = (0..8)
        .map(|i| {
            let mut req = streaming(PROMPTS[i % PROMPTS.len()], 200);
            req["ignore_eos"] = json!(true);
            s.stream("/v1/completions", &req)
        })
        .collect();
    for r in &mut leavers {
        for _ in 0..2 {
            assert!(r.next_data().is_some());
        }
    }
    let t0 = Instant::now();
    let running_before = s.metric("arqon_kv_cache_sequences");
    assert!(running_before >= 8.0, "{running_before} sequences before the disconnects");
    drop(leavers);
    // Their sequences are freed at the next step boundary.
    loop {
        let cancelled = s.metric("arqon_cancelled_sequences_total");
        let in_cache = s.metric("arqon_kv_cache_sequences");
        if cancelled >= 8.0 && in_cache <= stay as f64 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "cancelled {cancelled}, {in_cache} still cached");
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in stayers {
        let (chunks, done) = h.join().unwrap();
        assert!(done);
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], keep_tokens);
    }
    assert_eq!(s.metric("arqon_cancelled_sequences_total"), 8.0);
    assert_eq!(s.metric("arqon_kv_cache_sequences"), 0.0);
    assert_eq!(s.metric("arqon_kv_cache_bytes"), 0.0);
    // And it still serves.
    let (st, b) = s.post("/v1/completions", &json!({"model": "smol", "prompt": "Hi", "max_tokens": 2}));
    assert_eq!(st, 200, "{b}");
}

#[test]
fn sigterm_finishes_the_stream_refuses_new_work_and_exits_0() {
    let mut s = default_server(&[]);
    let mut req = streaming(PROMPTS[2], 40);
    req["ignore_eos"] = json!(true);
    let mut r = s.stream("/v1/completions", &req);
    assert!(r.next_data().is_some(), "the stream has started");
    s.sigterm();
    // New work is refused while the stream drains.
    let t0 = Instant::now();
    loop {
        let (st, b) = s.post("/v1/completions", &json!({"model": "smol", "prompt": "Hi", "max_tokens": 2}));
        if st == 503 {
            assert_eq!(b["error"]["type"], "service_unavailable");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no 503 after SIGTERM: {st} {b}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.get("/ready").0, 503);
    let (chunks, done) = r.collect();
    assert!(done, "the in-flight stream finishes");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 40);
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(0), "stderr:\n{}", s.stderr());
}
