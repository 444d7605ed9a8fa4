//! The runtime's tunable knobs, each a typed, bounded value with its unit.
//!
//! Purpose: the closed set of knobs the serving runtime exposes to the tuner
//! ([`ServingKnob`]) and one newtype per knob ([`BatchWindow`],
//! [`TokenBudget`], ...) whose constructor range-checks the value. The runtime
//! reads a [`crate::Config`] through [`ServingKnobs::from_config`], so it only
//! ever sees checked, typed values.
//!
//! Usage: `serving_space()` is the [`KnobSpace`] the production executor is
//! built with; knob ids are `ServingKnob as u8`.
//!
//! Invariants: each newtype's `MIN..=MAX` equals the bounds of its spec in
//! `serving_space()` (tested below), so anything the executor admits converts
//! without error.

use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::knobs::{Config, KnobId, KnobSpace, KnobSpec, KnobValue, Unit};
use crate::units::{Micros, Permille};

macro_rules! bounded_knob {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $min:expr, $max:expr, $default:expr, $unit:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u64")]
        pub struct $name($inner);

        impl $name {
            /// Smallest allowed value.
            pub const MIN: u64 = $min;
            /// Largest allowed value.
            pub const MAX: u64 = $max;
            /// Value of the first baseline.
            pub const DEFAULT: u64 = $default;

            /// Range-checked constructor.
            pub fn new(v: u64) -> Result<Self, TunerError> {
                if !(Self::MIN..=Self::MAX).contains(&v) {
                    return Err(TunerError::OutOfRange {
                        what: stringify!($name),
                        value: v as f64,
                        lo: Self::MIN as f64,
                        hi: Self::MAX as f64,
                        unit: $unit,
                    });
                }
                Ok($name(<$inner>::try_from(v).map_err(|_| TunerError::config(stringify!($name), "overflow"))?))
            }

            /// The value in its unit.
            pub fn get(self) -> u64 {
                u64::from(self.0)
            }
        }

        impl TryFrom<u64> for $name {
            type Error = TunerError;
            fn try_from(v: u64) -> Result<Self, Self::Error> {
                $name::new(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.get()
            }
        }
    };
}

bounded_knob!(
    /// How long the scheduler waits to fill a batch, in microseconds (0..=20 000).
    BatchWindow, u32, 0, 20_000, 2_000, "µs"
);
bounded_knob!(
    /// Tokens the scheduler may put in one step (256..=32 768).
    TokenBudget, u32, 256, 32_768, 8_192, "tokens"
);
bounded_knob!(
    /// Most requests decoded together in one step (1..=512).
    MaxBatch, u32, 1, 512, 64, "requests"
);
bounded_knob!(
    /// Share of free device memory given to the KV cache (300..=950 ‰).
    KvCacheShare, u16, 300, 950, 850, "‰"
);
bounded_knob!(
    /// Longest prompt chunk prefilled in one step (64..=8192 tokens).
    PrefillChunk, u32, 64, 8_192, 2_048, "tokens"
);
bounded_knob!(
    /// Speculative draft tokens per step (0 disables; 0..=8).
    DraftTokens, u8, 0, 8, 0, "tokens"
);

impl BatchWindow {
    /// As a duration.
    pub fn as_micros(self) -> Micros {
        Micros(self.get())
    }
}

impl KvCacheShare {
    /// As a share.
    pub fn as_permille(self) -> Permille {
        Permille::new(self.0).unwrap_or(Permille::FULL)
    }
}

/// The closed set of runtime knobs; `knob as u8` is its [`KnobId`] in
/// [`serving_space`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ServingKnob {
    /// [`BatchWindow`].
    BatchWindow = 0,
    /// [`TokenBudget`].
    TokenBudget = 1,
    /// [`MaxBatch`].
    MaxBatch = 2,
    /// [`KvCacheShare`].
    KvCacheShare = 3,
    /// [`PrefillChunk`].
    PrefillChunk = 4,
    /// [`DraftTokens`].
    DraftTokens = 5,
}

impl ServingKnob {
    /// Every knob, in id order.
    pub const ALL: [ServingKnob; 6] = [
        ServingKnob::BatchWindow,
        ServingKnob::TokenBudget,
        ServingKnob::MaxBatch,
        ServingKnob::KvCacheShare,
        ServingKnob::PrefillChunk,
        ServingKnob::DraftTokens,
    ];

    /// Its id in [`serving_space`].
    pub fn id(self) -> KnobId {
        KnobId(self as u8)
    }

    fn spec(self) -> (&'static str, Unit, u64, u64, u64) {
        match self {
            ServingKnob::BatchWindow => {
                ("batch_window", Unit::Micros, BatchWindow::MIN, BatchWindow::MAX, BatchWindow::DEFAULT)
            }
            ServingKnob::TokenBudget => {
                ("token_budget", Unit::Tokens, TokenBudget::MIN, TokenBudget::MAX, TokenBudget::DEFAULT)
            }
            ServingKnob::MaxBatch => ("max_batch", Unit::Requests, MaxBatch::MIN, MaxBatch::MAX, MaxBatch::DEFAULT),
            ServingKnob::KvCacheShare => {
                ("kv_cache_share", Unit::Permille, KvCacheShare::MIN, KvCacheShare::MAX, KvCacheShare::DEFAULT)
            }
            ServingKnob::PrefillChunk => {
                ("prefill_chunk", Unit::Tokens, PrefillChunk::MIN, PrefillChunk::MAX, PrefillChunk::DEFAULT)
            }
            ServingKnob::DraftTokens => {
                ("draft_tokens", Unit::Tokens, DraftTokens::MIN, DraftTokens::MAX, DraftTokens::DEFAULT)
            }
        }
    }
}

