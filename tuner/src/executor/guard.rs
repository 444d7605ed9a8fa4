//! The executor's fixed rules: allowlists, hard bounds, per-step deltas,
//! rate limits, the SLO and the canary plan.
//!
//! Purpose: a [`GuardConfig`] is everything the executor enforces that does
//! not change at run time. It is recorded in the audit log's genesis record,
//! so a replay runs under exactly the same rules.
//!
//! Usage: start from [`GuardConfig::new`] (every knob allowed on its full
//! domain, 10 % of the range per step, no rate limit, the default ramp) and
//! tighten fields; [`crate::executor::Executor::new`] calls
//! [`GuardConfig::check`].
//!
//! Invariants (checked): one [`KnobGuard`] per knob; hard bounds inside the
//! knob's domain with `lo <= hi`; positive finite deltas; canary steps
//! strictly increasing and ending at 100 %; in prod the ramp has at least two
//! steps and starts below 100 % (tier 2 reaches prod only through the canary).

use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::governance::{Constraints, Scope, TargetId};
use crate::knobs::{Domain, KnobId, KnobSpace, KnobValue, VariantId};
use crate::units::{CanaryFraction, Micros, Permille};

/// Per-knob rules.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnobGuard {
    /// Whether proposals may touch this knob at all.
    pub allowed: bool,
    /// Hard lower bound, in the knob's unit (ignored for categorical knobs).
    pub lo: f64,
    /// Hard upper bound, in the knob's unit (ignored for categorical knobs).
    pub hi: f64,
    /// Largest move per accepted change, in the knob's unit (ignored for
    /// categorical knobs, which move one option per change by construction).
    pub max_delta: f64,
    /// Shortest time between two changes of this knob reaching traffic.
    pub min_interval: Micros,
}

impl KnobGuard {
    /// Clamps a same-kind value into the hard bounds. Returns the value and
    /// whether it was clipped; `None` for NaN, infinities or a kind mismatch.
    pub(crate) fn clamp_bounds(&self, domain: Domain, v: KnobValue) -> Option<(KnobValue, bool)> {
        match (domain, v) {
            (Domain::Continuous { .. }, KnobValue::Continuous(x)) if x.is_finite() => {
                let c = x.clamp(self.lo, self.hi);
                Some((KnobValue::Continuous(c), c != x))
            }
            (Domain::Integer { .. }, KnobValue::Integer(x)) => {
                let c = x.clamp(self.lo.ceil() as i64, self.hi.floor() as i64);
                Some((KnobValue::Integer(c), c != x))
            }
            (Domain::Categorical { choices }, KnobValue::Categorical(c)) if c < choices => Some((v, false)),
            _ => None,
        }
    }

    /// Limits the move from `from` to `to` to `max_delta`. Returns the value
    /// and whether it was clipped.
    pub(crate) fn clip_delta(&self, from: KnobValue, to: KnobValue) -> (KnobValue, bool) {
        match (from, to) {
            (KnobValue::Continuous(a), KnobValue::Continuous(b)) => {
                let d = (b - a).clamp(-self.max_delta, self.max_delta);
                let c = a + d;
                // Keep the exact target when the move was within bounds.
                if c == b || (b - a).abs() <= self.max_delta {
                    (to, false)
                } else {
                    (KnobValue::Continuous(c), true)
                }
            }
            (KnobValue::Integer(a), KnobValue::Integer(b)) => {
                let m = self.max_delta.floor().max(1.0) as i64;
                let c = a + (b - a).clamp(-m, m);
                (KnobValue::Integer(c), c != b)
            }
            _ => (to, false),
        }
    }

    /// Whether `v` lies inside the hard bounds (categorical: always).
    pub(crate) fn within(&self, v: KnobValue) -> bool {
        match v {
            KnobValue::Continuous(x) => x >= self.lo && x <= self.hi,
            KnobValue::Integer(x) => (x as f64) >= self.lo && (x as f64) <= self.hi,
            KnobValue::Categorical(_) => true,
        }
    }
}

/// The service-level objective the executor enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slo {
    /// p99 time-to-first-token limit.
    pub ttft_p99: Micros,
    /// p99 inter-token latency limit.
    pub itl_p99: Micros,
    /// Highest acceptable error rate.
    pub max_error_rate: Permille,
    /// Highest acceptable device memory share.
    pub max_mem: Permille,
}

