//! SKUs: the name of the device a variant was measured on.
//!
//! A catalog entry is only served on the SKU it was measured on, because its
//! figures (and, for GPU kernel plans, its correctness) are per device. GPU
//! SKUs are the marketing names NVML reports (`NVIDIA H100 80GB HBM3`); CPU
//! SKUs are built from the architecture and the best SIMD level the running
//! CPU has (`cpu-x86_64-avx512`, `cpu-x86_64-avx2`, `cpu-aarch64-neon`), so two
//! machines that run the same kernels share figures.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A device name, as stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sku(String);

impl Sku {
    /// A SKU from its stored name (no check: names come from detection or a catalog).
    pub fn new(name: impl Into<String>) -> Self {
        Sku(name.into())
    }

    /// The SKU of the CPU this process runs on: `cpu-<arch>-<best SIMD level>`.
    pub fn detect_cpu() -> Self {
        Sku(format!("cpu-{}-{}", std::env::consts::ARCH, cpu_simd_level()))
    }

    /// A GPU SKU from the device name NVML reports (e.g. `NVIDIA H100 80GB HBM3`).
    pub fn gpu(name: &str) -> Self {
        Sku(name.trim().to_string())
    }

    /// Whether this is a CPU SKU.
    pub fn is_cpu(&self) -> bool {
        self.0.starts_with("cpu-")
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The best SIMD level of the running CPU, as our kernels distinguish them.
#[cfg(target_arch = "x86_64")]
fn cpu_simd_level() -> &'static str {
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
        "avx512"
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        "avx2"
    } else if std::arch::is_x86_feature_detected!("avx") {
        "avx"
    } else if std::arch::is_x86_feature_detected!("sse4.1") {
        "sse4"
    } else {
        "sse2"
    }
}

/// The best SIMD level of the running CPU, as our kernels distinguish them.
#[cfg(target_arch = "aarch64")]
fn cpu_simd_level() -> &'static str {
    if std::arch::is_aarch64_feature_detected!("sve") {
        "sve"
    } else {
        // NEON is part of the aarch64 baseline.
        "neon"
    }
}

/// The best SIMD level of the running CPU, as our kernels distinguish them.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_simd_level() -> &'static str {
    "scalar"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_sku_names_arch_and_simd_level() {
        let s = Sku::detect_cpu();
        assert!(s.is_cpu());
        let parts: Vec<&str> = s.as_str().splitn(3, '-').collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert_eq!(parts[1], std::env::consts::ARCH);
        assert!(!parts[2].is_empty());
        assert_eq!(Sku::detect_cpu(), s, "detection is stable");
    }

    #[test]
    fn gpu_sku_is_the_device_name_and_serializes_as_a_string() {
        let s = Sku::gpu(" NVIDIA H100 80GB HBM3 ");
        assert_eq!(s.as_str(), "NVIDIA H100 80GB HBM3");
        assert!(!s.is_cpu());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"NVIDIA H100 80GB HBM3\"");
    }
}
