//! Flags of the variant slot, the admin API and the guardrail executor, and
//! the validated [`TuningConfig`] built from them (part of [`super::ServeConfig`]).
//!
//! Parse, don't validate: every value is checked once here; the executor's
//! own `GuardConfig::check` runs on the result before serving starts, so an
//! inconsistent rule set (say, a one-step canary in prod) fails at start with
//! a clear message, never later.

use std::path::PathBuf;

use arqon_tuner::executor::{CanaryPlan, Evidence, GuardConfig, Slo};
use arqon_tuner::governance::{Scope, TargetId};
use arqon_tuner::serving::serving_space;
use arqon_tuner::units::{CanaryFraction, Micros, Permille};
use arqon_tuner::VariantId;
use arqon_variants::DepthProfile;

use crate::error::{Error, Result};

/// Flags for variants, the admin API and the executor.
#[derive(clap::Args, Debug, Clone)]
pub struct TuningArgs {
    /// A variant catalog (its `catalog.json`, or the folder holding it): serve its approved
    /// entries for this machine's SKU instead of `--model` alone.
    #[arg(long, env = "ARQON_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// The variant to serve at start (a catalog id; default: the catalog's default).
    #[arg(long, env = "ARQON_VARIANT")]
    pub variant: Option<String>,
    /// Depth profile of the model served without a catalog: `full`, `exit:K`,
    /// `calm:K:THRESHOLD` or `spec:K:D` (self-speculative, greedy requests only;
    /// others run at full depth). Catalog variants carry their own.
    #[arg(long, env = "ARQON_DEPTH", default_value = "full")]
    pub depth: DepthProfile,
    /// Memory budget for loaded variants in MiB (the active one, warm standbys, and retired ones still draining).
    #[arg(long, env = "ARQON_VARIANT_MEMORY_MB", default_value_t = 4096)]
    pub variant_memory_mb: u64,
    /// Bearer token for /admin routes (separate from --api-key); without it the admin API answers 403.
    #[arg(long, env = "ARQON_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The executor's audit log (JSON lines, hash-chained); an existing log is recovered by replay.
    /// Default: a new file under $ARQON_HOME/audit/.
    #[arg(long, env = "ARQON_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Scope the executor guards: prod, staging or sandbox (prod requires a canary of two steps or more).
    #[arg(long, env = "ARQON_TUNER_SCOPE", default_value = "prod")]
    pub tuner_scope: String,
    /// Canary ramp: shares of new requests in permille, increasing, ending at 1000.
    #[arg(long, env = "ARQON_CANARY_STEPS", value_delimiter = ',', default_value = "50,250,500,1000")]
    pub canary_steps: Vec<u16>,
    /// Clean telemetry windows each canary step needs before the next.
    #[arg(long, env = "ARQON_CANARY_MIN_WINDOWS", default_value_t = 2)]
    pub canary_min_windows: u32,
    /// Canary requests each step needs before the next.
    #[arg(long, env = "ARQON_CANARY_MIN_SAMPLES", default_value_t = 20)]
    pub canary_min_samples: u64,
    /// Telemetry window in milliseconds (the executor judges one window at a time).
    #[arg(long, env = "ARQON_TELEMETRY_WINDOW_MS", default_value_t = 1000)]
    pub telemetry_window_ms: u64,
    /// SLO: p99 time to first token, ms.
    #[arg(long, env = "ARQON_SLO_TTFT_P99_MS", default_value_t = 10_000)]
    pub slo_ttft_p99_ms: u64,
    /// SLO: p99 inter-token latency, ms.
    #[arg(long, env = "ARQON_SLO_ITL_P99_MS", default_value_t = 1_000)]
    pub slo_itl_p99_ms: u64,
    /// SLO: highest error rate, permille.
    #[arg(long, env = "ARQON_SLO_MAX_ERROR_PERMILLE", default_value_t = 50)]
    pub slo_max_error_permille: u16,
    /// SLO: highest share of device memory in use, permille (on the CPU: this process's RSS of installed RAM).
    #[arg(long, env = "ARQON_SLO_MAX_MEM_PERMILLE", default_value_t = 950)]
    pub slo_max_mem_permille: u16,
    /// Shortest time between two variant changes reaching traffic, seconds.
    #[arg(long, env = "ARQON_VARIANT_MIN_INTERVAL_S", default_value_t = 0)]
    pub variant_min_interval_s: u64,
}

/// The validated tuning configuration.
#[derive(Debug, Clone)]
pub struct TuningConfig {
    /// The catalog file, if serving one.
    pub catalog: Option<PathBuf>,
    /// The variant to start on.
    pub variant: Option<String>,
    /// Depth of the model served without a catalog.
    pub depth: DepthProfile,
    /// Variant memory budget, bytes.
    pub memory_budget: u64,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// Audit log path, if given.
    pub audit_log: Option<PathBuf>,
    /// Telemetry window.
    pub window: Micros,
    /// The executor's rules, with an empty variant allowlist: [`TuningConfig::guard`]
    /// fills it once the servable variants are known.
    guard: GuardConfig,
}

