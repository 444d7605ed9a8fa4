//! Loading a catalog entry: the checks that stand between a catalog and a
//! served model.
//!
//! In order: the id exists; the entry may be loaded under the [`LoadPolicy`]
//! (serving: approved and measured on this SKU); the artifact's size and
//! SHA-256 match the catalog; the artifact is a variant of the catalog's base
//! (its `arqon.base_sha256` metadata, and its model configuration against the
//! base artifact's); its depth profile fits the model. Only then are the
//! weights loaded. Applying the depth profile and adapters is the caller's:
//! the entry travels with the model in [`LoadedVariant`].

use std::path::Path;

use arqon_variants::{verify_artifact, Catalog, Sku, Status, VariantEntry};
use candle_core::Device;

use crate::engine::{self, LoadedModel};
use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;

/// The GGUF metadata key that names the base model's SHA-256.
pub const BASE_SHA_KEY: &str = "arqon.base_sha256";

/// Which entries may be loaded, and onto which device.
#[derive(Debug, Clone)]
pub struct LoadPolicy {
    /// Only entries measured on this SKU (`None`: any SKU).
    pub sku: Option<Sku>,
    /// Whether candidate and retired entries may be loaded.
    pub allow_unapproved: bool,
    /// Where the model runs.
    pub device: Device,
}

impl LoadPolicy {
    /// Serving on the CPU: approved entries of the detected CPU SKU only.
    pub fn serving() -> Self {
        Self::serving_on(Device::Cpu)
    }

    /// Serving on `device`: approved entries of its SKU only (see [`crate::device::sku`]).
    pub fn serving_on(device: Device) -> Self {
        LoadPolicy { sku: Some(crate::device::sku(&device)), allow_unapproved: false, device }
    }

    /// Building and measuring on the CPU: any entry, on any SKU (hashes and
    /// base are still checked).
    pub fn offline() -> Self {
        LoadPolicy { sku: None, allow_unapproved: true, device: Device::Cpu }
    }
}

/// A catalog entry with its model loaded.
#[derive(Debug)]
pub struct LoadedVariant {
    /// The entry (depth profile and adapters are for the caller to apply).
    pub entry: VariantEntry,
    /// The model.
    pub loaded: LoadedModel,
    /// Resident bytes of its weights.
    pub weight_bytes: u64,
}

/// Loads entry `id` for serving ([`LoadPolicy::serving`]).
pub fn load_variant(catalog: &Catalog, catalog_dir: &Path, id: &str) -> Result<LoadedVariant> {
    load_variant_with(catalog, catalog_dir, id, &LoadPolicy::serving())
}

/// Loads entry `id` under `policy`.
pub fn load_variant_with(
    catalog: &Catalog,
    catalog_dir: &Path,
    id: &str,
    policy: &LoadPolicy,
) -> Result<LoadedVariant> {
    let entry = catalog.get(id)?;
    check_policy(entry, policy)?;
    let path = verify_artifact(catalog_dir, &entry.artifact)?;
    let header = GgufFile::open(&path)?;
    check_base(catalog, catalog_dir, entry, &path, header)?;
    let loaded = engine::load_on(&path, &policy.device)?;
    let layers = loaded.model.config().num_layers;
    entry.depth.check(layers).map_err(|e| Error::VariantRefused { id: entry.id.clone(), reason: e.to_string() })?;
    let weight_bytes = loaded.model.weights().resident_bytes();
    Ok(LoadedVariant { entry: entry.clone(), loaded, weight_bytes })
}

fn check_policy(entry: &VariantEntry, policy: &LoadPolicy) -> Result<()> {
    let refuse = |reason: String| Err(Error::VariantRefused { id: entry.id.clone(), reason });
    if !policy.allow_unapproved && entry.status != Status::Approved {
        return refuse(format!("its status is {}; serving loads only approved entries", entry.status.as_str()));
    }
    match &policy.sku {
        Some(sku) if *sku != entry.sku => {
            refuse(format!("it was measured on {}, and this machine is {sku}", entry.sku))
        }
        _ => Ok(()),
    }
}

/// Checks that the artifact at `path` derives from the catalog's base.
fn check_base(catalog: &Catalog, dir: &Path, entry: &VariantEntry, path: &Path, mut header: GgufFile) -> Result<()> {
    let wrong = |message: String| Err(Error::WrongBase { path: path.to_path_buf(), message });
    let base = &catalog.base;
    match header.meta_str(BASE_SHA_KEY) {
        Some(s) if !s.eq_ignore_ascii_case(&base.sha256) => {
            return wrong(format!("it was built from base {s}, the catalog's base {:?} is {}", base.name, base.sha256))
        }
        Some(_) => {}
        None if entry.artifact.sha256.eq_ignore_ascii_case(&base.sha256) => {}
        None => return wrong(format!("it carries no {BASE_SHA_KEY} and is not the base file {:?} itself", base.file)),
    }
    // Compare the model's shape with the base file's, when the catalog holds
    // it: a re-quantization never changes the configuration.
    let base_entry =
        catalog.variants.iter().find(|v| v.artifact.sha256.eq_ignore_ascii_case(&base.sha256) && v.id != entry.id);
    if let Some(b) = base_entry {
        let base_path = dir.join(&b.artifact.path);
        if base_path.exists() {
            let got = header.config()?;
            let want = GgufFile::open(&base_path)?.config()?;
            if got != want {
                return wrong(format!(
                    "its configuration ({} layers, hidden {}, vocab {}) differs from the base's ({} layers, hidden {}, vocab {})",
                    got.num_layers, got.hidden_size, got.vocab_size, want.num_layers, want.hidden_size, want.vocab_size
                ));
            }
        }
    }
    Ok(())
}
