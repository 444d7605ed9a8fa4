//! The adapters a server has loaded, by name, for hot load and unload.
//!
//! Shared between the HTTP handlers (which resolve `"model": "base:NAME"` at
//! admission) and whoever loads and unloads (the `--adapter` flags, the admin
//! API). Files are read and checked *outside* the lock; the lock is held only
//! to insert, remove or clone an `Arc`, so no reader waits on disk. The
//! engine thread never touches the registry: a request carries an
//! `Arc<LoraAdapter>` taken at admission, so unloading an adapter while
//! requests run on it is safe (they finish on it; new ones get 404).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Device;

use super::LoraAdapter;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Loaded adapters by name, all checked against one base model.
#[derive(Debug)]
pub struct AdapterRegistry {
    base: ModelConfig,
    /// Where the base model runs: adapters are loaded onto it.
    device: Device,
    adapters: RwLock<BTreeMap<String, Arc<LoraAdapter>>>,
}

/// Errors unless `name` can be an adapter name: 1 to 64 ASCII letters,
/// digits, `-`, `_` or `.` (so `base:name` parses and URLs need no escaping).
pub fn check_adapter_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "adapter name {name:?} must be 1 to 64 ASCII letters, digits, '-', '_' or '.'"
        )))
    }
}

impl AdapterRegistry {
    /// An empty registry for adapters of the base model `base`, on `device`.
    pub fn new(base: ModelConfig, device: Device) -> Self {
        AdapterRegistry { base, device, adapters: RwLock::new(BTreeMap::new()) }
    }

    // A panic while holding the lock cannot leave the map half-changed (each
    // critical section is one insert, remove or clone), so poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<LoraAdapter>>> {
        self.adapters.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<LoraAdapter>>> {
        self.adapters.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the PEFT folder `dir` as `name`, replacing any adapter of that
    /// name (requests running on the old one finish on it). On error nothing
    /// changes.
    pub fn load(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter>> {
        check_adapter_name(name)?;
        let adapter = Arc::new(LoraAdapter::load(dir, &self.base, &self.device)?);
        self.write().insert(name.to_string(), adapter.clone());
        tracing::info!(adapter = name, dir = %dir.display(), "adapter loaded");
        Ok(adapter)
    }

    /// Adds an adapter already loaded for this base (checked again).
    pub fn insert(&self, name: &str, adapter: Arc<LoraAdapter>) -> Result<()> {
        check_adapter_name(name)?;
        adapter.check(&self.base)?;
        self.write().insert(name.to_string(), adapter);
        Ok(())
    }

    /// Removes `name`; requests already running on it keep their `Arc`.
    pub fn unload(&self, name: &str) -> Result<Arc<LoraAdapter>> {
        let removed = self.write().remove(name).ok_or_else(|| Error::UnknownAdapter(name.to_string()))?;
        tracing::info!(adapter = name, "adapter unloaded");
        Ok(removed)
    }

    /// The adapter loaded as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.read().get(name).cloned()
    }

    /// Names of the loaded adapters, sorted.
    pub fn list(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The base model's configuration.
    pub fn base(&self) -> &ModelConfig {
        &self.base
    }
}
