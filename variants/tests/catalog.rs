//! The catalog format: round trips, invariants, artifact checks, and the
//! committed JSON Schema describing every field.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use arqon_variants::catalog::{describe_artifact, SCHEMA};
use arqon_variants::{
    verify_artifact, AdapterRef, Artifact, BaseModel, Catalog, CatalogError, DepthProfile, Figures, KernelPlan,
    Quality, Quantization, Sku, SpeedPoint, Status, VariantEntry,
};

const BASE_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn entry(id: &str, q: Quantization, status: Status, sku: &Sku) -> VariantEntry {
    VariantEntry {
        id: id.into(),
        base_sha256: BASE_SHA.into(),
        artifact: Artifact { path: PathBuf::from(format!("{id}.gguf")), sha256: "00".repeat(32), bytes: 7 },
        quantization: q,
        depth: DepthProfile::Full,
        adapters: Vec::new(),
        kernel_plan: KernelPlan::cpu_for(q),
        sku: sku.clone(),
        status,
        memory_bytes: 1 << 20,
        figures: None,
    }
}

/// An example that uses every field, optional ones included.
fn example() -> Catalog {
    let sku = Sku::new("cpu-x86_64-avx2");
    let base = BaseModel {
        name: "smollm2-135m-instruct".into(),
        file: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        sha256: BASE_SHA.into(),
    };
    let mut c = Catalog::new(sku.clone(), base);
    let mut a = entry("q4_1", Quantization::Q4_1, Status::Approved, &sku);
    a.depth = DepthProfile::Static { layers: 24 };
    a.adapters = vec![AdapterRef { name: "chat".into(), path: "chat.lora".into(), sha256: "11".repeat(32) }];
    a.figures = Some(Figures {
        measured_at: "2026-12-01T06:00:00Z".into(),
        speed: vec![SpeedPoint { batch: 1, prompt_tokens: Some(128), prefill_tok_s: 900.0, decode_tok_s: 60.5 }],
        quality: Some(Quality { reference: "f32".into(), top1_agreement: 0.97, perplexity: 12.5 }),
    });
    c.variants.push(a);
    c.variants.push(entry("f32", Quantization::F32, Status::Candidate, &sku));
    c.variants.push(entry("h100", Quantization::F16, Status::Approved, &Sku::gpu("NVIDIA H100 80GB HBM3")));
    c.default_variant = Some("q4_1".into());
    c.kernel_plans.insert(sku.as_str().into(), "quant_matmul=avx2".into());
    c.kernel_plans.insert("NVIDIA H100 80GB HBM3".into(), "paged_attention=split_k:512;rms_norm=block_per_row".into());
    c
}

#[test]
fn an_example_catalog_round_trips_through_an_atomic_save() {
    let dir = tempfile::tempdir().unwrap();
    let c = example();
    c.save(dir.path()).unwrap();
    let back = Catalog::load(dir.path()).unwrap();
    let plan = back.kernel_plan_for(&Sku::gpu("NVIDIA H100 80GB HBM3")).unwrap();
    assert_eq!(plan.to_string().parse::<arqon_kernels::KernelPlan>().unwrap(), plan);
    assert_eq!(plan.rms_norm, arqon_kernels::plan::RmsNormVariant::BlockPerRow);
    assert!(back.kernel_plan_for(&Sku::new("cpu-aarch64-neon")).is_none());
    assert_eq!(back, c);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("catalog.json")], "no temporary file is left behind");
}

#[test]
fn serving_sees_only_approved_entries_of_its_sku() {
    let c = example();
    let ids: Vec<&str> = c.approved_for(&Sku::new("cpu-x86_64-avx2")).map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["q4_1"]);
    let ids: Vec<&str> = c.approved_for(&Sku::gpu("NVIDIA H100 80GB HBM3")).map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["h100"]);
    assert_eq!(c.approved_for(&Sku::new("cpu-aarch64-neon")).count(), 0);
}

#[test]
fn unknown_ids_name_what_the_catalog_has() {
    let c = example();
    assert_eq!(c.get("f32").unwrap().quantization, Quantization::F32);
    let e = c.get("q3_z").unwrap_err();
    assert!(matches!(e, CatalogError::UnknownVariant { .. }));
    let msg = e.to_string();
    assert!(msg.contains("\"q3_z\"") && msg.contains("q4_1, f32, h100"), "{msg}");
}

fn load_text(text: &str) -> Result<Catalog, CatalogError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalog.json"), text).unwrap();
    Catalog::load(dir.path())
}

