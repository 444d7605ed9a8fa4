//! The variants a server may serve, which of them are resident, and loading.
//!
//! Purpose: [`VariantSet`] maps the tuner's [`VariantId`]s to servable
//! variants (the approved catalog entries for this SKU, or the one model
//! given on the command line), keeps loaded ones resident for fast swaps, and
//! keeps every loaded variant within a memory budget.
//!
//! Invariants:
//! - `live` counts the weight bytes of every variant loaded and not yet freed
//!   (resident, or retired but still pinned by requests in flight); it only
//!   drops when the reaper frees a variant. A load that would take it past
//!   the budget first evicts idle resident variants (least recently used;
//!   never the ones the caller protects) and waits briefly for the reaper;
//!   if it still would not fit, the load is refused and nothing changes.
//! - A variant that fails to load (bad artifact, wrong base, over budget)
//!   leaves the set, the slot and serving untouched: the error is returned.
//! - Every variant has the base's KV shape and vocabulary, so one KV cache
//!   and one tokenizer serve them all.
//!
//! Only the control thread touches a `VariantSet`; the hot path never does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arqon_tuner::VariantId;
use arqon_variants::slot::Reaper;
use arqon_variants::{Catalog, DepthProfile, Sku};
use candle_core::Device;

use super::{ServedVariant, VariantPin, VariantStats};
use crate::engine::{self, LoadedModel};
use crate::error::{Error, Result};
use crate::model::{LoraAdapter, ModelConfig};
use crate::variants::load::{load_variant_with, LoadPolicy};

/// Where a variant's weights come from.
#[derive(Debug, Clone)]
pub enum VariantSource {
    /// A model file or folder, loaded as it is.
    Model(PathBuf),
    /// An entry of a variant catalog: loaded with every catalog check
    /// (approved, this SKU, artifact size and SHA-256, base model), then its
    /// adapters merged in.
    Catalog {
        /// The catalog.
        catalog: Arc<Catalog>,
        /// The folder its paths are relative to.
        dir: PathBuf,
        /// The entry's id.
        id: String,
    },
}

/// One servable variant, loaded or not.
#[derive(Debug, Clone)]
pub struct VariantInfo {
    /// Its id (the catalog's, or `base`).
    pub name: String,
    /// Its quantization's name.
    pub quantization: String,
    /// How deep it runs.
    pub depth: DepthProfile,
    /// Where it comes from.
    pub source: VariantSource,
    /// Bytes its weights take (the artifact's size), for the budget.
    pub bytes: u64,
    /// What `GET /v1/variants` shows about it beyond the live state (the
    /// catalog entry), as JSON.
    pub listing: serde_json::Value,
}

/// The architecture facts every variant of one base shares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
    vocab: usize,
}

impl Shape {
    fn of(c: &ModelConfig) -> Shape {
        Shape {
            layers: c.num_layers,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            hidden: c.hidden_size,
            vocab: c.vocab_size,
        }
    }
}

#[derive(Debug)]
struct Resident {
    pin: VariantPin,
    last_used: u64,
}

/// The servable variants and the resident ones.
#[derive(Debug)]
pub struct VariantSet {
    infos: Vec<VariantInfo>,
    reaper: Reaper<ServedVariant>,
    resident: HashMap<u16, Resident>,
    live: Arc<AtomicU64>,
    budget: u64,
    shape: Option<Shape>,
    clock: u64,
    device: Device,
}

/// How long a load waits for the reaper to free evicted variants.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

impl VariantSet {
    /// A set over `infos` (index = [`VariantId`]) with a memory `budget` in
    /// bytes, loading variants onto `device`. Starts the reaper thread.
    pub fn new(infos: Vec<VariantInfo>, budget: u64, device: Device) -> Result<VariantSet> {
        if infos.is_empty() {
            return Err(Error::variant("-", "no variant to serve"));
        }
        if infos.len() > usize::from(u16::MAX) {
            return Err(Error::variant("-", "too many variants"));
        }
        let live = Arc::new(AtomicU64::new(0));
        let freed = live.clone();
        let reaper = Reaper::spawn("arqon-reaper", move |v: &ServedVariant| {
            freed.fetch_sub(v.weight_bytes, Ordering::SeqCst);
            tracing::info!(variant = %v.name, bytes = v.weight_bytes, "variant freed");
        })
        .map_err(|e| Error::Server(format!("cannot start the reaper thread: {e}")))?;
        Ok(VariantSet { infos, reaper, resident: HashMap::new(), live, budget, shape: None, clock: 0, device })
    }

    /// Every servable variant, in id order.
    pub fn infos(&self) -> &[VariantInfo] {
        &self.infos
    }

    /// The id of the variant named `name`.
    pub fn id_of(&self, name: &str) -> Option<VariantId> {
        self.infos.iter().position(|i| i.name == name).map(|i| VariantId(i as u16))
    }

    /// The info of `vid`.
    pub fn info(&self, vid: VariantId) -> Result<&VariantInfo> {
        self.infos.get(usize::from(vid.0)).ok_or_else(|| Error::variant(&format!("#{}", vid.0), "no such variant"))
    }

    /// A pin of a resident variant, if loaded.
    pub fn resident(&self, vid: VariantId) -> Option<VariantPin> {
        self.resident.get(&vid.0).map(|r| r.pin.clone())
    }

