//! The variant catalog end to end: `arqon variants build` on the default
//! model (once per test binary, into a temporary folder), the quality proxy
//! of every format against the f32 reference, bitwise equality of the f32
//! artifact with the in-memory f32 model, the refusals serving depends on
//! (wrong hash, truncated artifact, wrong base model, unknown id, candidate
//! entry, other SKU) through the real binary, and `arqon bench variants` on a
//! catalog of a tiny model.

mod common;
mod server_support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arqon_runtime::model::gguf::GgufFile;
use arqon_runtime::model::{LogitsFor, SeqChunk};
use arqon_runtime::variants::quality::{DEFAULT_TARGET_TOKENS, QUALITY_FLOOR};
use arqon_runtime::variants::{self, build_variants, load_requantized, load_variant, BuildOptions};
use arqon_runtime::{Engine, ErrorKind};
use arqon_variants::{Catalog, Quantization, Sku, Status};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

const FORMATS: [Quantization; 5] =
    [Quantization::F32, Quantization::F16, Quantization::Bf16, Quantization::Q8_0, Quantization::Q4_0];

/// The default model's variants, built once per test binary into a fixed
/// folder under the target directory (replaced on each run: a static
/// temporary folder would never be deleted, and the artifacts weigh 1.3 GB).
fn built() -> &'static (PathBuf, Catalog) {
    static BUILT: OnceLock<(PathBuf, Catalog)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("variants-catalog");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let opts = BuildOptions {
            base: common::default_model().to_path_buf(),
            model_name: "smollm2-135m-instruct".into(),
            out: dir.clone(),
            formats: FORMATS.to_vec(),
            // As `arqon variants build` does, so the floor's measurement holds.
            target_tokens: DEFAULT_TARGET_TOKENS,
            floor: QUALITY_FLOOR,
        };
        let c = build_variants(&opts, &mut |m| eprintln!("{m}")).expect("build the variants");
        (dir, c)
    })
}

fn built_dir() -> &'static Path {
    &built().0
}

/// A scratch copy of the built catalog: its JSON, and hard links to the artifacts.
fn scratch() -> (tempfile::TempDir, Catalog) {
    let d = tempfile::tempdir().unwrap();
    let c = built().1.clone();
    for v in &c.variants {
        let (from, to) = (built_dir().join(&v.artifact.path), d.path().join(&v.artifact.path));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap(); // another filesystem
        }
    }
    c.save(d.path()).unwrap();
    (d, c)
}

fn check(dir: &Path, id: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["variants", "check", "--catalog", dir.to_str().unwrap(), "--id", id];
    args.extend_from_slice(extra);
    let o = common::arqon(&args);
    let (out, err) = common::texts(&o);
    (o.status.success(), out, err)
}

/// The binary's one-line error.
fn error_line(err: &str) -> &str {
    let line =
        err.lines().find(|l| l.starts_with("arqon: error: ")).unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert_eq!(err.lines().filter(|l| l.starts_with("arqon: error: ")).count(), 1, "{err}");
    line
}

#[test]
fn the_build_lists_every_format_and_the_shipped_base() {
    let c = &built().1;
    let ids: Vec<&str> = c.variants.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["q4_1", "f32", "f16", "bf16", "q8_0", "q4_0"]);
    assert_eq!(c.sku, Sku::detect_cpu());
    let base = c.get("q4_1").unwrap();
    assert_eq!(base.artifact.sha256, c.base.sha256, "the shipped base is an entry as it is");
    assert_eq!(c.default_variant.as_deref(), Some("q4_1"));
    // Artifacts are self-contained: the f32 file alone carries tokenizer,
    // chat template and the base's hash.
    let f = GgufFile::open(&built_dir().join("f32.gguf")).unwrap();
    assert_eq!(f.meta_str("arqon.base_sha256"), Some(c.base.sha256.as_str()));
    assert!(f.meta_str("tokenizer.chat_template").is_some());
    let f32_bytes = c.get("f32").unwrap().artifact.bytes;
    let q4_bytes = c.get("q4_0").unwrap().artifact.bytes;
    assert!(q4_bytes * 5 < f32_bytes, "q4_0 {q4_bytes} B vs f32 {f32_bytes} B");
    assert_eq!(Catalog::load(built_dir()).unwrap(), *c, "the saved catalog is what build returned");
    // Builds are deterministic: the same base and format give the same bytes.
    let again = tempfile::tempdir().unwrap();
    variants::write_artifact(
        common::default_model(),
        &c.base.sha256,
        Quantization::Q4_0,
        &again.path().join("q4_0.gguf"),
    )
    .unwrap();
    let a = arqon_variants::catalog::describe_artifact(again.path(), Path::new("q4_0.gguf")).unwrap();
    assert_eq!(a.sha256, c.get("q4_0").unwrap().artifact.sha256);
}

