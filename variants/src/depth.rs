//! Depth profiles: how many decoder layers a variant runs per token.
//!
//! A profile is part of a variant's identity in the catalog. The runtime's
//! decoder reads it; this crate only names the choices and checks them
//! against a model's layer count, so a catalog entry that asks for layer 40
//! of a 30-layer model is refused when the catalog is loaded, not mid-request.

use serde::{Deserialize, Serialize};

/// How deep a variant runs each token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DepthProfile {
    /// Every layer (the model as trained).
    #[default]
    Full,
    /// Static early exit: run the first `layers` layers, then the final norm
    /// and the shared LM head.
    Static {
        /// Layers run, `1..=num_layers`.
        layers: usize,
    },
    /// Dynamic per-token early exit (CALM-style): a decode token may leave
    /// after at least `min_layers` layers once its confidence reaches
    /// `threshold`; prompt tokens always run every layer.
    Dynamic {
        /// Layers every token runs before it may exit, `1..=num_layers`.
        min_layers: usize,
        /// Confidence needed to exit, in `[0, 1]`; above 1 never exits.
        threshold: f32,
    },
    /// Lossless self-speculative decoding (LayerSkip-style): draft
    /// `draft_tokens` tokens with the first `draft_layers` layers, then
    /// verify them with the full model in one step. Greedy output equals the
    /// full model's.
    SelfSpeculative {
        /// Layers the draft runs, `1..num_layers`.
        draft_layers: usize,
        /// Tokens drafted per verification step, `1..=16`.
        draft_tokens: usize,
    },
}

/// A profile that does not fit the model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("depth profile {profile:?} does not fit a {num_layers}-layer model: {why}")]
pub struct DepthError {
    /// The profile.
    pub profile: DepthProfile,
    /// The model's layer count.
    pub num_layers: usize,
    /// What is wrong.
    pub why: &'static str,
}

/// Most tokens one self-speculative step drafts.
pub const MAX_DRAFT_TOKENS: usize = 16;

impl DepthProfile {
    /// Checks the profile against a model with `num_layers` layers.
    pub fn check(&self, num_layers: usize) -> Result<(), DepthError> {
        let err = |why| Err(DepthError { profile: *self, num_layers, why });
        match *self {
            DepthProfile::Full => Ok(()),
            DepthProfile::Static { layers } if layers == 0 || layers > num_layers => {
                err("`layers` must be between 1 and the model's layer count")
            }
            DepthProfile::Static { .. } => Ok(()),
            DepthProfile::Dynamic { min_layers, .. } if min_layers == 0 || min_layers > num_layers => {
                err("`min_layers` must be between 1 and the model's layer count")
            }
            DepthProfile::Dynamic { threshold, .. } if !threshold.is_finite() || threshold < 0.0 => {
                err("`threshold` must be a finite number >= 0")
            }
            DepthProfile::Dynamic { .. } => Ok(()),
            DepthProfile::SelfSpeculative { draft_layers, .. } if draft_layers == 0 || draft_layers >= num_layers => {
                err("`draft_layers` must be at least 1 and fewer than the model's layer count")
            }
            DepthProfile::SelfSpeculative { draft_tokens, .. }
                if draft_tokens == 0 || draft_tokens > MAX_DRAFT_TOKENS =>
            {
                err("`draft_tokens` must be between 1 and 16")
            }
            DepthProfile::SelfSpeculative { .. } => Ok(()),
        }
    }

    /// A short stable name for ids and tables (`full`, `exit12`, `calm8@0.90`, `spec10x4`).
    pub fn tag(&self) -> String {
        match *self {
            DepthProfile::Full => "full".into(),
            DepthProfile::Static { layers } => format!("exit{layers}"),
            DepthProfile::Dynamic { min_layers, threshold } => format!("calm{min_layers}@{threshold:.2}"),
            DepthProfile::SelfSpeculative { draft_layers, draft_tokens } => {
                format!("spec{draft_layers}x{draft_tokens}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_bounds_against_the_layer_count() {
        assert!(DepthProfile::Full.check(30).is_ok());
        assert!(DepthProfile::Static { layers: 30 }.check(30).is_ok());
        assert!(DepthProfile::Static { layers: 31 }.check(30).is_err());
        assert!(DepthProfile::Static { layers: 0 }.check(30).is_err());
        assert!(DepthProfile::Dynamic { min_layers: 4, threshold: 0.9 }.check(30).is_ok());
        assert!(DepthProfile::Dynamic { min_layers: 4, threshold: f32::NAN }.check(30).is_err());
        assert!(DepthProfile::SelfSpeculative { draft_layers: 29, draft_tokens: 4 }.check(30).is_ok());
        assert!(DepthProfile::SelfSpeculative { draft_layers: 30, draft_tokens: 4 }.check(30).is_err());
        assert!(DepthProfile::SelfSpeculative { draft_layers: 8, draft_tokens: 17 }.check(30).is_err());
    }

    #[test]
    fn serde_is_tagged_and_round_trips() {
        let p = DepthProfile::SelfSpeculative { draft_layers: 10, draft_tokens: 4 };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, r#"{"kind":"self_speculative","draft_layers":10,"draft_tokens":4}"#);
        assert_eq!(serde_json::from_str::<DepthProfile>(&j).unwrap(), p);
        assert_eq!(serde_json::from_str::<DepthProfile>(r#"{"kind":"full"}"#).unwrap(), DepthProfile::Full);
        assert_eq!(p.tag(), "spec10x4");
    }
}