impl Slo {
    /// The stricter of this SLO and a proposal's declared constraints.
    pub fn tightened(&self, c: &Constraints) -> Slo {
        Slo {
            ttft_p99: c.ttft_p99.map_or(self.ttft_p99, |v| v.min(self.ttft_p99)),
            itl_p99: c.itl_p99.map_or(self.itl_p99, |v| v.min(self.itl_p99)),
            max_error_rate: c.max_error_rate.map_or(self.max_error_rate, |v| v.min(self.max_error_rate)),
            max_mem: c.max_mem.map_or(self.max_mem, |v| v.min(self.max_mem)),
        }
    }
}

/// The canary ramp and its confidence gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanaryPlan {
    /// Shares of new requests, strictly increasing, ending at 100 %.
    pub steps: Vec<CanaryFraction>,
    /// Clean windows required at each step before moving on.
    pub min_windows: u32,
    /// Canary requests required at each step before moving on.
    pub min_samples: u64,
}

impl Default for CanaryPlan {
    /// 5 % → 25 % → 50 % → 100 %, two clean windows and 200 requests per step.
    fn default() -> Self {
        let f = |p| CanaryFraction::new(p).unwrap_or(CanaryFraction::FULL);
        CanaryPlan { steps: vec![f(50), f(250), f(500), CanaryFraction::FULL], min_windows: 2, min_samples: 200 }
    }
}

/// Everything the executor enforces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    /// The environment this executor guards.
    pub scope: Scope,
    /// The deployment it guards.
    pub target: TargetId,
    /// The knobs.
    pub space: KnobSpace,
    /// One guard per knob, in knob order.
    pub knobs: Vec<KnobGuard>,
    /// Variants proposals may switch to.
    pub variants: Vec<VariantId>,
    /// Shortest time between two variant changes reaching traffic.
    pub variant_min_interval: Micros,
    /// The SLO.
    pub slo: Slo,
    /// The ramp.
    pub canary: CanaryPlan,
    /// Telemetry older than this is stale: hold and keep the baseline.
    pub stale_after: Micros,
    /// How much a window must show before it counts as a breach.
    pub evidence: Evidence,
}

/// How much evidence one window needs before it counts as a breach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Requests a cohort needs in the window before its latency quantiles
    /// count (a p99 over three requests is noise, not evidence).
    pub min_samples: u64,
    /// Errors a cohort needs in the window before its error rate counts (one
    /// error among fifteen canary requests is not a 6 % error rate).
    pub min_errors: u64,
}

impl Default for Evidence {
    /// 20 requests, 3 errors.
    fn default() -> Self {
        Evidence { min_samples: 20, min_errors: 3 }
    }
}

impl GuardConfig {
    /// Permissive defaults over `space`: every knob allowed on its whole
    /// domain, 10 % of the range per step, no rate limit, the default ramp,
    /// telemetry stale after 30 s, default [`Evidence`].
    pub fn new(scope: Scope, target: TargetId, space: KnobSpace, slo: Slo) -> GuardConfig {
        let knobs = space
            .specs()
            .iter()
            .map(|s| {
                let (lo, hi) = match s.domain {
                    Domain::Continuous { lo, hi } => (lo, hi),
                    Domain::Integer { lo, hi } => (lo as f64, hi as f64),
                    Domain::Categorical { choices } => (0.0, f64::from(choices - 1)),
                };
                KnobGuard { allowed: true, lo, hi, max_delta: ((hi - lo) * 0.1).max(1e-9), min_interval: Micros(0) }
            })
            .collect();
        GuardConfig {
            scope,
            target,
            space,
            knobs,
            variants: Vec::new(),
            variant_min_interval: Micros(0),
            slo,
            canary: CanaryPlan::default(),
            stale_after: Micros::from_secs(30),
            evidence: Evidence::default(),
        }
    }

    /// The guard of knob `id`.
    pub fn knob(&self, id: KnobId) -> Option<&KnobGuard> {
        self.knobs.get(id.index())
    }

    /// Mutable guard of knob `id`.
    pub fn knob_mut(&mut self, id: KnobId) -> Option<&mut KnobGuard> {
        self.knobs.get_mut(id.index())
    }

    /// Whether `v` may be switched to.
    pub fn variant_allowed(&self, v: VariantId) -> bool {
        self.variants.contains(&v)
    }

