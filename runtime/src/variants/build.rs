//! `arqon variants build`: quantization variants of a base GGUF, written as
//! self-contained GGUF artifacts, measured, and listed in a catalog.
//!
//! Each artifact copies every metadata key of the base (architecture,
//! tokenizer, chat template), adds `arqon.base_sha256` and
//! `arqon.quantization`, and holds the base's tensors converted by
//! [`convert_tensor`]. Tensors and keys are written in a fixed order, so the
//! same base and format always give the same bytes (and the same hash). Files
//! are written to a temporary name in the output folder, fsynced and renamed.
//!
//! The base as shipped is an entry too (id = its format, e.g. `q4_1`), hard
//! linked into the folder (copied where a link is impossible). The f32
//! artifact is the quality reference when it is built; an entry is approved
//! when its agreement reaches the floor ([`super::quality::QUALITY_FLOOR`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arqon_variants::catalog::{describe_artifact, sha256_file};
use arqon_variants::{BaseModel, Catalog, DepthProfile, Figures, KernelPlan, Quantization, Sku, Status, VariantEntry};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;

use super::load::{load_variant_with, LoadPolicy, BASE_SHA_KEY};
use super::quality::{self, Targets};
use super::requant::{convert_tensor, ggml_dtype, quantization_of};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;

/// The id of the quality reference, when built.
pub const REFERENCE_ID: &str = "f32";

/// What `arqon variants build` does.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The base GGUF file.
    pub base: PathBuf,
    /// The base model's name for the catalog.
    pub model_name: String,
    /// The output folder (artifacts and `catalog.json`).
    pub out: PathBuf,
    /// Formats to build (the base's own format is the shipped file).
    pub formats: Vec<Quantization>,
    /// Tokens the reference generates per quality prompt.
    pub target_tokens: usize,
    /// Agreement needed for approval.
    pub floor: f64,
}

/// The llama.cpp `general.file_type` of a format (for tools that read it).
fn file_type(q: Quantization) -> Option<u32> {
    Some(match q {
        Quantization::F32 => 0,
        Quantization::F16 => 1,
        Quantization::Q4_0 => 2,
        Quantization::Q4_1 => 3,
        Quantization::Q8_0 => 7,
        Quantization::Bf16 => 32,
        Quantization::Other => return None,
    })
}

/// The format of a GGUF's weight matrices (that of its first layer's query).
pub fn base_quantization(f: &GgufFile) -> Quantization {
    f.content()
        .tensor_infos
        .get("blk.0.attn_q.weight")
        .map(|i| quantization_of(i.ggml_dtype))
        .unwrap_or(Quantization::Other)
}