#[test]
fn quantized_variants_agree_with_the_reference_above_the_floor_or_stay_candidates() {
    let c = &built().1;
    let quality = |id: &str| c.get(id).unwrap().figures.as_ref().unwrap().quality.clone().unwrap();
    for v in &c.variants {
        let q = quality(&v.id);
        assert_eq!(q.reference, "f32");
        eprintln!("{}: agreement {:.3}, perplexity {:.2}, {:?}", v.id, q.top1_agreement, q.perplexity, v.status);
        assert!(q.perplexity.is_finite() && q.perplexity > 1.0 && q.perplexity < 100.0, "{}: {}", v.id, q.perplexity);
        assert!(v.memory_bytes > 0);
        // The status is exactly the floor's verdict.
        let want = if q.top1_agreement >= QUALITY_FLOOR { Status::Approved } else { Status::Candidate };
        assert_eq!(v.status, want, "{}", v.id);
    }
    // The formats the floor was set from pass it: the shipped base, 8 bits, half precision.
    for id in ["q4_1", "q8_0", "f16", "bf16"] {
        assert!(quality(id).top1_agreement >= QUALITY_FLOOR, "{id}: {:?}", quality(id));
    }
    assert!(quality("f32").top1_agreement >= 0.99, "the reference agrees with itself: {:?}", quality("f32"));
    // q4_0 re-quantized from the Q4_1 base loses more than the floor allows
    // (0.64 when measured): its perplexity shows the same loss.
    assert!(quality("q4_0").top1_agreement < quality("q8_0").top1_agreement);
    assert!(quality("q4_0").perplexity > quality("f32").perplexity);
    assert!(quality("f16").perplexity < quality("q4_0").perplexity);
}

#[test]
fn the_f32_artifact_equals_the_in_memory_f32_reference_bitwise() {
    let (c, dir) = (&built().1, built_dir());
    let from_disk = load_variant(c, dir, "f32").expect("serving loads the approved f32 entry");
    let in_memory = load_requantized(common::default_model(), Quantization::F32).unwrap();
    assert_eq!(from_disk.loaded.model.config(), in_memory.model.config());
    let logits = |loaded| {
        let mut e = Engine::new(loaded);
        let ids = e.encode_prompt("The quick brown fox jumps over the lazy dog. Then").unwrap();
        let s = e.add_sequence().unwrap();
        let t = e.step(&[SeqChunk { seq: s, tokens: &ids, adapter: None }], LogitsFor::AllPositions).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(from_disk.loaded), logits(in_memory));
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} logits differ", a.len());
}

#[test]
fn serving_checks_pass_for_an_approved_entry_through_the_binary() {
    let (ok, out, err) = check(built_dir(), "q8_0", &[]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["id"], "q8_0");
    assert_eq!(v["attn_q_format"], "Q8_0");
    assert_eq!(v["num_layers"], 30);
}

#[test]
fn an_unknown_id_is_a_clear_error() {
    let (ok, _, err) = check(built_dir(), "q3_z", &[]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("unknown variant \"q3_z\"") && line.contains("q4_1, f32, f16"), "{line}");
    let e = load_variant(&built().1, built_dir(), "q3_z").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Model);
}

