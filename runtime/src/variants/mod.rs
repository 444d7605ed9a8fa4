//! Variants of a base model: building quantized artifacts
//! (`arqon variants build`), loading catalog entries with every check serving
//! needs ([`load_variant`]), the quality proxy ([`quality`]), and per-SKU
//! figures (`arqon bench variants`).
//!
//! The catalog's format and invariants live in [`arqon_variants::catalog`];
//! this module is the part that needs the model.

pub mod bench;
pub mod build;
pub mod cli;
pub mod kernels;
pub mod load;
pub mod quality;
pub mod requant;

pub use bench::{bench_variants, BenchOptions, BenchRow};
pub use build::{build_variants, write_artifact, BuildOptions};
pub use load::{load_variant, load_variant_with, LoadPolicy, LoadedVariant};
pub use requant::load_requantized;

/// The current UTC time as RFC 3339 (`2026-12-01T06:00:00Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the Unix epoch as RFC 3339 UTC (Howard Hinnant's civil-from-days).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_108_400), "2026-12-01T07:00:00Z");
    }
}