/// Writes `base` converted to `q` as a GGUF at `dest`, atomically.
pub fn write_artifact(base: &Path, base_sha256: &str, q: Quantization, dest: &Path) -> Result<()> {
    let target = ggml_dtype(q)?;
    let mut f = GgufFile::open(base)?;
    let mut infos: Vec<(String, u64)> = f.content().tensor_infos.iter().map(|(k, v)| (k.clone(), v.offset)).collect();
    infos.sort_by_key(|(_, off)| *off);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(infos.len());
    for (name, _) in &infos {
        let t = f.qtensor(name)?;
        tensors.push((name.clone(), convert_tensor(name, &t, target)?));
    }
    let mut meta: Vec<(String, Value)> = f
        .content()
        .metadata
        .iter()
        // candle writes with the default 32-byte alignment; an inherited
        // `general.alignment` could claim another.
        .filter(|(k, _)| !matches!(k.as_str(), "general.alignment" | "general.file_type") && !k.starts_with("arqon."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(ft) = file_type(q) {
        meta.push(("general.file_type".into(), Value::U32(ft)));
    }
    meta.push((BASE_SHA_KEY.into(), Value::String(base_sha256.to_string())));
    meta.push(("arqon.quantization".into(), Value::String(q.as_str().into())));
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    write_file_atomic(dest, |w| gguf_file::write(w, &meta_refs, &tensor_refs).map_err(|e| e.to_string()))
}

/// Writes a file through `write` to a temporary name beside `dest`, fsyncs, renames.
fn write_file_atomic(
    dest: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::result::Result<(), String>,
) -> Result<()> {
    let fail = |message: String| Error::Write { path: dest.to_path_buf(), message };
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| fail(e.to_string()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w).map_err(fail)?;
        w.flush().map_err(|e| fail(e.to_string()))?;
        let file = w.into_inner().map_err(|e| fail(e.to_string()))?;
        file.sync_all().map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&tmp, dest).map_err(|e| fail(e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Puts the base file into the folder as `dest`: a hard link, or a copy.
fn link_or_copy(base: &Path, dest: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::Write { path: dest.to_path_buf(), message: e.to_string() };
    if dest.exists() {
        std::fs::remove_file(dest).map_err(fail)?;
    }
    if std::fs::hard_link(base, dest).is_ok() {
        return Ok(());
    }
    write_file_atomic(dest, |w| {
        let mut src = File::open(base).map_err(|e| e.to_string())?;
        std::io::copy(&mut src, w).map(|_| ()).map_err(|e| e.to_string())
    })
}

/// Builds every requested format, measures quality, and writes `catalog.json`.
/// Entries of an existing catalog of the same base with other ids are kept.
pub fn build_variants(opts: &BuildOptions, progress: &mut dyn FnMut(&str)) -> Result<Catalog> {
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Write { path: out.clone(), message: e.to_string() })?;
    let (base_sha, _) = sha256_file(&opts.base)?;
    let base_q = base_quantization(&GgufFile::open(&opts.base)?);
    let file = opts.base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let base = BaseModel { name: opts.model_name.clone(), file, sha256: base_sha.clone() };
    let sku = Sku::detect_cpu();
    let mut catalog = match Catalog::load(out) {
        Ok(c) if c.base == base => Catalog { sku: sku.clone(), ..c },
        _ => Catalog::new(sku.clone(), base),
    };

    let mut formats = vec![base_q];
    for q in &opts.formats {
        if !formats.contains(q) {
            formats.push(*q);
        }
    }
    for q in &formats {
        let rel = PathBuf::from(format!("{q}.gguf"));
        let dest = out.join(&rel);
        if *q == base_q {
            progress(&format!("{q}: the base as shipped"));
            link_or_copy(&opts.base, &dest)?;
        } else {
            progress(&format!("{q}: converting"));
            write_artifact(&opts.base, &base_sha, *q, &dest)?;
        }
        catalog.upsert(VariantEntry {
            id: q.as_str().to_string(),
            base_sha256: base_sha.clone(),
            artifact: describe_artifact(out, &rel)?,
            quantization: *q,
            depth: DepthProfile::Full,
            adapters: Vec::new(),
            kernel_plan: KernelPlan::cpu_for(*q),
            sku: sku.clone(),
            status: Status::Candidate,
            memory_bytes: 0,
            figures: None,
        });
    }

    // Quality: the f32 artifact is the reference when built, else the base.
    let reference = if formats.contains(&Quantization::F32) { REFERENCE_ID } else { base_q.as_str() };
    progress(&format!("quality: reference {reference}, {} prompts", quality::prompts().len()));
    let targets = {
        let r = load_variant_with(&catalog, out, reference, &LoadPolicy::offline())?;
        quality::reference_targets(&mut Engine::new(r.loaded), &quality::prompts(), opts.target_tokens)?
    };
    for q in &formats {
        measure_entry(&mut catalog, opts, q.as_str(), reference, &targets, progress)?;
    }
    if catalog.default_variant.as_deref().is_none_or(|d| catalog.get(d).is_err()) {
        let approved = |id: &str| catalog.get(id).map(|v| v.status == Status::Approved).unwrap_or(false);
        catalog.default_variant = [base_q.as_str(), reference].into_iter().find(|id| approved(id)).map(String::from);
    }
    catalog.save(out)?;
    Ok(catalog)
}

/// Loads entry `id`, measures its quality and memory, and sets its status.
fn measure_entry(
    catalog: &mut Catalog,
    opts: &BuildOptions,
    id: &str,
    reference: &str,
    targets: &Targets,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let (dir, floor) = (&opts.out, opts.floor);
    let v = load_variant_with(catalog, dir, id, &LoadPolicy::offline())?;
    let bytes = v.weight_bytes;
    let q = quality::measure(&mut Engine::new(v.loaded), targets, reference)?;
    let status = if q.top1_agreement >= floor { Status::Approved } else { Status::Candidate };
    progress(&format!(
        "{id}: agreement {:.3}, perplexity {:.2}, {:.1} MiB resident: {}",
        q.top1_agreement,
        q.perplexity,
        bytes as f64 / (1 << 20) as f64,
        status.as_str()
    ));
    let e = catalog.get_mut(id)?;
    e.memory_bytes = bytes;
    e.status = status;
    e.figures = Some(Figures { measured_at: super::now_rfc3339(), speed: Vec::new(), quality: Some(q) });
    Ok(())
}
