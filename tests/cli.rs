//! The `arqon` binary as a user runs it.

mod common;

use serde_json::Value;

fn model() -> &'static str {
    common::default_model().to_str().unwrap()
}

#[test]
fn help_explains_every_command() {
    let (out, _) = common::texts(&common::arqon(&["--help"]));
    for cmd in ["generate", "fetch", "inspect"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (out, _) = common::texts(&common::arqon(&["generate", "--help"]));
    for flag in ["--prompt", "--chat", "--max-tokens", "--temperature", "--top-p", "--seed", "--model", "--json"] {
        assert!(out.contains(flag), "generate --help lacks {flag}:\n{out}");
    }
}

#[test]
fn generate_json_is_llamacpps_greedy_continuation() {
    let o = common::arqon(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "32",
        "--json",
        "--model",
        model(),
    ]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<u64> = v["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    // Our engine's own greedy continuation, through the library.
    let mut e = common::default_engine();
    let prompt = e.encode_prompt("The capital of France is").unwrap();
    let alone = e.generate(arqon_runtime::GenerateRequest::greedy(prompt, 32), &mut |_| {}).unwrap();
    assert_eq!(ids, alone.token_ids.iter().map(|t| *t as u64).collect::<Vec<_>>());
    // And llama.cpp's greedy ids on the same file (shared/fixtures, prompt
    // plain_capital) up to its first near-tie, where rounding may flip the
    // pick (see tests/reference_llamacpp.rs: at step 14, margin 0.19).
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(common::shared_fixture("llamacpp_greedy.json")).unwrap())
            .unwrap();
    let f = fx["fixtures"].as_array().unwrap().iter().find(|f| f["name"] == "plain_capital").unwrap();
    let theirs: Vec<u64> =
        f["raw_generate_ids_no_eos_stop"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let near_tie = f["top5_logits_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .position(|s| s[0][1].as_f64().unwrap() - s[1][1].as_f64().unwrap() < 0.25)
        .unwrap_or(theirs.len());
    assert!(near_tie >= 10, "the fixture's first near-tie moved: step {near_tie}");
    assert_eq!(ids[..near_tie], theirs[..near_tie]);
    assert_eq!(v["prompt_token_ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert!(v["text"].as_str().unwrap().starts_with(" Paris.\n\nThe United States"));
    assert_eq!(v["finish_reason"], "length");
    for k in ["prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s"] {
        assert!(v["timings"][k].as_f64().unwrap() > 0.0, "{k}");
    }
}

#[test]
fn streamed_stdout_equals_json_text_and_speeds_go_to_stderr() {
    let args = ["generate", "--prompt", "Once upon a time", "--max-tokens", "16", "--model", model()];
    let (streamed, err) = common::texts(&common::arqon(&args));
    assert!(err.contains("tokens/s"), "{err}");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let (out, _) = common::texts(&common::arqon(&json_args));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(streamed, format!("{}\n", v["text"].as_str().unwrap()));
}

#[test]
fn chat_and_seeded_sampling() {
    let run = |seed: &str| {
        let o = common::arqon(&[
            "generate",
            "--chat",
            "--prompt",
            "Name a colour.",
            "--temperature",
            "0.9",
            "--seed",
            seed,
            "--max-tokens",
            "12",
            "--json",
            "--model",
            model(),
        ]);
        assert!(o.status.success());
        let v: Value = serde_json::from_str(common::texts(&o).0.trim()).unwrap();
        v["token_ids"].clone()
    };
    assert_eq!(run("42"), run("42"));
    let o = common::arqon(&["generate", "--chat", "--prompt", "Hi", "--max-tokens", "4", "--json", "--model", model()]);
    let v: Value = serde_json::from_str(common::texts(&o).0.trim()).unwrap();
    // The chat template opens with SmolLM's system turn, token 1 is <|im_start|>.
    assert_eq!(v["prompt_token_ids"][0], 1);
}

#[test]
fn fetch_prints_the_cached_path() {
    let o = common::arqon(&["fetch"]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(std::path::Path::new(out.trim()), common::default_model());
}

fn tiny() -> String {
    common::tests_dir().join("fixtures/tiny-llama").to_str().unwrap().to_string()
}

#[test]
fn device_cpu_by_flag_or_env_and_auto_without_a_gpu() {
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_arqon"));
        c.args(args).env_remove("ARQON_DEVICE");
        if let Some(d) = env {
            c.env("ARQON_DEVICE", d);
        }
        c.output().expect("run arqon")
    };
    let tiny = tiny();
    for (args, env) in [
        (vec!["inspect", "--model", &tiny, "--device", "cpu"], None),
        (vec!["inspect", "--model", &tiny], Some("cpu")),
        (vec!["inspect", "--model", &tiny, "--device", "auto"], None),
    ] {
        let o = run(&args, env);
        let (out, err) = common::texts(&o);
        assert!(o.status.success(), "{args:?} {env:?}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        // `auto` is the CPU unless this build has CUDA and a GPU opens.
        if !cfg!(feature = "cuda") || env.is_some() || args.contains(&"cpu") {
            assert_eq!(v["device"], "cpu", "{args:?} {env:?}");
        }
    }
    // A device that is not one is a usage error naming the accepted spellings.
    let o = run(&["inspect", "--model", &tiny, "--device", "gpu"], None);
    let (_, err) = common::texts(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_build_without_it_is_one_error_line() {
    let tiny = tiny();
    for args in [
        vec!["generate", "--prompt", "Hi", "--model", &tiny, "--device", "cuda"],
        vec!["inspect", "--model", &tiny, "--device", "cuda:1"],
        // serve refuses before it binds: no "listening" line.
        vec!["serve", "--model", &tiny, "--port", "0", "--device", "cuda"],
    ] {
        let o = common::arqon(&args);
        let (out, err) = common::texts(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("arqon: error: device cuda:"), "{err}");
        assert!(lines[0].contains("built without CUDA support"), "{err}");
    }
}