    /// Bytes of every loaded variant not yet freed.
    pub fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }

    /// The memory budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Loads `vid` (or returns it if resident). `protect` lists variants that
    /// must not be evicted to make room (the active and staged ones).
    pub fn get_or_load(&mut self, vid: VariantId, protect: &[VariantId]) -> Result<VariantPin> {
        self.clock += 1;
        if let Some(r) = self.resident.get_mut(&vid.0) {
            r.last_used = self.clock;
            return Ok(r.pin.clone());
        }
        let info = self.info(vid)?.clone();
        self.make_room(&info, protect)?;
        let loaded = load_source(&info, &self.device)?;
        self.insert(vid, &info, loaded)
    }

    /// Loads the first variant and returns it with the tokenizer and chat
    /// template every variant shares.
    pub fn load_first(&mut self, vid: VariantId) -> Result<(VariantPin, LoadedParts)> {
        let info = self.info(vid)?.clone();
        self.make_room(&info, &[])?;
        let loaded = load_source(&info, &self.device)?;
        let parts = LoadedParts { tokenizer: loaded.tokenizer.clone(), chat: loaded.chat.clone() };
        Ok((self.insert(vid, &info, loaded)?, parts))
    }

    /// Checks a freshly loaded variant against the base and makes it resident.
    fn insert(&mut self, vid: VariantId, info: &VariantInfo, loaded: LoadedModel) -> Result<VariantPin> {
        let LoadedModel { model, source, .. } = loaded;
        let shape = Shape::of(model.config());
        match &self.shape {
            Some(base) if *base != shape => {
                return Err(Error::variant(
                    &info.name,
                    format!("built for another base model: {shape:?}, the served base is {base:?}"),
                ))
            }
            Some(_) => {}
            None => self.shape = Some(shape),
        }
        info.depth.check(model.config().num_layers).map_err(|e| Error::variant(&info.name, e))?;
        let served = ServedVariant {
            name: info.name.clone(),
            vid,
            model,
            depth: info.depth,
            quantization: info.quantization.clone(),
            source,
            weight_bytes: info.bytes,
            stats: VariantStats::default(),
        };
        self.live.fetch_add(info.bytes, Ordering::SeqCst);
        let pin = self.reaper.pin(served);
        self.resident.insert(vid.0, Resident { pin: pin.clone(), last_used: self.clock });
        tracing::info!(variant = %info.name, bytes = info.bytes, live = self.live_bytes(), "variant loaded");
        Ok(pin)
    }

    /// Evicts idle resident variants until `info` fits, or refuses.
    fn make_room(&mut self, info: &VariantInfo, protect: &[VariantId]) -> Result<()> {
        if info.bytes > self.budget {
            return Err(Error::variant(
                &info.name,
                format!(
                    "needs {} MiB, more than the whole variant memory budget of {} MiB",
                    mib(info.bytes),
                    mib(self.budget)
                ),
            ));
        }
        let fits = |s: &Self| s.live_bytes() + info.bytes <= s.budget;
        while !fits(self) {
            let victim = self
                .resident
                .iter()
                .filter(|(id, _)| !protect.iter().any(|p| p.0 == **id))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(id, _)| *id);
            let Some(victim) = victim else { break };
            let r = self.resident.remove(&victim).expect("victim is resident");
            tracing::info!(variant = %r.pin.name, "evicting an idle variant to make room");
            drop(r);
        }
        // Evicted variants are freed by the reaper once their last request ends.
        let deadline = Instant::now() + EVICTION_WAIT;
        while !fits(self) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !fits(self) {
            return Err(Error::variant(
                &info.name,
                format!(
                    "needs {} MiB but only {} MiB of the {} MiB variant memory budget is free (the rest is held by the active variant or requests in flight)",
                    mib(info.bytes),
                    mib(self.budget.saturating_sub(self.live_bytes())),
                    mib(self.budget)
                ),
            ));
        }
        Ok(())
    }
}

/// The tokenizer and chat template every variant of a base shares.
#[derive(Debug, Clone)]
pub struct LoadedParts {
    /// Tokenizer.
    pub tokenizer: crate::tokenizer::Tokenizer,
    /// Chat template.
    pub chat: crate::chat::ChatTemplate,
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

fn load_source(info: &VariantInfo, device: &Device) -> Result<LoadedModel> {
    match &info.source {
        VariantSource::Model(path) => engine::load_on(path, device),
        VariantSource::Catalog { catalog, dir, id } => {
            let v = load_variant_with(catalog, dir, id, &LoadPolicy::serving_on(device.clone()))?;
            let mut loaded = v.loaded;
            for a in &v.entry.adapters {
                let folder = dir.join(&a.path);
                let file = folder.join("adapter_model.safetensors");
                let (got, _) = arqon_variants::catalog::sha256_file(&file)?;
                if got != a.sha256 {
                    return Err(Error::variant(
                        id,
                        format!(
                            "adapter {:?}: {} has SHA-256 {got}, the catalog says {}",
                            a.name,
                            file.display(),
                            a.sha256
                        ),
                    ));
                }
                let adapter = LoraAdapter::load(&folder, loaded.model.config(), loaded.model.device())?;
                loaded.model = loaded.model.merged(&adapter)?;
            }
            // The merges, queued here, are read on the engine thread.
            crate::device::settle(device)?;
            Ok(loaded)
        }
    }
}

/// The servable variants of `catalog` on this machine: its approved entries
/// for `sku`, in catalog order (their position is their tuner `VariantId`).
pub fn catalog_infos(catalog: Arc<Catalog>, dir: &Path, sku: &Sku) -> Vec<VariantInfo> {
    catalog
        .approved_for(sku)
        .map(|e| VariantInfo {
            name: e.id.clone(),
            quantization: e.quantization.to_string(),
            depth: e.depth,
            bytes: if e.memory_bytes > 0 { e.memory_bytes } else { e.artifact.bytes },
            listing: serde_json::to_value(e).unwrap_or_default(),
            source: VariantSource::Catalog { catalog: catalog.clone(), dir: dir.to_path_buf(), id: e.id.clone() },
        })
        .collect()
}

/// Bytes a model file or folder takes on disk (its weights, near enough).
pub fn disk_bytes(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}