/// The knob space of the serving runtime: every [`ServingKnob`] as an
/// integer knob with its newtype's bounds.
pub fn serving_space() -> KnobSpace {
    let specs = ServingKnob::ALL
        .iter()
        .map(|k| {
            let (name, unit, lo, hi, d) = k.spec();
            KnobSpec::integer(name, unit, lo as i64, hi as i64, d as i64)
        })
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| unreachable!("serving knob bounds are static and valid: {e}"));
    KnobSpace::new(specs).unwrap_or_else(|e| unreachable!("serving space is valid: {e}"))
}

/// Every runtime knob, typed: what the runtime builds from a [`Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingKnobs {
    /// See [`BatchWindow`].
    pub batch_window: BatchWindow,
    /// See [`TokenBudget`].
    pub token_budget: TokenBudget,
    /// See [`MaxBatch`].
    pub max_batch: MaxBatch,
    /// See [`KvCacheShare`].
    pub kv_cache_share: KvCacheShare,
    /// See [`PrefillChunk`].
    pub prefill_chunk: PrefillChunk,
    /// See [`DraftTokens`].
    pub draft_tokens: DraftTokens,
}

impl ServingKnobs {
    /// Reads the typed knobs out of a config built on [`serving_space`].
    pub fn from_config(c: &Config) -> Result<ServingKnobs, TunerError> {
        let get = |k: ServingKnob| -> Result<u64, TunerError> {
            match c.knobs.get(k.id()) {
                Some(KnobValue::Integer(v)) if v >= 0 => Ok(v as u64),
                _ => Err(TunerError::config(
                    "ServingKnobs",
                    format!("knob {:?} missing or not a non-negative integer", k),
                )),
            }
        };
        Ok(ServingKnobs {
            batch_window: BatchWindow::new(get(ServingKnob::BatchWindow)?)?,
            token_budget: TokenBudget::new(get(ServingKnob::TokenBudget)?)?,
            max_batch: MaxBatch::new(get(ServingKnob::MaxBatch)?)?,
            kv_cache_share: KvCacheShare::new(get(ServingKnob::KvCacheShare)?)?,
            prefill_chunk: PrefillChunk::new(get(ServingKnob::PrefillChunk)?)?,
            draft_tokens: DraftTokens::new(get(ServingKnob::DraftTokens)?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knobs::VariantId;

    #[test]
    fn batch_window_bounds() {
        assert!(BatchWindow::new(0).is_ok());
        assert!(BatchWindow::new(20_000).is_ok());
        assert!(BatchWindow::new(20_001).is_err());
        assert_eq!(BatchWindow::new(5).unwrap().as_micros(), Micros(5));
    }

    #[test]
    fn token_budget_bounds() {
        assert!(TokenBudget::new(255).is_err());
        assert!(TokenBudget::new(32_768).is_ok());
        assert!(TokenBudget::new(32_769).is_err());
    }

    #[test]
    fn max_batch_bounds() {
        assert!(MaxBatch::new(0).is_err());
        assert!(MaxBatch::new(512).is_ok());
        assert!(MaxBatch::new(513).is_err());
    }

    #[test]
    fn kv_cache_share_bounds() {
        assert!(KvCacheShare::new(299).is_err());
        assert!(KvCacheShare::new(951).is_err());
        assert_eq!(KvCacheShare::new(900).unwrap().as_permille().get(), 900);
    }

    #[test]
    fn prefill_chunk_bounds() {
        assert!(PrefillChunk::new(63).is_err());
        assert!(PrefillChunk::new(8_193).is_err());
        assert!(PrefillChunk::new(64).is_ok());
    }

    #[test]
    fn draft_tokens_bounds() {
        assert!(DraftTokens::new(0).is_ok());
        assert!(DraftTokens::new(9).is_err());
        assert!(serde_json::from_str::<DraftTokens>("12").is_err());
    }

    #[test]
    fn space_matches_newtypes_and_defaults_convert() {
        let space = serving_space();
        assert_eq!(space.len(), ServingKnob::ALL.len());
        for k in ServingKnob::ALL {
            let (name, ..) = k.spec();
            assert_eq!(space.id_of(name), Some(k.id()));
        }
        let cfg = Config::defaults(&space, VariantId(0));
        let typed = ServingKnobs::from_config(&cfg).unwrap();
        assert_eq!(typed.token_budget.get(), TokenBudget::DEFAULT);
        // Every corner of the space converts: bounds agree with the newtypes.
        for u in [0.0, 1.0] {
            let c = cfg.with_patch(&space.patch_from_unit(&[u; 6]));
            assert!(ServingKnobs::from_config(&c).is_ok());
        }
    }
}
