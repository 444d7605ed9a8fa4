//! `arqon serve` on the tiny fixture (loads in milliseconds): the protocol,
//! every error case with its status and OpenAI error body, auth, the queue
//! limit, the KV budget; after each bad input a normal request still works.

mod server_support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{stream_texts, tiny_model, Server};

fn tiny(extra: &[&str]) -> Server {
    let model = tiny_model();
    let mut args = vec!["--model", model.to_str().unwrap(), "--served-model-name", "tiny"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn completion(max_tokens: u64) -> Value {
    json!({"model": "tiny", "prompt": "hello world", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(e["type"], want_type, "{body}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{body}");
    if let Some(p) = want_param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// Posts `bodies` to `/v1/completions` from one thread each, released
/// together, and returns their answers in order.
fn post_at_once(s: &Arc<Server>, bodies: Vec<Value>) -> Vec<(u16, Value)> {
    let barrier = Arc::new(Barrier::new(bodies.len()));
    let handles: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                s.post("/v1/completions", &b)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_still_serves(s: &Server) {
    let (st, b) = s.post("/v1/completions", &completion(3));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 3);
}

#[test]
fn operations_endpoints_and_models() {
    let s = tiny(&[]);
    let (st, health) = s.get("/health");
    assert_eq!((st, health.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(s.get("/ready").0, 200);
    let (_, metrics) = s.get("/metrics");
    assert!(metrics.lines().any(|l| l == "arqon_device_lost 0"), "{metrics}");
    let (st, models) = s.get("/v1/models");
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let (st, spec) = s.get("/openapi.json");
    assert_eq!(st, 200);
    let spec: Value = serde_json::from_str(&spec).unwrap();
    for p in ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics", "/openapi.json"]
    {
        assert!(spec["paths"].get(p).is_some(), "openapi.json lacks {p}");
    }
    assert_still_serves(&s);
    let (st, m) = s.get("/metrics");
    assert_eq!(st, 200);
    for name in [
        "arqon_requests_total{status=\"200\"}",
        "arqon_time_to_first_token_seconds_bucket",
        "arqon_inter_token_latency_seconds_count",
        "arqon_e2e_latency_seconds_sum",
        "arqon_prompt_tokens_total",
        "arqon_generation_tokens_total 3",
        "arqon_queue_depth 0",
        "arqon_running_sequences 0",
        "arqon_kv_cache_bytes 0",
        "arqon_kv_cache_sequences 0",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
}

#[test]
fn completion_and_chat_shapes_streaming_and_not() {
    let s = tiny(&[]);
    let (st, b) = s.post("/v1/completions", &completion(5));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "text_completion");
    assert_eq!(b["choices"][0]["finish_reason"], "length");
    assert_eq!(b["usage"]["completion_tokens"], 5);
    let prompt_tokens = b["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0);
    assert_eq!(b["usage"]["total_tokens"], prompt_tokens + 5);
    let text = b["choices"][0]["text"].as_str().unwrap().to_string();

    // The same request streamed gives the same text (greedy), then usage, then [DONE].
    let mut req = completion(5);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = s.stream("/v1/completions", &req);
    assert_eq!(r.status, 200);
    assert!(r.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
    let (chunks, done) = r.collect();
    assert!(done, "stream ends with [DONE]");
    assert_eq!(stream_texts(&chunks, 1)[0], text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 5);
    assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));

    // Chat, n = 2, logprobs, streamed: role chunks first, both choices finish.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      "temperature": 0, "ignore_eos": true, "n": 2, "logprobs": true, "top_logprobs": 3});
    let (st, b) = s.post("/v1/chat/completions", &chat);
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["choices"].as_array().unwrap().len(), 2);
    assert_eq!(b["choices"][0]["message"]["content"], b["choices"][1]["message"]["content"]);
    let content = b["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(b["usage"]["completion_tokens"], 8);
    let mut chat = chat;
    chat["stream"] = json!(true);
    let (chunks, done) = s.stream("/v1/chat/completions", &chat).collect();
    assert!(done);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let texts = stream_texts(&chunks, 2);
    assert_eq!(texts[0], b["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(texts[1], texts[0]);
    let finishes = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
    assert_eq!(finishes, 2);

    // Token-id prompts and lists of prompts.
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 2);
    assert_eq!(b["usage"]["prompt_tokens"], 5);
}

#[test]
fn bad_inputs_get_openai_errors_and_the_server_keeps_serving() {
    let s = tiny(&["--max-body-bytes", "4096"]);
    let raw = |body: &[u8]| {
        let r = s.request("POST", "/v1/completions", &[("content-type", "application/json")], Some(body));
        (r.status, r.json())
    };
    let (st, b) = raw(b"{\"model\": \"tiny\", \"prompt\": ");
    assert_error(st, &b, 400, "invalid_request_error", None);
    assert_still_serves(&s);
    let (st, b) = raw(b"[1, 2, 3]");
    assert_error(st, &b, 400, "invalid_request_error", None);
    let (st, b) = raw(&[0xff, 0xfe, 0x00]);
    assert_error(st, &b, 400, "invalid_request_error", None);

    for (body, param) in [
        (json!({"model": "tiny", "prompt": "x", "max_tokens": "ten"}), "max_tokens"),
        (json!({"model": "tiny", "prompt": "x", "temperature": [1]}), "temperature"),
        (json!({"model": "tiny", "prompt": "x", "stream": 1}), "stream"),
        (json!({"model": "tiny", "prompt": 42}), "prompt"),
        (json!({"model": "tiny", "prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json!({"model": "tiny", "prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"model": "tiny", "prompt": "x", "n": 1000}), "n"),
        (json!({"model": "tiny", "prompt": [1, 99999]}), "prompt"),
        (json!({"model": "tiny"}), "prompt"),
    ] {
        let (st, b) = s.post("/v1/completions", &body);
        assert_error(st, &b, 400, "invalid_request_error", Some(param));
    }
    assert_still_serves(&s);

    // Over the context (256 tokens): 400 before any work.
    let (st, b) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": "x", "max_tokens": 100000}));
    assert_error(st, &b, 400, "invalid_request_error", Some("max_tokens"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let long = "word ".repeat(300);
    let (st, b) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": long, "max_tokens": 1}));
    assert_error(st, &b, 400, "invalid_request_error", None);
    assert_eq!(b["error"]["code"], "context_length_exceeded");

    // Chat: empty messages, wrong shapes.
    for body in [
        json!({"model": "tiny", "messages": []}),
        json!({"model": "tiny", "messages": "hi"}),
        json!({"model": "tiny", "messages": [{"content": "no role"}]}),
    ] {
        let (st, b) = s.post("/v1/chat/completions", &body);
        assert_error(st, &b, 400, "invalid_request_error", Some("messages"));
    }

    // Unknown model: 404.
    let (st, b) = s.post("/v1/completions", &json!({"model": "gpt-4", "prompt": "x"}));
    assert_error(st, &b, 404, "not_found_error", Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");

    // Over the body limit: 413.
    let big = json!({"model": "tiny", "prompt": "a".repeat(8000)});
    let (st, b) = s.post("/v1/completions", &big);
    assert_error(st, &b, 413, "invalid_request_error", None);

    // Unknown route and wrong method.
    let r = s.request("GET", "/v1/nope", &[], None);
    assert_error(r.status, &r.json(), 404, "not_found_error", None);
    let r = s.request("GET", "/v1/completions", &[], None);
    assert_eq!(r.status, 405);
    assert_still_serves(&s);
    let m = s.get("/metrics").1;
    assert!(m.contains("arqon_requests_total{status=\"413\"} 1"), "{m}");
}

#[test]
fn api_key_is_required_on_v1_routes_when_set() {
    let s = tiny(&["--api-key", "sekrit"]);
    let body = completion(2).to_string();
    let post = |headers: &[(&str, &str)]| s.request("POST", "/v1/completions", headers, Some(body.as_bytes()));
    for headers in [&[][..], &[("authorization", "Bearer wrong!")][..], &[("authorization", "sekrit")][..]] {
        let r = post(headers);
        assert_error(r.status, &r.json(), 401, "authentication_error", None);
    }
    assert_eq!(s.request("GET", "/v1/models", &[], None).status, 401);
    assert_eq!(post(&[("authorization", "Bearer sekrit")]).status, 200);
    assert_eq!(s.get("/health").0, 200, "operations endpoints stay open");
}

#[test]
fn a_full_queue_answers_429_at_once_and_the_server_recovers() {
    let s = Arc::new(tiny(&["--max-queue", "1", "--max-batch", "1", "--step-tokens", "64"]));
    let clients = 12;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                let body = completion(200).to_string();
                barrier.wait();
                let t0 = Instant::now();
                let r = s.request("POST", "/v1/completions", &[], Some(body.as_bytes()));
                (r.status, r.header("retry-after").map(str::to_string), r.json(), t0.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok + full.len(), clients, "only 200 or 429: {:?}", results.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(ok >= 1 && !full.is_empty(), "{ok} ok, {} rejected", full.len());
    for (_, retry, body, took) in &full {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_error(429, body, 429, "rate_limit_error", None);
        assert!(*took < Duration::from_secs(5), "429 must be immediate, took {took:?}");
    }
    for r in results.iter().filter(|r| r.0 == 200) {
        assert_eq!(r.2["usage"]["completion_tokens"], 200);
    }
    assert_still_serves(&s);
}

#[test]
fn the_kv_budget_bounds_admission() {
    // 1 MiB of KV at 768 bytes per token (3 layers x 2 heads x 16 x 2 x 4
    // bytes): 85 blocks of 16 tokens (12 KiB each).
    let s = Arc::new(tiny(&["--kv-cache-mb", "1"]));
    assert_eq!(s.metric("arqon_kv_cache_blocks_total"), 85.0);
    assert_eq!(s.metric("arqon_kv_cache_budget_bytes"), (85 * 16 * 768) as f64);
    let (st, b) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": "x", "max_tokens": 200, "n": 16}));
    assert_error(st, &b, 400, "invalid_request_error", Some("max_tokens"));
    assert_eq!(b["error"]["code"], "kv_cache_budget_exceeded");
    assert_still_serves(&s);
}

#[test]
fn under_kv_pressure_the_latest_sequences_are_preempted_and_resume_to_the_same_answer() {
    // 85 blocks of 16 tokens; twelve requests of a 20-token prompt and 200
    // new tokens (one with n = 2) grow to 14 blocks per choice, 182 in all:
    // admission takes them on their prompts' blocks, and as they grow the
    // latest admitted are preempted, then compute their prompt and tokens
    // again. Each must still answer what it answers alone: greedy or
    // sampled, with logprobs, a penalty, a stop string, or forked choices.
    let kinds = [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "seed": 7}),
        json!({"temperature": 0, "logprobs": 2}),
        json!({"temperature": 0, "repetition_penalty": 1.3}),
        json!({"temperature": 0.9, "seed": 8, "n": 2}),
        json!({"temperature": 0.9, "seed": 9, "stop": ["e"]}),
    ];
    let body = |i: usize| {
        let prompt: Vec<u32> = (0..20).map(|t| 3 + ((i * 53 + t * 29) % 380) as u32).collect();
        let mut b = json!({"model": "tiny", "prompt": prompt, "max_tokens": 200, "ignore_eos": true});
        for (k, v) in kinds[i % kinds.len()].as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let answer = |b: &Value| -> Vec<Value> {
        let mut cs = b["choices"].as_array().unwrap().clone();
        cs.sort_by_key(|c| c["index"].as_u64());
        cs.iter().map(|c| json!([c["text"], c["finish_reason"], c["logprobs"]["tokens"]])).collect()
    };
    // On a plain server, with prefix caching (a resumed sequence finds its
    // own blocks), and on a self-speculative variant (a step's drafts take
    // blocks too).
    for extra in [&[][..], &["--enable-prefix-caching"][..], &["--depth", "spec:1:4"][..]] {
        let s = Arc::new(tiny(&[&["--kv-cache-mb", "1"], extra].concat()));
        let alone: Vec<Vec<Value>> = (0..12)
            .map(|i| {
                let (st, b) = s.post("/v1/completions", &body(i));
                assert_eq!(st, 200, "{b}");
                answer(&b)
            })
            .collect();
        assert_eq!(s.metric("arqon_preemptions_total"), 0.0, "one request at a time fits");
        for (i, (st, b)) in post_at_once(&s, (0..12).map(body).collect()).into_iter().enumerate() {
            assert_eq!(st, 200, "{b}");
            assert_eq!(answer(&b), alone[i], "request {i} {extra:?}");
        }
        assert!(s.metric("arqon_preemptions_total") > 0.0, "{extra:?}: the cache holds 85 of 182 blocks");
        if extra.contains(&"--depth") {
            assert!(s.metric("arqon_spec_drafted_tokens_total") > 0.0);
        }
        assert_eq!(s.metric("arqon_preempted_sequences"), 0.0);
        assert_eq!(s.metric("arqon_kv_cache_blocks_used"), 0.0);
        assert_eq!(s.metric("arqon_kv_cache_reserved_bytes"), 0.0);
        assert_still_serves(&s);
    }
}

#[test]
fn a_preempted_sequence_resumes_when_the_sequences_it_waited_on_end() {
    // Six choices of one request decode in step and end in one step, at 79
    // of the 85 blocks (14 each, one shared). A request admitted after them
    // is preempted as they grow, cannot resume beside them, and must resume
    // once they all end, to its alone answer.
    let s = Arc::new(tiny(&["--kv-cache-mb", "1"]));
    let body = |n: u64, first: u32| {
        let prompt: Vec<u32> = (0..20).map(|t| first + t * 7).collect();
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 200, "n": n, "temperature": 0.9, "seed": 4,
               "ignore_eos": true})
    };
    let texts = |b: &Value| -> Vec<Value> {
        let mut cs = b["choices"].as_array().unwrap().clone();
        cs.sort_by_key(|c| c["index"].as_u64());
        cs.iter().map(|c| c["text"].clone()).collect()
    };
    let (st, six) = s.post("/v1/completions", &body(6, 5));
    assert_eq!(st, 200, "{six}");
    let (st, one) = s.post("/v1/completions", &body(1, 9));
    assert_eq!(st, 200, "{one}");
    let first = {
        let s = s.clone();
        std::thread::spawn(move || s.post("/v1/completions", &body(6, 5)))
    };
    let t0 = Instant::now();
    while s.metric("arqon_running_sequences") < 6.0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the six choices never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (st, late) = s.post("/v1/completions", &body(1, 9));
    assert_eq!(st, 200, "{late}");
    let (st, early) = first.join().unwrap();
    assert_eq!(st, 200, "{early}");
    assert!(s.metric("arqon_preemptions_total") >= 1.0);
    assert_eq!(texts(&early), texts(&six));
    assert_eq!(texts(&late), texts(&one));
    assert_eq!(s.metric("arqon_kv_cache_blocks_used"), 0.0);
}

#[test]
fn logit_bias_stop_token_ids_and_min_tokens() {
    let s = tiny(&[]);
    let ids: Vec<u32> = (0..12).map(|i| 7 + i * 11).collect();
    let req = |extra: Value| {
        let mut b = json!({"model": "tiny", "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 0,
                           "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let tokens = |b: &Value| b["choices"][0]["logprobs"]["tokens"].as_array().unwrap().clone();
    // +100 forces token 42 at every position, greedy (on the host: a biased
    // row is not a plain argmax) and sampled.
    let (st, one) = s.post("/v1/completions", &req(json!({"max_tokens": 1, "logit_bias": {"42": 100}})));
    assert_eq!(st, 200, "{one}");
    for t in [0.0, 1.0] {
        let (st, b) = s.post("/v1/completions", &req(json!({"logit_bias": {"42": 100}, "temperature": t})));
        assert_eq!(st, 200, "{b}");
        assert_eq!(tokens(&b), vec![tokens(&one)[0].clone(); 4], "temperature {t}");
    }
    let (st, plain) = s.post("/v1/completions", &req(json!({})));
    assert_eq!(st, 200, "{plain}");
    assert_ne!(tokens(&plain), vec![tokens(&one)[0].clone(); 4]);
    // Without logprobs too (a plain greedy row would leave the step as its
    // argmax alone, without the bias).
    let (st, forced) = s.post("/v1/completions", &req(json!({"logit_bias": {"42": 100}})));
    let (st2, quiet) = s.post("/v1/completions", &req(json!({"logit_bias": {"42": 100}, "logprobs": null})));
    assert_eq!((st, st2), (200, 200), "{quiet}");
    assert_eq!(quiet["choices"][0]["text"], forced["choices"][0]["text"]);
    // A stop token id ends the choice, even past ignore_eos, and is not in the text.
    let (st, b) = s.post("/v1/completions", &req(json!({"logit_bias": {"42": 100}, "stop_token_ids": [42]})));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    assert_eq!((b["choices"][0]["text"].as_str(), b["usage"]["completion_tokens"].as_u64()), (Some(""), Some(1)));
    // min_tokens masks the stop token until then: the forced 42 comes fourth.
    let (st, b) = s.post(
        "/v1/completions",
        &req(json!({"logit_bias": {"42": 100}, "stop_token_ids": [42], "min_tokens": 3, "logprobs": null})),
    );
    assert_eq!(st, 200, "{b}");
    assert_eq!(
        (b["choices"][0]["finish_reason"].as_str(), b["usage"]["completion_tokens"].as_u64()),
        (Some("stop"), Some(4))
    );
    // With every id but 0 a stop token, min_tokens masks them for three
    // tokens (each then id 0), and the fourth stops: a plain greedy row under
    // min_tokens leaves the step as logits, not as the plain argmax.
    let every: Vec<u32> = (1..384).collect();
    let masked = |lp: Value| req(json!({"stop_token_ids": every, "min_tokens": 3, "logprobs": lp}));
    let (st, quiet) = s.post("/v1/completions", &masked(Value::Null));
    let (st2, loud) = s.post("/v1/completions", &masked(json!(0)));
    assert_eq!((st, st2), (200, 200), "{quiet} {loud}");
    assert_eq!(quiet["usage"]["completion_tokens"], 4);
    assert_eq!(quiet["choices"][0]["text"], loud["choices"][0]["text"]);
    for (bad, param) in [
        (json!({"min_tokens": 5}), "min_tokens"),
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"logit_bias": {"42": 101}}), "logit_bias"),
        (json!({"logit_bias": {"42": "up"}}), "logit_bias"),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"stop_token_ids": [999999]}), "stop_token_ids"),
        (json!({"stop_token_ids": "42"}), "stop_token_ids"),
    ] {
        let (st, b) = s.post("/v1/completions", &req(bad.clone()));
        assert_error(st, &b, 400, "invalid_request_error", Some(param));
    }
    assert_still_serves(&s);
}

#[test]
fn tokenize_and_detokenize_count_as_generation_does() {
    let s = tiny(&[]);
    let (st, c) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": "hello world", "max_tokens": 1}));
    assert_eq!(st, 200, "{c}");
    let (st, t) = s.post("/tokenize", &json!({"model": "tiny", "prompt": "hello world"}));
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["count"], c["usage"]["prompt_tokens"]);
    assert_eq!(t["tokens"].as_array().unwrap().len() as u64, t["count"].as_u64().unwrap());
    assert_eq!(t["max_model_len"], 256);
    let (st, bare) = s.post("/tokenize", &json!({"prompt": "hello world", "add_special_tokens": false}));
    assert_eq!(st, 200, "{bare}");
    assert!(bare["count"].as_u64() <= t["count"].as_u64(), "no BOS: {bare} {t}");
    let (st, d) = s.post("/detokenize", &json!({"model": "tiny", "tokens": bare["tokens"]}));
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["prompt"], "hello world");
    let messages = json!([{"role": "user", "content": "hi there"}]);
    let (st, chat) = s.post("/v1/chat/completions", &json!({"model": "tiny", "messages": messages, "max_tokens": 1}));
    assert_eq!(st, 200, "{chat}");
    let (st, t) = s.post("/tokenize", &json!({"messages": messages}));
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["count"], chat["usage"]["prompt_tokens"]);
    let (st, no_gen) = s.post("/tokenize", &json!({"messages": messages, "add_generation_prompt": false}));
    assert_eq!(st, 200, "{no_gen}");
    assert!(no_gen["count"].as_u64() < t["count"].as_u64(), "{no_gen} {t}");
    for (path, body, param) in [
        ("/tokenize", json!({}), "prompt"),
        ("/tokenize", json!({"prompt": 5}), "prompt"),
        ("/tokenize", json!({"prompt": "a", "messages": messages}), "messages"),
        ("/detokenize", json!({"tokens": [999999]}), "tokens"),
        ("/detokenize", json!({"tokens": "1"}), "tokens"),
    ] {
        let (st, b) = s.post(path, &body);
        assert_error(st, &b, 400, "invalid_request_error", Some(param));
    }
    let (st, b) = s.post("/tokenize", &json!({"model": "other", "prompt": "a"}));
    assert_eq!(st, 404, "{b}");
    assert_still_serves(&s);
}

#[test]
fn openai_fields_this_server_lacks_are_refused_unless_they_ask_nothing() {
    let s = tiny(&[]);
    let chat = |extra: Value| {
        let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // What SDKs and frameworks send by default passes.
    let inert = json!({"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "best_of": 1,
                       "functions": null});
    let (st, b) = s.post("/v1/chat/completions", &chat(inert));
    assert_eq!(st, 200, "{b}");
    for (extra, param) in [
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (json!({"tool_choice": "auto"}), "tool_choice"),
        (json!({"best_of": 3}), "best_of"),
        (json!({"suffix": "end"}), "suffix"),
    ] {
        let (st, b) = s.post("/v1/chat/completions", &chat(extra));
        assert_error(st, &b, 400, "invalid_request_error", Some(param));
    }
    assert_still_serves(&s);
}

#[test]
fn the_kv_cache_is_sized_from_free_memory_up_to_max_batch_contexts() {
    // The tiny model's context is 256 tokens, 16 blocks: a share of this
    // machine's free memory is far more, so --max-batch full contexts cap it.
    let s = tiny(&["--max-batch", "3"]);
    assert_eq!(s.metric("arqon_kv_cache_blocks_total"), 48.0);
    assert!(s.stderr().contains("KV cache 48 blocks of 16 tokens"), "{}", s.stderr());
    assert!(s.stderr().contains("capped at max batch × context"), "{}", s.stderr());
    // Four full contexts: three run at once, the fourth waits for a free one.
    let s = Arc::new(s);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.post("/v1/completions", &completion(240)))
        })
        .collect();
    for h in handles {
        let (st, b) = h.join().unwrap();
        assert_eq!(st, 200, "{b}");
    }
    assert_eq!(s.metric("arqon_kv_cache_blocks_used"), 0.0);
}

#[test]
fn prefix_caching_reuses_a_computed_prompt_and_keeps_the_answer() {
    let ids: Vec<u32> = (5..65).collect(); // 60 tokens: three full blocks and a part
    let body = json!({"model": "tiny", "prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let s = tiny(&["--enable-prefix-caching"]);
    let (st, first) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{first}");
    assert_eq!(s.metric("arqon_prefix_cache_hits_tokens_total"), 0.0);
    // The finished request's full blocks stay cached; the same prompt again
    // starts from its first three blocks and computes only the rest.
    assert!(s.metric("arqon_kv_cache_blocks_cached") >= 3.0);
    let (st, second) = s.post("/v1/completions", &body);
    assert_eq!(st, 200, "{second}");
    assert_eq!(s.metric("arqon_prefix_cache_hits_tokens_total"), 48.0);
    assert_eq!(s.metric("arqon_prefix_cache_queries_tokens_total"), 120.0);
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
    assert_eq!(second["usage"]["prompt_tokens"], 60);
    // A prompt that shares only the first block reuses only that one.
    let mut other = ids.clone();
    other[20] = 300;
    let (st, _) = s.post("/v1/completions", &json!({"model": "tiny", "prompt": other, "max_tokens": 4}));
    assert_eq!(st, 200);
    assert_eq!(s.metric("arqon_prefix_cache_hits_tokens_total"), 64.0);
    assert_eq!(s.metric("arqon_kv_cache_blocks_used"), 0.0);

    // Without the flag nothing is looked up.
    let plain = tiny(&[]);
    let (st, third) = plain.post("/v1/completions", &body);
    assert_eq!(st, 200);
    assert_eq!(plain.metric("arqon_prefix_cache_queries_tokens_total"), 0.0);
    assert_eq!(plain.metric("arqon_kv_cache_blocks_cached"), 0.0);
    assert_eq!(third["choices"][0]["text"], first["choices"][0]["text"]);
}

#[test]
fn the_n_choices_of_a_prompt_fork_from_one_prefill_and_answer_as_alone() {
    // 1 MiB is 85 blocks. A 100-token prompt and 8 new tokens hold 7 blocks,
    // 6 of them the prompt's full blocks: 16 choices each computing the
    // prompt would reserve 112 blocks; forked from the first, 7 + 15 = 22.
    let s = tiny(&["--kv-cache-mb", "1"]);
    let ids: Vec<u32> = (0..100).map(|i| 3 + (i * 37) % 380).collect();
    let req = |prompt: &[u32], n: u64, seed: u64| {
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 8, "n": n, "temperature": 1.0, "seed": seed,
               "ignore_eos": true})
    };
    let texts = |b: &Value| -> Vec<String> {
        let mut cs = b["choices"].as_array().unwrap().clone();
        cs.sort_by_key(|c| c["index"].as_u64());
        cs.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
    };
    let (st, all) = s.post("/v1/completions", &req(&ids, 16, 11));
    assert_eq!(st, 200, "{all}");
    assert_eq!(s.metric("arqon_prompt_tokens_total"), 100.0, "a prompt counts once, not once per choice");
    let all = texts(&all);
    assert_eq!(all.len(), 16);
    assert!(all.iter().any(|t| *t != all[0]), "each choice samples with its own seed: {all:?}");
    // Choice i draws with seed 11 + i from the forked cache: what the prompt
    // computed alone with that seed gives (the partial block was copied right).
    for i in [0, 1, 9, 15] {
        let (st, one) = s.post("/v1/completions", &req(&ids, 1, 11 + i));
        assert_eq!(st, 200, "{one}");
        assert_eq!(texts(&one)[0], all[i as usize], "choice {i}");
    }
    // A block-aligned prompt (6 full blocks, nothing to copy), greedy.
    let aligned = &ids[..96];
    let greedy = |n: u64| json!({"model": "tiny", "prompt": aligned, "max_tokens": 8, "n": n, "temperature": 0});
    let (st, alone) = s.post("/v1/completions", &greedy(1));
    assert_eq!(st, 200, "{alone}");
    let (st, three) = s.post("/v1/completions", &greedy(3));
    assert_eq!(st, 200, "{three}");
    assert_eq!(texts(&three), vec![texts(&alone)[0].clone(); 3]);
    // Choices ending at different steps: the first ends early (on a stop
    // string from its own text above that some other choice's text lacks),
    // so the blocks it shares stay held, and reserved, by the others until
    // they end.
    let first: Vec<char> = all[0].chars().collect();
    let stop: String = first
        .windows(2)
        .map(|w| w.iter().collect::<String>())
        .find(|w| w.chars().all(|c| c.is_ascii_alphanumeric()) && all[1..].iter().any(|t| !t.contains(w.as_str())))
        .unwrap_or_else(|| panic!("no stop string in {:?}", all[0]));
    let mut stopping = req(&ids, 16, 11);
    stopping["stop"] = json!([stop]);
    let (st, b) = s.post("/v1/completions", &stopping);
    assert_eq!(st, 200, "{b}");
    let finish: Vec<&str> = {
        let mut cs: Vec<&Value> = b["choices"].as_array().unwrap().iter().collect();
        cs.sort_by_key(|c| c["index"].as_u64());
        cs.iter().map(|c| c["finish_reason"].as_str().unwrap()).collect()
    };
    assert_eq!(finish[0], "stop", "{b}");
    assert!(finish.contains(&"length"), "{b}");
    assert_eq!(s.metric("arqon_kv_cache_blocks_used"), 0.0);
    assert_eq!(s.metric("arqon_kv_cache_reserved_bytes"), 0.0);
    assert_still_serves(&s);
}

#[test]
fn greedy_sampled_and_logprob_rows_share_steps_and_answer_as_alone() {
    // A step's plain greedy rows leave it as their argmax only, sampled rows
    // with a top_k and no penalty as their top_k best candidates, rows at a
    // temperature (and min_p) alone as their weights and one chunk, the
    // others (logprobs, penalties, top_p) as logits: a step mixing them must
    // give each what it gets alone, and a row drawn from its candidates, its
    // chunk or its nucleus the token the whole row gives (kinds 6 and 7, 8
    // and 9, 10 and 11 differ only in asking logprobs, which takes the whole
    // row).
    let s = Arc::new(tiny(&[]));
    let kinds = [
        json!({"temperature": 0}),
        json!({"temperature": 0, "logprobs": 2}),
        json!({"temperature": 0.8, "seed": 3}),
        json!({"temperature": 0, "repetition_penalty": 1.3}),
        json!({"temperature": 0, "n": 2}),
        json!({"temperature": 0.8, "seed": 5, "n": 3}),
        json!({"temperature": 1.2, "top_k": 40, "top_p": 0.95, "seed": 11}),
        json!({"temperature": 1.2, "top_k": 40, "top_p": 0.95, "seed": 11, "logprobs": 1}),
        json!({"temperature": 0.9, "min_p": 0.05, "seed": 13}),
        json!({"temperature": 0.9, "min_p": 0.05, "seed": 13, "logprobs": 1}),
        json!({"temperature": 0.2, "top_p": 0.8, "seed": 19}),
        json!({"temperature": 0.2, "top_p": 0.8, "seed": 19, "logprobs": 1}),
    ];
    let body = |kind: &Value| {
        let mut b = json!({"model": "tiny", "prompt": "hello world", "max_tokens": 48, "ignore_eos": true});
        for (k, v) in kind.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // The text and, with logprobs, the tokens (the logprobs' values move in
    // the last float bits with the batch; the tokens must not).
    let answer = |b: &Value| -> Vec<Value> {
        let mut cs = b["choices"].as_array().unwrap().clone();
        cs.sort_by_key(|c| c["index"].as_u64());
        cs.iter().map(|c| json!([c["text"], c["logprobs"]["tokens"]])).collect()
    };
    let alone: Vec<Vec<Value>> = kinds
        .iter()
        .map(|k| {
            let (st, b) = s.post("/v1/completions", &body(k));
            assert_eq!(st, 200, "{b}");
            answer(&b)
        })
        .collect();
    assert_ne!(alone[0], alone[3], "the penalty changes the greedy text");
    assert_eq!(alone[6][0][0], alone[7][0][0], "drawn from the candidates or the whole row: one text");
    assert_ne!(alone[6][0][0], alone[0][0][0], "the sampled text is not the greedy one");
    let candidates = s.metric("arqon_logit_rows_total{taken=\"candidates\"}");
    assert!(candidates >= 48.0, "the top_k request's rows came as candidates: {candidates}");
    // Kinds 8 and 9 likewise: drawn from the row's weights and one chunk, or the whole row.
    assert_eq!(alone[8][0][0], alone[9][0][0], "drawn from weights and a chunk or the whole row: one text");
    let chunk = s.metric("arqon_logit_rows_total{taken=\"chunk\"}");
    assert!(chunk >= 2.0 * 48.0, "kinds 2 and 8 came as weights and a chunk: {chunk}");
    // And 10 and 11: a top-p nucleus from the row's weights and best candidates.
    assert_eq!(alone[10][0][0], alone[11][0][0], "drawn from a nucleus of candidates or the whole row: one text");
    let nucleus = s.metric("arqon_logit_rows_total{taken=\"nucleus\"}");
    assert!(nucleus >= 48.0, "kind 10 came as weights and candidates: {nucleus}");
    let bodies = (0..2 * kinds.len()).map(|i| body(&kinds[i % kinds.len()])).collect();
    for (i, (st, b)) in post_at_once(&s, bodies).into_iter().enumerate() {
        assert_eq!(st, 200, "{b}");
        assert_eq!(answer(&b), alone[i % kinds.len()], "kind {i}");
    }
}

/// A device lost mid-request (a fault the tests' debug build injects; an
/// illegal address on a GPU does the same): the request fails with an
/// OpenAI error, `/health` answers 503 with the reason, and the server drains
/// and exits with status 1 and the reason on stderr, for a supervisor to
/// restart it. A release build has no such fault and serves on.
#[test]
fn a_lost_device_fails_its_step_turns_health_503_and_exits_1() {
    let model = tiny_model();
    let args = ["--model", model.to_str().unwrap(), "--served-model-name", "tiny"];
    let mut s = Server::start_with_env(&args, &[("ARQON_TEST_FAULTS", "device-lost-at-step:3")]);
    assert_eq!(s.get("/health").0, 200);
    let (st, b) = s.post("/v1/completions", &completion(8));
    if !cfg!(debug_assertions) {
        assert_eq!(st, 200, "a release build injects nothing: {b}");
        assert_still_serves(&s);
        return;
    }
    assert_error(st, &b, 500, "server_error", None);
    assert!(b["error"]["message"].as_str().unwrap().contains("injected fault"), "{b}");
    // The step failed after the device was marked lost, so until the server
    // is gone /health says why (it may already be gone: the exit is checked
    // below either way).
    if let Ok(r) = s.try_request("GET", "/health", &[], None) {
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        let h = r.json();
        assert_eq!(h["status"], "device lost", "{h}");
        assert!(h["reason"].as_str().unwrap().contains("device-lost-at-step:3"), "{h}");
    }
    assert_eq!(s.wait_exit(Duration::from_secs(30)), Some(1), "stderr:\n{}", s.stderr());
    let err = s.stderr();
    assert!(err.contains("arqon: the device is lost (an injected fault"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("arqon: error: device cpu: lost: an injected fault")), "{err}");
}
