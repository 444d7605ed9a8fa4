//! Bad input gets a clear error naming what is wrong, never a panic: through
//! the library (typed errors) and through the real binary (one line on
//! stderr, non-zero exit).

mod common;

use std::path::{Path, PathBuf};

use arqon_runtime::{engine, Engine, Error, GenerateRequest};
use candle_core::quantized::gguf_file;

fn tiny_copy(dir: &Path) -> PathBuf {
    let src = common::tests_dir().join("fixtures/tiny-llama");
    let dst = dir.join("tiny");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

fn load_err(path: &Path) -> Error {
    engine::load(path).expect_err("loading should fail")
}

/// Runs `arqon generate` and checks it failed with one clear line.
fn cli_error(args: &[&str]) -> String {
    let out = common::arqon(args);
    let (_, stderr) = common::texts(&out);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("arqon: error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
    lines[0].to_string()
}

#[test]
fn corrupt_gguf_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad_magic = dir.path().join("bad-magic.gguf");
    std::fs::write(&bad_magic, b"NOPE this is not a model").unwrap();
    let e = load_err(&bad_magic).to_string();
    assert!(e.contains("bad-magic.gguf") && e.contains("not a valid GGUF"), "{e}");

    // A valid magic and version followed by absurd counts.
    let lying = dir.path().join("lying.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    std::fs::write(&lying, bytes).unwrap();
    let e = load_err(&lying).to_string();
    assert!(e.contains("lying.gguf"), "{e}");

    let line = cli_error(&["generate", "--prompt", "hi", "--model", lying.to_str().unwrap()]);
    assert!(line.contains("lying.gguf"), "{line}");
}

#[test]
fn truncated_gguf_names_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(common::default_model()).unwrap();
    let cut = dir.path().join("half.gguf");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = load_err(&cut).to_string();
    assert!(e.contains("half.gguf") && e.contains("tensor"), "{e}");
}

#[test]
fn gguf_of_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    drop(f);
    match load_err(&path) {
        Error::UnsupportedArchitecture { arch, .. } => assert_eq!(arch, "gpt2"),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_copy(dir.path());
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(&m).to_string();
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_copy(dir.path());
    let st = m.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&tensors, &st).unwrap();
    match load_err(&m) {
        Error::MissingTensor { name, .. } => assert_eq!(name, "model.layers.1.mlp.up_proj.weight"),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn config_of_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_copy(dir.path());
    let cfg = m.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(&m);
    assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e}");
    assert!(e.to_string().contains("gpt_neox"), "{e}");
    let line = cli_error(&["generate", "--prompt", "hi", "--model", m.to_str().unwrap()]);
    assert!(line.contains("unsupported architecture"), "{line}");
}

#[test]
fn inconsistent_shapes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_copy(dir.path());
    let cfg = m.join("config.json");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(&cfg, text).unwrap();
    match load_err(&m) {
        Error::TensorShape { name, got, expected, .. } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!((got, expected), (vec![128, 64], vec![96, 64]));
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn empty_prompt_and_bad_sampling_are_request_errors() {
    let mut e = Engine::new(engine::load(&common::tests_dir().join("fixtures/tiny-llama")).unwrap());
    let err = e.generate(GenerateRequest::greedy(vec![], 4), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)) && err.to_string().contains("empty"), "{err}");
    let line = cli_error(&["generate", "--prompt", ""]);
    assert!(line.contains("empty"), "{line}");
    let line = cli_error(&["generate", "--prompt", "hi", "--temperature=-1"]);
    assert!(line.contains("temperature"), "{line}");
    assert_eq!(e.kv().num_sequences(), 0, "a refused request holds no cache");
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let mut e = Engine::new(engine::load(&common::tests_dir().join("fixtures/tiny-llama")).unwrap());
    let ctx = e.context_len();
    let err = e.generate(GenerateRequest::greedy(vec![5; ctx + 1], 1), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { context, .. } if context == ctx), "{err}");
    let err = e.generate(GenerateRequest::greedy(vec![5; ctx - 3], 4), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { .. }), "prompt + max_tokens over context: {err}");
    // Exactly at the limit is fine.
    let g = e.generate(GenerateRequest::greedy(vec![5; ctx - 4], 4), &mut |_| {}).unwrap();
    assert_eq!(g.token_ids.len(), 4);

    let model = common::default_model().to_str().unwrap();
    let line = cli_error(&["generate", "--prompt", "hi", "--max-tokens", "9000", "--model", model]);
    assert!(line.contains("exceeds the context length of 8192"), "{line}");
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let mut e = Engine::new(engine::load(&common::tests_dir().join("fixtures/tiny-llama")).unwrap());
    let err = e.generate(GenerateRequest::greedy(vec![1, 100_000], 2), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(e.kv().num_sequences(), 0);
}

#[test]
fn unknown_model_name_lists_known_ones() {
    let line = cli_error(&["generate", "--prompt", "hi", "--model", "no-such-model-xyz"]);
    assert!(line.contains("smollm2-135m-instruct"), "{line}");
}
