//! The variant catalog: a versioned JSON file listing the variants of one base
//! model that serving may choose among.
//!
//! A catalog lives in a folder beside its artifacts (`catalog.json` plus the
//! GGUF files it names, by paths relative to that folder). Its format is
//! `arqon-catalog/1`, described by `variants/catalog.schema.json` (JSON Schema
//! 2020-12).
//!
//! Invariants, checked by [`Catalog::load`] and [`Catalog::validate`]:
//! - the schema string is exactly [`SCHEMA`] (a newer or older file is refused,
//!   not half-read);
//! - variant ids are unique and non-empty;
//! - `default_variant`, when set, names an entry;
//! - every entry's `base_sha256` equals the catalog's base model hash, so a
//!   catalog never mixes variants of different models.
//!
//! Serving only loads [`Status::Approved`] entries measured on its own SKU
//! ([`Catalog::approved_for`]), and only after [`verify_artifact`] has checked
//! the artifact's size and SHA-256. [`Catalog::save`] writes atomically
//! (temporary file in the same folder, fsync, rename), so a reader never sees
//! a half-written catalog.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DepthProfile, Quantization, Sku};

/// The catalog format this crate reads and writes.
pub const SCHEMA: &str = "arqon-catalog/1";

/// The catalog's file name inside its folder.
pub const CATALOG_FILE: &str = "catalog.json";

/// A catalog of variants of one base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Format version, [`SCHEMA`].
    pub schema: String,
    /// The SKU this catalog's figures were measured on.
    pub sku: Sku,
    /// The model every variant derives from.
    pub base: BaseModel,
    /// The variant serving starts with, if set.
    #[serde(default)]
    pub default_variant: Option<String>,
    /// The variants.
    pub variants: Vec<VariantEntry>,
    /// Per SKU name, the kernel plan `arqon bench kernels` measured there
    /// (`arqon_kernels::KernelPlan`'s string form): serving on that SKU runs it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kernel_plans: BTreeMap<String, String>,
}

/// The base checkpoint, as shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseModel {
    /// The model's name (`smollm2-135m-instruct`).
    pub name: String,
    /// The shipped file's name.
    pub file: String,
    /// SHA-256 of the shipped file, lowercase hex.
    pub sha256: String,
}

/// One variant of the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantEntry {
    /// Unique id within the catalog (`q8_0`, `q4_1-exit24`).
    pub id: String,
    /// SHA-256 of the base model this variant was built from.
    pub base_sha256: String,
    /// The weights file.
    pub artifact: Artifact,
    /// How the weight matrices are stored.
    pub quantization: Quantization,
    /// Depth profile / early-exit policy.
    #[serde(default)]
    pub depth: DepthProfile,
    /// Adapters merged into or applied on top of the weights (may be empty).
    #[serde(default)]
    pub adapters: Vec<AdapterRef>,
    /// Which kernels run the matrices.
    pub kernel_plan: KernelPlan,
    /// The SKU the entry was measured and approved on.
    pub sku: Sku,
    /// Lifecycle state.
    pub status: Status,
    /// Resident bytes of the weights once loaded.
    pub memory_bytes: u64,
    /// Measured figures, once measured.
    #[serde(default)]
    pub figures: Option<Figures>,
}

/// A file on disk with its size and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Path relative to the catalog's folder.
    pub path: PathBuf,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// An adapter a variant uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    /// The adapter's name.
    pub name: String,
    /// Its file, relative to the catalog's folder.
    pub path: PathBuf,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
}

/// The kernels that run a variant's matrices: a closed set, extended by the
/// GPU work with CUDA plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelPlan {
    /// candle's CPU kernels (dense f32 matmul, candle's GGML block kernels).
    Candle,
    /// Arqon's SIMD `Q4_1` × `Q8_1` kernel on the CPU (`arqon_kernels::quant`).
    CpuQ4_1,
}

impl KernelPlan {
    /// The plan the CPU runtime uses for a quantization.
    pub fn cpu_for(q: Quantization) -> Self {
        match q {
            Quantization::Q4_1 => KernelPlan::CpuQ4_1,
            _ => KernelPlan::Candle,
        }
    }
}

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Built, not (yet) good enough to serve.
    Candidate,
    /// Passed its quality floor on its SKU: serving may load it.
    Approved,
    /// No longer served; kept for the record.
    Retired,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Candidate => "candidate",
            Status::Approved => "approved",
            Status::Retired => "retired",
        }
    }
}