    /// Checks the invariants listed in the module docs.
    pub fn check(&self) -> Result<(), TunerError> {
        let bad = |why: String| Err(TunerError::config("GuardConfig", why));
        if self.knobs.len() != self.space.len() {
            return bad(format!("{} knob guards for {} knobs", self.knobs.len(), self.space.len()));
        }
        for (g, s) in self.knobs.iter().zip(self.space.specs()) {
            let (dlo, dhi) = match s.domain {
                Domain::Continuous { lo, hi } => (lo, hi),
                Domain::Integer { lo, hi } => (lo as f64, hi as f64),
                Domain::Categorical { .. } => continue,
            };
            if !(g.lo.is_finite() && g.hi.is_finite() && dlo <= g.lo && g.lo <= g.hi && g.hi <= dhi) {
                return bad(format!("knob {:?}: hard bounds outside its domain", s.name));
            }
            if !(g.max_delta.is_finite() && g.max_delta > 0.0) {
                return bad(format!("knob {:?}: max_delta must be positive", s.name));
            }
        }
        let steps = &self.canary.steps;
        if steps.is_empty() || steps.last() != Some(&CanaryFraction::FULL) {
            return bad("canary ramp must end at 100 %".into());
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return bad("canary ramp must be strictly increasing".into());
        }
        if steps.len() > usize::from(u8::MAX) {
            return bad("canary ramp too long".into());
        }
        if self.scope == Scope::Prod && (steps.len() < 2 || steps[0].is_full()) {
            return bad("prod changes must ramp through a partial canary".into());
        }
        if self.canary.min_windows == 0 {
            return bad("canary min_windows must be at least 1".into());
        }
        if self.stale_after.0 == 0 {
            return bad("stale_after must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo() -> Slo {
        Slo {
            ttft_p99: Micros::from_millis(500),
            itl_p99: Micros::from_millis(50),
            max_error_rate: Permille::new(10).unwrap(),
            max_mem: Permille::new(900).unwrap(),
        }
    }

    fn guard(scope: Scope) -> GuardConfig {
        GuardConfig::new(scope, TargetId(0), KnobSpace::unit_cube(2).unwrap(), slo())
    }

    #[test]
    fn defaults_pass_check() {
        assert!(guard(Scope::Prod).check().is_ok());
    }

    #[test]
    fn prod_requires_partial_canary() {
        let mut g = guard(Scope::Prod);
        g.canary.steps = vec![CanaryFraction::FULL];
        assert!(g.check().is_err());
        g.scope = Scope::Sandbox;
        assert!(g.check().is_ok());
    }

    #[test]
    fn ramp_must_increase_and_end_full() {
        let mut g = guard(Scope::Staging);
        let f = |p| CanaryFraction::new(p).unwrap();
        g.canary.steps = vec![f(500), f(250), CanaryFraction::FULL];
        assert!(g.check().is_err());
        g.canary.steps = vec![f(50), f(500)];
        assert!(g.check().is_err());
    }

    #[test]
    fn bounds_and_deltas_checked() {
        let mut g = guard(Scope::Staging);
        g.knobs[0].hi = 2.0;
        assert!(g.check().is_err());
        let mut g = guard(Scope::Staging);
        g.knobs[1].max_delta = 0.0;
        assert!(g.check().is_err());
        let mut g = guard(Scope::Staging);
        g.knobs.pop();
        assert!(g.check().is_err());
    }

    #[test]
    fn clip_delta_and_bounds() {
        let g = KnobGuard { allowed: true, lo: 0.2, hi: 0.8, max_delta: 0.1, min_interval: Micros(0) };
        let dom = Domain::Continuous { lo: 0.0, hi: 1.0 };
        assert_eq!(g.clamp_bounds(dom, KnobValue::Continuous(0.9)), Some((KnobValue::Continuous(0.8), true)));
        assert_eq!(g.clamp_bounds(dom, KnobValue::Continuous(f64::NAN)), None);
        let (v, clipped) = g.clip_delta(KnobValue::Continuous(0.5), KnobValue::Continuous(0.8));
        assert!(clipped);
        assert!((v.as_f64() - 0.6).abs() < 1e-12);
        let (v, clipped) = g.clip_delta(KnobValue::Continuous(0.5), KnobValue::Continuous(0.55));
        assert_eq!((v, clipped), (KnobValue::Continuous(0.55), false));
        let gi = KnobGuard { max_delta: 2.5, ..g };
        assert_eq!(gi.clip_delta(KnobValue::Integer(10), KnobValue::Integer(3)), (KnobValue::Integer(8), true));
    }

    #[test]
    fn slo_tightens_never_loosens() {
        let c = Constraints {
            ttft_p99: Some(Micros::from_millis(900)),
            itl_p99: Some(Micros::from_millis(20)),
            ..Constraints::default()
        };
        let t = slo().tightened(&c);
        assert_eq!(t.ttft_p99, Micros::from_millis(500));
        assert_eq!(t.itl_p99, Micros::from_millis(20));
    }
}
