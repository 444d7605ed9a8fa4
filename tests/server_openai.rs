//! The official OpenAI Python SDK against `arqon serve` on the default model:
//! completion and chat, streaming and not, `n = 2`, stop strings, logprobs,
//! seeds, `/v1/models` and SDK error types. Outputs equal the engine's greedy
//! output for the same prompt, computed in-process.
//!
//! Set-up: `pip install --target target/openai-sdk-py openai==…` once, into a
//! temporary folder renamed into place (atomic, so concurrent test binaries
//! and interrupted installs are safe); later runs reuse it.

mod common;
mod server_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use arqon_runtime::chat::Message;
use arqon_runtime::GenerateRequest;
use serde_json::{json, Value};
use server_support::Server;

const OPENAI_SDK: &str = "openai==3.54.0";

/// A folder holding the `openai` package, for `PYTHONPATH`.
fn openai_sdk() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = target.join("openai-sdk-py");
    if dir.join("openai").is_dir() {
        return dir;
    }
    let tmp = target.join(format!("openai-sdk-py.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let st = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts", "--no-input"])
        .args(["--root-user-action", "ignore", "--target"])
        .arg(&tmp)
        .arg(OPENAI_SDK)
        .status()
        .expect("run python3 -m pip (the SDK test needs python3 with pip)");
    assert!(st.success(), "pip install {OPENAI_SDK} failed");
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test binary won the race; use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("openai").is_dir());
    dir
}

#[test]
fn the_openai_python_sdk_gets_the_engines_greedy_output() {
    let sdk = openai_sdk();
    let prompt = "The capital of France is";
    let question = "What is the capital of France?";
    let n = 12;

    // The reference: the engine alone, in-process.
    let mut e = common::default_engine();
    let prompt_ids = e.encode_prompt(prompt).unwrap();
    let chat_ids = e.encode_chat(&[Message::new("user", question)]).unwrap();
    let completion = e.generate(GenerateRequest::greedy(prompt_ids.clone(), n), &mut |_| {}).unwrap();
    let chat = e.generate(GenerateRequest::greedy(chat_ids.clone(), n), &mut |_| {}).unwrap();
    // A stop string from the middle of the greedy completion.
    let words: Vec<&str> = completion.text.split_whitespace().collect();
    let stop = words.get(words.len() / 2).copied().unwrap_or("the").to_string();
    let stopped = e
        .generate(
            GenerateRequest { stop: vec![stop.clone()], ..GenerateRequest::greedy(prompt_ids.clone(), n) },
            &mut |_| {},
        )
        .unwrap();
    let first4 = e.generate(GenerateRequest::greedy(prompt_ids.clone(), 4), &mut |_| {}).unwrap();
    let chat4 = e.generate(GenerateRequest::greedy(chat_ids.clone(), 4), &mut |_| {}).unwrap();
    drop(e);

    let model = common::default_model();
    let s = Server::start(&["--model", model.to_str().unwrap(), "--served-model-name", "smollm2"]);
    let cfg = json!({"prompt": prompt, "question": question, "max_tokens": n, "stop": [stop]});
    let script = common::tests_dir().join("openai_sdk/check.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", s.addr))
        .arg("smollm2")
        .arg(cfg.to_string())
        .env("PYTHONPATH", &sdk)
        .output()
        .expect("run the SDK script");
    let (stdout, stderr) = common::texts(&o);
    assert!(o.status.success(), "SDK script failed:\n{stderr}\nserver:\n{}", s.stderr());
    let out: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    let finish = |g: &arqon_runtime::Generation| format!("{:?}", g.finish_reason).to_lowercase();
    let usage = |p: usize, c: usize| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    for key in ["completion", "completion_stream"] {
        assert_eq!(out[key]["text"], completion.text, "{key}");
        assert_eq!(out[key]["finish_reason"], finish(&completion), "{key}");
        assert_eq!(out[key]["usage"], usage(prompt_ids.len(), completion.token_ids.len()), "{key}");
    }
    for key in ["chat", "chat_stream"] {
        assert_eq!(out[key]["text"], chat.text, "{key}");
        assert_eq!(out[key]["finish_reason"], finish(&chat), "{key}");
        assert_eq!(out[key]["usage"], usage(chat_ids.len(), chat.token_ids.len()), "{key}");
    }
    assert_eq!(out["chat"]["role"], "assistant");
    assert_eq!(out["chat_n2"]["texts"], json!([chat.text, chat.text]));
    assert_eq!(out["chat_n2"]["usage"], usage(chat_ids.len(), 2 * chat.token_ids.len()));
    assert_eq!(out["completion_stop"]["text"], stopped.text);
    assert_eq!(out["completion_stop"]["finish_reason"], "stop");

    // Logprobs: the greedy token is the most likely one, log-probabilities are <= 0.
    let lp = &out["chat_logprobs"];
    assert_eq!(lp["text"], chat4.text);
    let content = lp["content"].as_array().unwrap();
    assert_eq!(content.len(), chat4.token_ids.len());
    for t in content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
        assert_eq!(t["top"][0], t["token"], "{t}");
        assert_eq!(t["top"].as_array().unwrap().len(), 2);
    }
    let lp = &out["completion_logprobs"];
    assert_eq!(lp["text"], first4.text);
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), first4.text);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);

    assert_eq!(out["seeded_same"], true, "same seed, same sampled text");
    assert_eq!(out["top_k_candidates_same_as_row"], true, "top_k drawn from candidates or the row: one text");
    assert!(!out["top_k_text"].as_str().unwrap().is_empty());
    assert_eq!(out["temperature_chunk_same_as_row"], true, "a chunked draw or the row's: one text");
    assert_eq!(out["top_p_nucleus_same_as_row"], true, "a nucleus of candidates or the row's: one text");
    assert_eq!(out["models"], json!(["smollm2"]));
    assert_eq!(out["not_found"], json!({"status": 404, "code": "model_not_found"}));
    assert_eq!(out["too_long"], json!({"status": 400, "code": "context_length_exceeded"}));
}