/// Measured figures of a variant on its SKU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    /// When they were measured (RFC 3339, UTC).
    pub measured_at: String,
    /// Speed per batch size.
    #[serde(default)]
    pub speed: Vec<SpeedPoint>,
    /// The quality proxy.
    #[serde(default)]
    pub quality: Option<Quality>,
}

/// Throughput at one batch size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedPoint {
    /// Concurrent sequences.
    pub batch: u32,
    /// Prompt tokens per sequence (absent in figures measured before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Prompt tokens per second in prefill.
    pub prefill_tok_s: f64,
    /// Generated tokens per second, summed over the batch.
    pub decode_tok_s: f64,
}

/// The quality proxy against a reference variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// The reference variant's id.
    pub reference: String,
    /// Teacher-forced top-1 agreement with the reference's greedy
    /// generations, in `[0, 1]`.
    pub top1_agreement: f64,
    /// Perplexity on the fixed text.
    pub perplexity: f64,
}

/// Catalog and artifact errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The catalog is not valid JSON of the expected shape.
    #[error("{path}: not a valid catalog: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// The catalog's format version is not the one this build reads.
    #[error("catalog schema {found:?} is not supported (expected {expected:?})")]
    Schema {
        /// What the file says.
        found: String,
        /// What we read.
        expected: &'static str,
    },
    /// The catalog breaks one of its invariants.
    #[error("invalid catalog: {0}")]
    Invalid(String),
    /// No entry has this id.
    #[error("unknown variant {id:?} (the catalog has: {known})")]
    UnknownVariant {
        /// The id asked for.
        id: String,
        /// The ids it has, comma-separated.
        known: String,
    },
    /// An artifact's size differs from the catalog's (truncated or replaced).
    #[error("{path}: artifact is {actual} bytes, the catalog expects {expected} (truncated or replaced?)")]
    ArtifactSize {
        /// The file.
        path: PathBuf,
        /// Size in the catalog.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// An artifact's hash differs from the catalog's.
    #[error("{path}: artifact SHA-256 is {actual}, the catalog expects {expected}")]
    ArtifactHash {
        /// The file.
        path: PathBuf,
        /// Hash in the catalog.
        expected: String,
        /// Hash on disk.
        actual: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io { path: path.to_path_buf(), source }
}

impl Catalog {
    /// An empty catalog for `base` on `sku`.
    pub fn new(sku: Sku, base: BaseModel) -> Self {
        Catalog {
            schema: SCHEMA.to_string(),
            sku,
            base,
            default_variant: None,
            variants: Vec::new(),
            kernel_plans: BTreeMap::new(),
        }
    }

    /// Reads and validates a catalog file (or `catalog.json` in a folder).
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let path = if path.is_dir() { path.join(CATALOG_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CatalogError::Parse { path: path.clone(), message: e.to_string() })?;
        // Check the version before the shape, so a future format gets the
        // clear "unsupported schema" error, not a confusing field error.
        match value.get("schema").and_then(|s| s.as_str()) {
            Some(SCHEMA) => {}
            found => {
                return Err(CatalogError::Schema { found: found.unwrap_or("<missing>").to_string(), expected: SCHEMA })
            }
        }
        let cat: Catalog = serde_json::from_value(value)
            .map_err(|e| CatalogError::Parse { path: path.clone(), message: e.to_string() })?;
        cat.validate()?;
        Ok(cat)
    }

    /// Checks the invariants listed in the module docs.
    pub fn validate(&self) -> Result<(), CatalogError> {
        if self.schema != SCHEMA {
            return Err(CatalogError::Schema { found: self.schema.clone(), expected: SCHEMA });
        }
        let mut seen = HashSet::new();
        for v in &self.variants {
            if v.id.is_empty() {
                return Err(CatalogError::Invalid("a variant has an empty id".into()));
            }
            if !seen.insert(v.id.as_str()) {
                return Err(CatalogError::Invalid(format!("variant id {:?} appears twice", v.id)));
            }
            if v.base_sha256 != self.base.sha256 {
                return Err(CatalogError::Invalid(format!(
                    "variant {:?} was built from base {}, but the catalog's base {:?} is {}",
                    v.id, v.base_sha256, self.base.name, self.base.sha256
                )));
            }
            if v.artifact.path.is_absolute() || v.artifact.path.components().any(|c| c.as_os_str() == "..") {
                return Err(CatalogError::Invalid(format!(
                    "variant {:?}: artifact path {} must be relative to the catalog's folder",
                    v.id,
                    v.artifact.path.display()
                )));
            }
        }
        if let Some(d) = &self.default_variant {
            if !seen.contains(d.as_str()) {
                return Err(CatalogError::Invalid(format!("default_variant {d:?} is not in the catalog")));
            }
        }
        for (sku, plan) in &self.kernel_plans {
            plan.parse::<arqon_kernels::KernelPlan>()
                .map_err(|e| CatalogError::Invalid(format!("kernel plan for {sku:?}: {e}")))?;
        }
        Ok(())
    }

    /// The kernel plan measured on `sku`, if any (the catalog was validated,
    /// so a stored plan parses).
    pub fn kernel_plan_for(&self, sku: &Sku) -> Option<arqon_kernels::KernelPlan> {
        self.kernel_plans.get(sku.as_str()).and_then(|p| p.parse().ok())
    }

    /// Writes the catalog atomically: a temporary file in the same folder,
    /// fsynced, then renamed over `path` (or `path/catalog.json` for a folder).
    pub fn save(&self, path: &Path) -> Result<(), CatalogError> {
        self.validate()?;
        let path = if path.is_dir() { path.join(CATALOG_FILE) } else { path.to_path_buf() };
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| CatalogError::Parse { path: path.clone(), message: e.to_string() })?;
        text.push('\n');
        write_atomic(&path, text.as_bytes())
    }

    /// The entry with this id.
    pub fn get(&self, id: &str) -> Result<&VariantEntry, CatalogError> {
        self.variants.iter().find(|v| v.id == id).ok_or_else(|| CatalogError::UnknownVariant {
            id: id.to_string(),
            known: self.variants.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The entry with this id, mutably.
    pub fn get_mut(&mut self, id: &str) -> Result<&mut VariantEntry, CatalogError> {
        let known = self.variants.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(", ");
        self.variants
            .iter_mut()
            .find(|v| v.id == id)
            .ok_or_else(|| CatalogError::UnknownVariant { id: id.to_string(), known })
    }

    /// The entries serving may load on `sku`: approved and measured there.
    pub fn approved_for<'a>(&'a self, sku: &Sku) -> impl Iterator<Item = &'a VariantEntry> + 'a {
        let sku = sku.clone();
        self.variants.iter().filter(move |v| v.status == Status::Approved && v.sku == sku)
    }

    /// Adds an entry, or replaces the one with the same id.
    pub fn upsert(&mut self, entry: VariantEntry) {
        match self.variants.iter_mut().find(|v| v.id == entry.id) {
            Some(v) => *v = entry,
            None => self.variants.push(entry),
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder,
/// fsync, rename, then fsync of the folder where the platform allows).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CatalogError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        // Persist the rename itself; not every platform can open a folder.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Streams a file through SHA-256: (lowercase hex, bytes read).
pub fn sha256_file(path: &Path) -> Result<(String, u64), CatalogError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(h.finalize()), total))
}

/// Describes a file as an [`Artifact`], its path stored relative to `dir`.
pub fn describe_artifact(dir: &Path, relative: &Path) -> Result<Artifact, CatalogError> {
    let (sha256, bytes) = sha256_file(&dir.join(relative))?;
    Ok(Artifact { path: relative.to_path_buf(), sha256, bytes })
}

/// Checks an artifact against the catalog: its size first (cheap, catches
/// truncation), then its streamed SHA-256. Returns its full path.
pub fn verify_artifact(dir: &Path, artifact: &Artifact) -> Result<PathBuf, CatalogError> {
    let path = dir.join(&artifact.path);
    let actual = std::fs::metadata(&path).map_err(io_err(&path))?.len();
    if actual != artifact.bytes {
        return Err(CatalogError::ArtifactSize { path, expected: artifact.bytes, actual });
    }
    let (sha, _) = sha256_file(&path)?;
    if !sha.eq_ignore_ascii_case(&artifact.sha256) {
        return Err(CatalogError::ArtifactHash { path, expected: artifact.sha256.clone(), actual: sha });
    }
    Ok(path)
}