#[test]
fn a_wrong_hash_is_refused_naming_file_and_hashes() {
    let (d, mut c) = scratch();
    let want = "ab".repeat(32);
    c.get_mut("q8_0").unwrap().artifact.sha256 = want.clone();
    c.save(d.path()).unwrap();
    let (ok, _, err) = check(d.path(), "q8_0", &[]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("q8_0.gguf")
            && line.contains(&want)
            && line.contains(&built().1.get("q8_0").unwrap().artifact.sha256),
        "{line}"
    );
}

#[test]
fn a_truncated_artifact_is_refused() {
    // q4_0 is a candidate: `--offline` gets past the status check to the artifact's.
    let (d, mut c) = scratch();
    let path = d.path().join("q4_0.gguf");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::remove_file(&path).unwrap(); // a hard link: do not write through it
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = check(d.path(), "q4_0", &["--offline"]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("q4_0.gguf") && line.contains("truncated"), "{line}");
    // Even with a catalog that describes the truncated file, loading fails cleanly.
    let e = c.get_mut("q4_0").unwrap();
    e.artifact = arqon_variants::catalog::describe_artifact(d.path(), Path::new("q4_0.gguf")).unwrap();
    c.save(d.path()).unwrap();
    let (ok, _, err) = check(d.path(), "q4_0", &["--offline"]);
    assert!(!ok);
    assert!(error_line(&err).contains("q4_0.gguf"), "{err}");
}

#[test]
fn an_artifact_of_another_base_is_refused() {
    let (d, mut c) = scratch();
    // A real artifact, but built from a base with another hash.
    let path = d.path().join("q4_0.gguf");
    std::fs::remove_file(&path).unwrap();
    variants::write_artifact(common::default_model(), &"cd".repeat(32), Quantization::Q4_0, &path).unwrap();
    c.get_mut("q4_0").unwrap().artifact =
        arqon_variants::catalog::describe_artifact(d.path(), Path::new("q4_0.gguf")).unwrap();
    // A tiny model that claims the right base: its configuration gives it away.
    let tiny = d.path().join("tiny.gguf");
    write_tiny_gguf(&tiny, Some(&c.base.sha256));
    let mut t = c.get("q8_0").unwrap().clone();
    t.id = "tiny".into();
    t.artifact = arqon_variants::catalog::describe_artifact(d.path(), Path::new("tiny.gguf")).unwrap();
    c.upsert(t);
    c.save(d.path()).unwrap();

    let (ok, _, err) = check(d.path(), "q4_0", &["--offline"]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("wrong base model") && line.contains(&"cd".repeat(32)), "{line}");
    let (ok, _, err) = check(d.path(), "tiny", &[]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("wrong base model") && line.contains("2 layers"), "{line}");
}

#[test]
fn candidates_and_other_skus_are_refused_for_serving_but_load_offline() {
    let (d, mut c) = scratch();
    c.get_mut("q4_0").unwrap().status = Status::Candidate;
    c.get_mut("q8_0").unwrap().sku = Sku::gpu("NVIDIA H100 80GB HBM3");
    c.save(d.path()).unwrap();
    let (ok, _, err) = check(d.path(), "q4_0", &[]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("\"q4_0\" refused") && line.contains("candidate"), "{line}");
    let (ok, _, err) = check(d.path(), "q8_0", &[]);
    assert!(!ok);
    assert!(error_line(&err).contains("NVIDIA H100 80GB HBM3"), "{err}");
    let (ok, _, err) = check(d.path(), "q4_0", &["--offline"]);
    assert!(ok, "{err}");
}