#[test]
fn broken_invariants_are_refused_at_load() {
    let good = serde_json::to_value(example()).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        load_text(&v.to_string())
    };
    assert!(with(&|_| {}).is_ok());
    let e = with(&|v| v["schema"] = "arqon-catalog/2".into()).unwrap_err();
    assert!(matches!(e, CatalogError::Schema { .. }), "{e}");
    assert!(e.to_string().contains("arqon-catalog/2"));
    let e = with(&|v| v["variants"][1]["id"] = "q4_1".into()).unwrap_err();
    assert!(e.to_string().contains("appears twice"), "{e}");
    let e = with(&|v| v["default_variant"] = "nope".into()).unwrap_err();
    assert!(e.to_string().contains("default_variant \"nope\""), "{e}");
    let e = with(&|v| v["variants"][0]["base_sha256"] = "22".repeat(32).into()).unwrap_err();
    assert!(e.to_string().contains("was built from base 2222"), "{e}");
    let e = with(&|v| v["variants"][0]["artifact"]["path"] = "../elsewhere.gguf".into()).unwrap_err();
    assert!(e.to_string().contains("relative"), "{e}");
    let e = with(&|v| v["variants"][0]["status"] = "shipped".into()).unwrap_err();
    assert!(matches!(e, CatalogError::Parse { .. }), "{e}");
    let e = with(&|v| v["kernel_plans"]["cpu-x86_64-avx2"] = "quant_matmul=fastest".into()).unwrap_err();
    assert!(e.to_string().contains("kernel plan for \"cpu-x86_64-avx2\""), "{e}");
    let e = load_text("{ not json").unwrap_err();
    assert!(matches!(e, CatalogError::Parse { .. }), "{e}");
}

#[test]
fn artifacts_are_checked_by_size_then_hash() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.gguf"), b"weights").unwrap();
    let a = describe_artifact(dir.path(), Path::new("a.gguf")).unwrap();
    assert_eq!(a.bytes, 7);
    // SHA-256 of "weights".
    assert_eq!(a.sha256, "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c");
    assert_eq!(verify_artifact(dir.path(), &a).unwrap(), dir.path().join("a.gguf"));

    std::fs::write(dir.path().join("a.gguf"), b"weight").unwrap();
    let e = verify_artifact(dir.path(), &a).unwrap_err();
    assert!(matches!(e, CatalogError::ArtifactSize { expected: 7, actual: 6, .. }), "{e}");
    assert!(e.to_string().contains("a.gguf") && e.to_string().contains("truncated"), "{e}");

    std::fs::write(dir.path().join("a.gguf"), b"weightz").unwrap();
    let e = verify_artifact(dir.path(), &a).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CatalogError::ArtifactHash { .. }), "{e}");
    assert!(msg.contains("a.gguf") && msg.contains(&a.sha256), "names the file and the expected hash: {msg}");

    std::fs::remove_file(dir.path().join("a.gguf")).unwrap();
    assert!(matches!(verify_artifact(dir.path(), &a).unwrap_err(), CatalogError::Io { .. }));
}

/// Every object key of `v`, at any depth.
fn keys(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                out.insert(k.clone());
                // A map keyed by SKU names: its keys are data, not fields.
                if k != "kernel_plans" {
                    keys(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
        _ => {}
    }
}

/// Every property name the schema declares, at any depth.
fn schema_properties(v: &serde_json::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Object(props)) = m.get("properties") {
                out.extend(props.keys().cloned());
            }
            m.values().for_each(|x| schema_properties(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| schema_properties(x, out)),
        _ => {}
    }
}

#[test]
fn the_committed_schema_parses_and_names_every_field() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("catalog.schema.json");
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert_eq!(schema["properties"]["schema"]["const"], SCHEMA);
    let mut declared = BTreeSet::new();
    schema_properties(&schema, &mut declared);
    let mut used = BTreeSet::new();
    keys(&serde_json::to_value(example()).unwrap(), &mut used);
    // The depth profiles' fields, every kind.
    for d in [
        DepthProfile::Dynamic { min_layers: 2, threshold: 0.9 },
        DepthProfile::SelfSpeculative { draft_layers: 2, draft_tokens: 4 },
    ] {
        keys(&serde_json::to_value(d).unwrap(), &mut used);
    }
    let missing: Vec<_> = used.difference(&declared).collect();
    assert!(missing.is_empty(), "fields the schema does not describe: {missing:?}");
    // Closed sets agree with the enums.
    let v = &schema["$defs"]["variant"]["properties"];
    for s in [Status::Candidate, Status::Approved, Status::Retired] {
        assert!(v["status"]["enum"].as_array().unwrap().contains(&s.as_str().into()), "{s:?}");
    }
    for k in [KernelPlan::Candle, KernelPlan::CpuQ4_1] {
        assert!(v["kernel_plan"]["enum"].as_array().unwrap().contains(&serde_json::to_value(k).unwrap()), "{k:?}");
    }
}
