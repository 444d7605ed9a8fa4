//! The control plane of `arqon serve`: served variants and the live swap.
//!
//! - [`ServedVariant`]: one loaded variant (its decoder, depth profile and
//!   live counters), always held through a [`VariantPin`]
//!   (`arqon_variants::slot::Pinned`), so whoever releases it last, its
//!   weights are freed on the reaper thread, off the hot path;
//! - [`Routing`]: what the [`VariantSlot`] holds: the variant new requests
//!   take and, during a canary, the candidate and its share of new requests;
//! - [`set::VariantSet`]: the resident variants within a memory budget, and
//!   loading (a variant that fails to load leaves serving untouched);
//! - [`slot::SlotControl`]: the tuner's `ServingControl` on top of both:
//!   the only code that stores into the slot;
//! - [`governor`]: the control thread that runs the guardrail executor over
//!   the telemetry the scheduler emits, and takes operator commands;
//! - [`telemetry`]: the device sampler thread (host memory on the CPU, NVML
//!   on a GPU) that feeds the same telemetry ring.
//!
//! Data flow: the scheduler reads the slot once per admitted job
//! ([`Routing::pick`]) and pins the variant for the job's life; each step
//! batches sequences per variant. A swap changes only what new jobs take.

pub mod governor;
pub mod set;
pub mod slot;
pub mod telemetry;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use arqon_tuner::telemetry::Cohort;
use arqon_tuner::units::CanaryFraction;
use arqon_tuner::{Config, VariantId};
use arqon_variants::slot::{Pinned, Slot};
use arqon_variants::DepthProfile;

use crate::model::Llama;

/// Live counters of one variant (relaxed atomics: statistics, not control).
#[derive(Debug, Default)]
pub struct VariantStats {
    /// Jobs admitted on it.
    pub requests: AtomicU64,
    /// Tokens it generated.
    pub tokens: AtomicU64,
    /// Sequences running on it now.
    pub running: AtomicU64,
}

impl VariantStats {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One loaded variant.
#[derive(Debug)]
pub struct ServedVariant {
    /// Its catalog id (or `base` when serving a model without a catalog).
    pub name: String,
    /// Its number in the tuner's configuration space.
    pub vid: VariantId,
    /// The decoder.
    pub model: Llama,
    /// How deep it runs.
    pub depth: DepthProfile,
    /// Its quantization, as named in the catalog or the file.
    pub quantization: String,
    /// The file or folder it was loaded from.
    pub source: PathBuf,
    /// Bytes its weights occupy (the artifact's size).
    pub weight_bytes: u64,
    /// Live counters.
    pub stats: VariantStats,
}

/// A counted reference to a loaded variant (see `arqon_variants::slot`).
pub type VariantPin = Pinned<ServedVariant>;

/// The slot's value: where new requests go.
#[derive(Debug)]
pub struct Routing {
    /// The variant serving the control share.
    pub active: VariantPin,
    /// A candidate and its share of new requests, during a canary.
    pub canary: Option<(VariantPin, CanaryFraction)>,
    /// The tuner configuration the control share realises.
    pub config: Config,
}

/// The slot the scheduler reads and the control thread swaps.
pub type VariantSlot = Slot<Routing>;

impl Routing {
    /// The variant for the admission with number `ticket`, and its cohort.
    /// The split is a fixed hash of the ticket, so it is deterministic and
    /// spreads canary requests evenly instead of in bursts.
    pub fn pick(&self, ticket: u64) -> (VariantPin, Cohort) {
        match &self.canary {
            Some((candidate, share)) if splitmix(ticket) % 1000 < u64::from(share.permille()) => {
                (candidate.clone(), Cohort::Canary)
            }
            _ => (self.active.clone(), Cohort::Control),
        }
    }
}

/// SplitMix64's finaliser: a well-mixed hash of a counter.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::splitmix;

    #[test]
    fn the_canary_split_is_even_and_deterministic() {
        let share = 250u64;
        let hits = (0..100_000u64).filter(|t| splitmix(*t) % 1000 < share).count();
        assert!((24_000..26_000).contains(&hits), "{hits}");
        // Spread: no run of 20 canary picks in a row in the first 10k tickets.
        let mut run = 0;
        for t in 0..10_000u64 {
            run = if splitmix(t) % 1000 < share { run + 1 } else { 0 };
            assert!(run < 20);
        }
    }
}