/// A 2-layer, hidden-64 Llama with the default model's tokenizer and random
/// weights (Q4_1, as the shipped base), for fast end-to-end runs.
fn write_tiny_gguf(path: &Path, base_sha256: Option<&str>) {
    let src = GgufFile::open(common::default_model()).unwrap();
    let (hidden, inter, heads, kv_heads, layers) = (64usize, 128usize, 4usize, 2usize, 2usize);
    let head_dim = hidden / heads;
    let mut meta: Vec<(String, Value)> = src
        .content()
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("llama.") && k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in [
        ("llama.embedding_length", hidden),
        ("llama.feed_forward_length", inter),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", kv_heads),
        ("llama.block_count", layers),
        ("llama.context_length", 512),
        ("llama.rope.dimension_count", head_dim),
    ] {
        meta.push((k.into(), Value::U32(v as u32)));
    }
    meta.push(("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)));
    meta.push(("llama.rope.freq_base".into(), Value::F32(10000.0)));
    if let Some(s) = base_sha256 {
        meta.push(("arqon.base_sha256".into(), Value::String(s.into())));
    }
    let vocab = src.content().tensor_infos["token_embd.weight"].shape.dims()[0];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut mat = |name: String, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-scale..scale)).collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        (name, QTensor::quantize(&t, GgmlDType::Q4_1).unwrap())
    };
    let ones = |name: String| {
        (
            name,
            QTensor::quantize(&Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32)
                .unwrap(),
        )
    };
    let mut tensors = vec![mat("token_embd.weight".into(), vocab, hidden, 0.5), ones("output_norm.weight".into())];
    for l in 0..layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push(ones(n("attn_norm")));
        tensors.push(ones(n("ffn_norm")));
        tensors.push(mat(n("attn_q"), heads * head_dim, hidden, 0.2));
        tensors.push(mat(n("attn_k"), kv_heads * head_dim, hidden, 0.2));
        tensors.push(mat(n("attn_v"), kv_heads * head_dim, hidden, 0.2));
        tensors.push(mat(n("attn_output"), hidden, heads * head_dim, 0.2));
        tensors.push(mat(n("ffn_gate"), inter, hidden, 0.2));
        tensors.push(mat(n("ffn_up"), inter, hidden, 0.2));
        tensors.push(mat(n("ffn_down"), hidden, inter, 0.2));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// `arqon variants build --formats FORMATS` on a tiny GGUF written into
/// `dir`: the GGUF, the catalog's folder, and the command's output.
fn build_tiny_catalog(dir: &Path, formats: &str) -> (PathBuf, PathBuf, std::process::Output) {
    let tiny = dir.join("tiny.gguf");
    write_tiny_gguf(&tiny, None);
    let cat = dir.join("catalog");
    let (model, out) = (tiny.to_str().unwrap(), cat.to_str().unwrap());
    let o = common::arqon(&[
        "variants",
        "build",
        "--model",
        model,
        "--out",
        out,
        "--formats",
        formats,
        "--target-tokens",
        "8",
    ]);
    (tiny, cat, o)
}

