//! The vocabulary of Arqon Serve's variants: how a model's weights are stored
//! (quantization), its depth profiles, the [`catalog`] of approved variants
//! with their artifacts, kernel plans and measured figures, and the [`sku`]
//! they were measured on. Pure Rust: no candle, so the tuner and tools can read
//! a catalog without the runtime.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod catalog;
pub mod depth;
pub mod sku;
pub mod slot;

pub use catalog::{
    verify_artifact, AdapterRef, Artifact, BaseModel, Catalog, CatalogError, Figures, KernelPlan, Quality, SpeedPoint,
    Status, VariantEntry,
};
pub use depth::{BadDepthSpec, DepthError, DepthProfile};
pub use sku::Sku;

use std::fmt;
use std::str::FromStr;

/// How a variant's weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 with one f16 scale (GGML `Q8_0`).
    Q8_0,
    /// 4-bit blocks of 32 with one f16 scale (GGML `Q4_0`).
    Q4_0,
    /// 4-bit blocks of 32 with an f16 scale and minimum (GGML `Q4_1`).
    Q4_1,
    /// Another GGML block format (k-quants and friends), named as GGML names it.
    Other,
}

impl Quantization {
    /// Bits stored per weight, block overhead included (for memory estimates).
    pub fn bits_per_weight(self) -> f32 {
        match self {
            Quantization::F32 => 32.0,
            Quantization::F16 | Quantization::Bf16 => 16.0,
            Quantization::Q8_0 => 8.5,
            Quantization::Q4_0 => 4.5,
            Quantization::Q4_1 => 5.0,
            Quantization::Other => 8.0,
        }
    }

    /// The canonical short name (`q4_1`).
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::Bf16 => "bf16",
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q4_1 => "q4_1",
            Quantization::Other => "other",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quantization name that Arqon does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown quantization {0:?} (expected one of f32, f16, bf16, q8_0, q4_0, q4_1)")]
pub struct UnknownQuantization(pub String);

impl FromStr for Quantization {
    type Err = UnknownQuantization;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Quantization::F32,
            "f16" => Quantization::F16,
            "bf16" => Quantization::Bf16,
            "q8_0" | "q8" => Quantization::Q8_0,
            "q4_0" | "q4" => Quantization::Q4_0,
            "q4_1" => Quantization::Q4_1,
            _ => return Err(UnknownQuantization(s.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for q in [
            Quantization::F32,
            Quantization::F16,
            Quantization::Bf16,
            Quantization::Q8_0,
            Quantization::Q4_0,
            Quantization::Q4_1,
        ] {
            assert_eq!(q.as_str().parse::<Quantization>().unwrap(), q);
            let json = serde_json::to_string(&q).unwrap();
            assert_eq!(serde_json::from_str::<Quantization>(&json).unwrap(), q);
        }
        assert!("q3_z".parse::<Quantization>().is_err());
    }

    #[test]
    fn smaller_formats_use_fewer_bits() {
        assert!(Quantization::Q4_0.bits_per_weight() < Quantization::Q8_0.bits_per_weight());
        assert!(Quantization::Q8_0.bits_per_weight() < Quantization::F16.bits_per_weight());
    }
}