impl TuningArgs {
    /// Checks every flag.
    pub fn into_config(self) -> Result<TuningConfig> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        let scope = match self.tuner_scope.as_str() {
            "prod" => Scope::Prod,
            "staging" => Scope::Staging,
            "sandbox" => Scope::Sandbox,
            s => return bad(format!("--tuner-scope must be prod, staging or sandbox, got {s:?}")),
        };
        if !(10..=600_000).contains(&self.telemetry_window_ms) {
            return bad(format!(
                "--telemetry-window-ms must be between 10 and 600000, got {}",
                self.telemetry_window_ms
            ));
        }
        if matches!(&self.admin_token, Some(t) if t.is_empty()) {
            return bad("--admin-token must not be empty".into());
        }
        if self.variant_memory_mb == 0 || self.variant_memory_mb > 1 << 24 {
            return bad(format!(
                "--variant-memory-mb must be between 1 and {}, got {}",
                1u64 << 24,
                self.variant_memory_mb
            ));
        }
        let permille = |flag: &str, v: u16| {
            Permille::new(v).map_err(|_| Error::InvalidRequest(format!("{flag} must be between 0 and 1000, got {v}")))
        };
        let steps = self
            .canary_steps
            .iter()
            .map(|&p| {
                CanaryFraction::new(p).map_err(|_| {
                    Error::InvalidRequest(format!("--canary-steps: {p} is not a share in permille (1..=1000)"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ms = |v: u64| Micros(v.saturating_mul(1000));
        let slo = Slo {
            ttft_p99: ms(self.slo_ttft_p99_ms),
            itl_p99: ms(self.slo_itl_p99_ms),
            max_error_rate: permille("--slo-max-error-permille", self.slo_max_error_permille)?,
            max_mem: permille("--slo-max-mem-permille", self.slo_max_mem_permille)?,
        };
        let window = ms(self.telemetry_window_ms);
        let mut guard = GuardConfig::new(scope, TargetId(0), serving_space(), slo);
        // Serving applies variant changes; it does not read knob values from
        // the executor yet, so no proposal may move a knob.
        for k in &mut guard.knobs {
            k.allowed = false;
        }
        guard.variant_min_interval = Micros(self.variant_min_interval_s.saturating_mul(1_000_000));
        guard.canary = CanaryPlan { steps, min_windows: self.canary_min_windows, min_samples: self.canary_min_samples };
        // Stale after ten silent windows, and never sooner than 30 s.
        guard.stale_after = Micros((window.0 * 10).max(30_000_000));
        guard.evidence = Evidence::default();
        let mut probe = guard.clone();
        probe.variants = vec![VariantId(0)];
        if let Err(e) = probe.check() {
            return bad(format!("the canary and SLO flags are inconsistent: {e}"));
        }
        let catalog = self.catalog.map(|c| if c.is_dir() { c.join("catalog.json") } else { c });
        Ok(TuningConfig {
            catalog,
            variant: self.variant,
            depth: self.depth,
            memory_budget: self.variant_memory_mb << 20,
            admin_token: self.admin_token,
            audit_log: self.audit_log,
            window,
            guard,
        })
    }
}

impl TuningConfig {
    /// The executor's rules for `variants` servable variants (ids `0..variants`).
    pub fn guard(&self, variants: usize) -> GuardConfig {
        let mut g = self.guard.clone();
        g.variants = (0..variants.min(usize::from(u16::MAX))).map(|i| VariantId(i as u16)).collect();
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TuningArgs,
    }

    fn parse(args: &[&str]) -> Result<TuningConfig> {
        Cli::parse_from(std::iter::once("serve").chain(args.iter().copied())).args.into_config()
    }

    #[test]
    fn defaults_give_a_valid_prod_guard() {
        let c = parse(&[]).unwrap();
        let g = c.guard(3);
        assert_eq!(g.scope, Scope::Prod);
        assert_eq!(g.variants.len(), 3);
        assert!(g.knobs.iter().all(|k| !k.allowed));
        assert!(g.check().is_ok());
    }

    #[test]
    fn a_one_step_canary_is_refused_in_prod_but_not_in_staging() {
        let e = parse(&["--canary-steps", "1000"]).unwrap_err().to_string();
        assert!(e.contains("inconsistent"), "{e}");
        assert!(parse(&["--canary-steps", "1000", "--tuner-scope", "staging"]).is_ok());
    }

    #[test]
    fn bad_flags_are_named() {
        for (args, name) in [
            (&["--tuner-scope", "qa"][..], "--tuner-scope"),
            (&["--telemetry-window-ms", "1"][..], "--telemetry-window-ms"),
            (&["--slo-max-mem-permille", "2000"][..], "--slo-max-mem-permille"),
            (&["--canary-steps", "0,1000"][..], "--canary-steps"),
            (&["--admin-token", ""][..], "--admin-token"),
            (&["--variant-memory-mb", "0"][..], "--variant-memory-mb"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(name), "{args:?}: {e}");
        }
    }
}