#[test]
fn bench_variants_writes_figures_a_csv_and_a_chart_naming_every_variant() {
    let d = tempfile::tempdir().unwrap();
    let (_, cat, o) = build_tiny_catalog(d.path(), "f32,q8_0");
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("q8_0") && out.contains("f32"), "{out}");
    // Random weights make quality meaningless here: approve both entries so
    // the bench measures them (serving only measures approved ones).
    let mut c = Catalog::load(&cat).unwrap();
    let ids: Vec<String> = c.variants.iter().map(|v| v.id.clone()).collect();
    assert_eq!(ids, ["q4_1", "f32", "q8_0"]);
    c.get_mut("q4_1").unwrap().status = Status::Retired;
    for id in ["f32", "q8_0"] {
        c.get_mut(id).unwrap().status = Status::Approved;
        c.get_mut(id).unwrap().figures = None;
    }
    c.save(&cat).unwrap();
    let report = d.path().join("report");
    let o = common::arqon(&[
        "bench",
        "variants",
        "--catalog",
        cat.to_str().unwrap(),
        "--batches",
        "1",
        "--out",
        report.to_str().unwrap(),
        "--prompt-tokens",
        "16,32",
        "--new-tokens",
        "8",
    ]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    let c = Catalog::load(&cat).unwrap();
    for id in ["f32", "q8_0"] {
        let f = c.get(id).unwrap().figures.as_ref().unwrap_or_else(|| panic!("{id} has no figures"));
        assert_eq!(f.speed.len(), 2, "one point per prompt length");
        for (p, n) in f.speed.iter().zip([16, 32]) {
            assert_eq!((p.batch, p.prompt_tokens), (1, Some(n)));
            assert!(p.prefill_tok_s > 0.0 && p.decode_tok_s > 0.0, "{id}: {:?}", f.speed);
        }
        assert!(f.quality.is_some());
        assert!(out.lines().any(|l| l.starts_with(id)), "table row for {id}: {out}");
    }
    assert!(c.get("q4_1").unwrap().figures.as_ref().unwrap().speed.is_empty(), "retired entries are not measured");
    let svg = std::fs::read_to_string(report.join("variants.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for id in ["f32", "q8_0"] {
        assert!(svg.contains(&format!(">{id}</text>")), "the chart labels {id}");
    }
    assert!(!svg.contains(">q4_1</text>"));
    let csv = std::fs::read_to_string(report.join("variants.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 2, "{csv}");
    let summary = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(summary.contains("prompt lengths [16, 32]") && summary.contains("decode@1/32"), "{summary}");
    assert!(csv.lines().skip(1).all(|l| l.split(',').nth(6).is_some_and(|n| n == "16" || n == "32")), "{csv}");
    assert!(out.contains("decode@1/16") && out.contains("decode@1/32"), "{out}");
}

/// `arqon bench kernels` on the tiny model's shapes, into a catalog; then
/// serving that catalog runs the stored plan, `--kernel-plan` overrides it,
/// and every CPU path gives the same greedy text (they give the same bits).
#[test]
fn bench_kernels_stores_a_plan_that_serving_runs_and_the_flag_overrides() {
    use arqon_kernels::quant::Path as SimdPath;
    use arqon_kernels::KernelPlan;

    let d = tempfile::tempdir().unwrap();
    let (tiny, cat, o) = build_tiny_catalog(d.path(), "f32");
    assert!(o.status.success(), "{}", common::texts(&o).1);
    // Serve the shipped Q4_1 file (our CPU matmul kernels run it).
    let mut c = Catalog::load(&cat).unwrap();
    c.get_mut("q4_1").unwrap().status = Status::Approved;
    c.default_variant = Some("q4_1".into());
    c.save(&cat).unwrap();

    let report = d.path().join("report");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "kernels",
            "--device",
            "cpu",
            "--model",
            tiny.to_str().unwrap(),
            "--batches",
            "1,4",
            "--min-ms",
            "0",
            "--out",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        common::arqon(&args)
    };
    let o = bench(&["--catalog", cat.to_str().unwrap()]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    // The tiny model's heads (16 wide) do not fit the paged op: `attention` stays as it was.
    assert!(err.contains("the paged op does not take head_dim 16"), "{err}");
    let plan: KernelPlan = out.trim().parse().unwrap_or_else(|e| panic!("stdout {out:?} is not a plan: {e}"));
    let path = plan.quant_matmul.path().expect("the bench names a concrete path");
    assert!(path.supported() && path != SimdPath::Scalar, "{plan}");
    let sku = Sku::detect_cpu();
    let stored = Catalog::load(&cat).unwrap();
    assert_eq!(stored.kernel_plan_for(&sku), Some(plan), "the catalog holds the plan for {sku}");
    assert_eq!(stored.variants, c.variants, "the entries are unchanged");
    // The report: one CSV row per path, matrix and batch, each timed.
    let csv = std::fs::read_to_string(report.join("kernels.csv")).unwrap();
    let paths = SimdPath::available().into_iter().filter(|p| *p != SimdPath::Scalar).count().max(1);
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 5 * 2 * paths, "{csv}");
    for r in &rows {
        let f: Vec<&str> = r.split(',').collect();
        assert_eq!(f[1], "quant_matmul", "{r}");
        assert!(f[5].parse::<f64>().is_ok_and(|us| us > 0.0), "{r}");
    }
    let summary = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(summary.contains(&format!("Plan: `{plan}`")) && summary.contains("| quant_matmul |"), "{summary}");
    let svg = std::fs::read_to_string(report.join("kernels.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains(">quant_matmul</text>"));
    assert_eq!(std::fs::read_to_string(report.join("plan.txt")).unwrap().trim(), plan.to_string());

    // Bad flags are one-line errors.
    for (extra, says) in [(&["--batches", "0"][..], "--batches"), (&["--min-ms=-1"][..], "--min-ms")] {
        let o = bench(extra);
        assert!(!o.status.success());
        assert!(common::texts(&o).1.contains(says), "{}", common::texts(&o).1);
    }

    let served = |extra: &[&str]| {
        let mut args = vec!["--catalog", cat.to_str().unwrap(), "--served-model-name", "tiny"];
        args.extend_from_slice(extra);
        let s = server_support::Server::start(&args);
        let body = serde_json::json!({"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        let (_, metrics) = s.get("/metrics");
        let info = metrics.lines().find(|l| l.starts_with("arqon_kernel_plan_info{")).map(str::to_string);
        (v["choices"][0]["text"].as_str().unwrap().to_string(), info.unwrap_or_else(|| panic!("no plan in {metrics}")))
    };
    let (from_catalog, info) = served(&[]);
    assert_eq!(info, format!("arqon_kernel_plan_info{{plan=\"{plan}\",source=\"catalog\"}} 1"));
    let (scalar, info) = served(&["--kernel-plan", "quant_matmul=scalar"]);
    assert!(info.contains("quant_matmul=scalar") && info.contains("source=\"flag\""), "{info}");
    assert_eq!(scalar, from_catalog, "the scalar path gives the same bits");

    // A plan this CPU cannot run: from the flag, an error before listening;
    // from the catalog, a warning, and the built-in choices serve.
    if let Some(missing) = SimdPath::ALL.into_iter().find(|p| !p.supported()) {
        let bad = format!("quant_matmul={}", missing.name());
        let o = common::arqon(&["serve", "--catalog", cat.to_str().unwrap(), "--port", "0", "--kernel-plan", &bad]);
        assert!(!o.status.success());
        assert!(common::texts(&o).1.contains("cannot run"), "{}", common::texts(&o).1);
        let mut c = Catalog::load(&cat).unwrap();
        c.kernel_plans.insert(sku.as_str().into(), bad);
        c.save(&cat).unwrap();
        let s = server_support::Server::start(&["--catalog", cat.to_str().unwrap()]);
        assert!(s.stderr().contains("cannot run here"), "{}", s.stderr());
        let (_, metrics) = s.get("/metrics");
        assert!(metrics.contains("source=\"default\""), "{metrics}");
    }
    let o = common::arqon(&["serve", "--port", "0", "--kernel-plan", "quant_matmul=fastest"]);
    assert!(!o.status.success());
    let err = common::texts(&o).1;
    assert!(err.contains("--kernel-plan") && err.lines().count() == 1, "{err}");
}

/// The plan's `attention` is chosen on whole greedy decode steps of the
/// model (the default one: its 64-wide heads fit the paged op), and serving
/// with `attention=paged` answers what the native attention answers; its
/// `sampling` on picks over logits of the model's vocabulary.
#[test]
fn bench_kernels_chooses_attention_on_decode_steps_and_serving_runs_it() {
    use arqon_kernels::plan::{AttentionVariant, DecodeVariant, SamplingVariant};
    use arqon_kernels::KernelPlan;

    let d = tempfile::tempdir().unwrap();
    let model = common::default_model().to_str().unwrap();
    let o = common::arqon(&[
        "bench",
        "kernels",
        "--device",
        "cpu",
        "--model",
        model,
        "--batches",
        "1",
        "--min-ms",
        "0",
        "--attention-batches",
        "1,3",
        "--attention-prompt",
        "12",
        "--attention-new-tokens",
        "6",
        "--out",
        d.path().to_str().unwrap(),
    ]);
    let (out, err) = common::texts(&o);
    assert!(o.status.success(), "{err}");
    let plan: KernelPlan = out.trim().parse().unwrap();
    let csv = std::fs::read_to_string(d.path().join("attention.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect();
    assert_eq!(rows.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(), ["1", "3"], "{csv}");
    // The op and the native kernel give the same greedy tokens.
    assert!(rows.iter().all(|r| r[5] == "\"yes\""), "{csv}");
    let speed = |r: &[String], i: usize| r[i].parse::<f64>().unwrap();
    assert!(rows.iter().all(|r| speed(r, 2) > 0.0 && speed(r, 3) > 0.0), "{csv}");
    let geo = (rows.iter().map(|r| r[4].parse::<f64>().unwrap().ln()).sum::<f64>() / rows.len() as f64).exp();
    // `decode`: the paged op's steps on fixed buffers (eager on the CPU)
    // give the same tokens; graphs are chosen over the chosen attention's
    // eager steps by their ratio, and decode on the paged op.
    assert!(rows.iter().all(|r| r[8] == "\"yes\"" && speed(r, 6) > 0.0), "{csv}");
    let eager = if geo > 1.0 { 3 } else { 2 };
    let graph_geo = (rows.iter().map(|r| (speed(r, 6) / speed(r, eager)).ln()).sum::<f64>() / rows.len() as f64).exp();
    let want = if graph_geo > 1.0 { DecodeVariant::Graph } else { DecodeVariant::Eager };
    assert_eq!(plan.decode, want, "the plan follows the measured ratio {graph_geo}: {csv}");
    let want = if geo > 1.0 || plan.decode == DecodeVariant::Graph {
        AttentionVariant::Paged
    } else {
        AttentionVariant::Native
    };
    assert_eq!(plan.attention, want, "the plan follows the measured ratio {geo}: {csv}");
    let summary = std::fs::read_to_string(d.path().join("summary.md")).unwrap();
    assert!(summary.contains(&format!("`attention={}`, `decode={}`", plan.attention, plan.decode)), "{summary}");
    // `sampling`: the picks made where the logits are equal the host's, and
    // the choice follows their time ratio.
    let csv = std::fs::read_to_string(d.path().join("sampling.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect();
    assert_eq!(rows.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(), ["1", "3"], "{csv}");
    assert!(rows.iter().all(|r| r[2] == "40" && r[6] == "\"yes\""), "{csv}");
    assert!(rows.iter().all(|r| speed(r, 3) > 0.0 && speed(r, 4) > 0.0), "{csv}");
    let geo = (rows.iter().map(|r| r[5].parse::<f64>().unwrap().ln()).sum::<f64>() / rows.len() as f64).exp();
    let want = if geo > 1.0 { SamplingVariant::Device } else { SamplingVariant::Host };
    assert_eq!(plan.sampling, want, "the plan follows the measured ratio {geo}: {csv}");
    assert!(summary.contains(&format!("`sampling={}`", plan.sampling)), "{summary}");

    let start = |extra: &[&str]| {
        let mut args = vec!["--model", model, "--served-model-name", "m"];
        args.extend_from_slice(extra);
        server_support::Server::start(&args)
    };
    let complete = |s: &server_support::Server| {
        let body =
            serde_json::json!({"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let native = complete(&start(&[]));
    assert_eq!(complete(&start(&["--kernel-plan", "attention=paged"])), native);
    // With `decode=graph` the server's decode steps run on fixed buffers (on
    // the CPU eagerly, as a GPU's first step of a shape does): same text.
    let graphed = ["--kernel-plan", "attention=paged;decode=graph"];
    let s = start(&graphed);
    assert_eq!(complete(&s), native);
    assert!(s.metric("arqon_engine_steps_total{path=\"fixed\"}") >= 7.0, "seven decode steps after the prompt's");
    assert_eq!(s.metric("arqon_engine_steps_total{path=\"graph\"}"), 0.0, "nothing to replay on the CPU");
    assert!(s.metric("arqon_engine_steps_total{path=\"eager\"}") >= 1.0, "the prompt");
    drop(s);
    // A bf16 KV cache (tensor pools, so the paged op): half the bytes per
    // block, the same greedy text here; host pools refuse one (a one-line
    // error, a non-zero exit).
    let s = start(&[&graphed[..], &["--kv-cache-dtype", "bf16", "--kv-cache-mb", "16"]].concat());
    assert_eq!(complete(&s), native);
    assert!(s.stderr().contains("MiB of bf16"), "{}", s.stderr());
    // SmolLM2-135M: 30 layers, 3 KV heads of 64, 16-token blocks; 2 bytes
    // each. The tensor pools' room for 128 rows of 9 query heads comes first.
    let room = 30 * 128 * 9 * 64 * 2;
    assert_eq!(s.metric("arqon_kv_cache_blocks_total"), (((16u64 << 20) - room) / (2 * 30 * 3 * 16 * 64 * 2)) as f64);
    assert!(s.stderr().contains(&format!("{} KiB of it room for a step's queries", room / 1024)), "{}", s.stderr());
    let o = common::arqon(&["serve", "--model", model, "--port", "0", "--kv-cache-dtype", "bf16"]);
    assert!(!o.status.success());
    let err = common::texts(&o).1;
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("arqon: error:")).collect();
    assert!(errors.len() == 1 && errors[0].contains("--kv-cache-dtype bf16"), "{err}");
}

/// `--kernel-plan dense_gemv=…` names our dense GEMV for decode steps'
/// products by dense matrices, the MLP's activation fused into the down
/// product (here the dense tiny model's f32 matrices, on the CPU the
/// kernel's reference): the greedy text is candle's, batched rows too, and
/// the plan is what the metrics report; a variant that does not exist is a
/// one-line error.
#[test]
fn serving_on_our_dense_gemv_answers_what_candle_s_matmul_answers() {
    let tiny = common::tests_dir().join("fixtures/tiny-llama");
    let serve = |extra: &[&str]| {
        let mut args = vec!["--model", tiny.to_str().unwrap(), "--served-model-name", "tiny"];
        args.extend_from_slice(extra);
        server_support::Server::start(&args)
    };
    let complete = |s: &server_support::Server, n: usize| {
        let prompts = &["The capital of France is", "Once upon"][..n];
        let body = serde_json::json!({"model": "tiny", "prompt": prompts, "max_tokens": 12, "temperature": 0});
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        let mut texts: Vec<(u64, String)> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap().to_string()))
            .collect();
        texts.sort();
        texts
    };
    let native = serve(&[]);
    let (one, two) = (complete(&native, 1), complete(&native, 2));
    drop(native);
    for variant in ["warp_per_row", "warp_per_row_x4"] {
        let s = serve(&["--kernel-plan", &format!("dense_gemv={variant}")]);
        assert_eq!(complete(&s, 1), one, "{variant}");
        assert_eq!(complete(&s, 2), two, "{variant}: two sequences, two rows a step");
        let (_, metrics) = s.get("/metrics");
        assert!(metrics.contains(&format!("dense_gemv={variant};")), "{metrics}");
    }
    let o =
        common::arqon(&["serve", "--model", tiny.to_str().unwrap(), "--port", "0", "--kernel-plan", "dense_gemv=fast"]);
    assert!(!o.status.success());
    let err = common::texts(&o).1;
    assert!(err.contains("DenseGemvVariant `fast`") && err.lines().count() == 1, "{err}");
}
