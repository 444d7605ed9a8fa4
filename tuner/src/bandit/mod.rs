//! Tier 2, discrete choices: contextual bandits.
//!
//! Purpose: pick one of up to [`MAX_ARMS`] arms (variants, or discrete knob
//! presets) per decision, from rewards observed per context. Implementations:
//! [`ThompsonSampling`] and [`Ucb`] keep per-(context bucket, arm)
//! statistics; [`LinUcb`] models reward as linear in the context
//! [`Features`]; [`Constrained`] wraps any of them with lexicographic,
//! uncertainty-aware constraint filtering (an arm predicted to break a limit
//! is not eligible; among the eligible, maximise reward). [`EpsilonGreedy`]
//! and [`UniformRandom`] are baselines for the simulator.
//!
//! Usage: `select(&ctx, mask)` then, once the outcome is known,
//! `update(&ctx, arm, reward)`. The chosen arm becomes a [`crate::Patch`] in
//! a proposal; policies never change serving state themselves.
//!
//! Invariants: deterministic under a seed; `select` and `update` do not
//! allocate (all tables are sized at construction) and do bounded work,
//! checked against a [`ComputeBudget`] at construction. Drift is handled by
//! exponential discounting ([`Discount`]): every update in a bucket decays
//! that bucket's statistics, so evidence has a half-life and unpulled arms
//! regain uncertainty.

mod baseline;
mod constrained;
mod linucb;
mod stats;
mod thompson;
mod ucb;

pub use baseline::{EpsilonGreedy, UniformRandom};
pub use constrained::{Constrained, ConstrainedConfig, ConstraintSpec, Selection, MAX_CONSTRAINTS};
pub use linucb::{LinUcb, LinUcbConfig};
pub use thompson::{ThompsonConfig, ThompsonSampling};
pub use ucb::{Ucb, UcbConfig};

pub(crate) use stats::DiscountedStats;

use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::telemetry::ContextBucket;

/// The most arms a bandit may have (arm sets are `u64` bitmasks).
pub const MAX_ARMS: usize = 64;

/// Number of context features, including the bias term.
pub const FEATURE_DIM: usize = 6;

/// An arm index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ArmId(pub u8);

impl ArmId {
    /// As an index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A set of arms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArmMask(pub u64);

impl ArmMask {
    /// Arms `0..n`.
    pub fn all(n: usize) -> ArmMask {
        if n >= 64 {
            ArmMask(u64::MAX)
        } else {
            ArmMask((1u64 << n) - 1)
        }
    }

    /// Whether `a` is in the set.
    pub fn contains(self, a: ArmId) -> bool {
        a.0 < 64 && self.0 & (1u64 << a.0) != 0
    }

    /// Adds `a`.
    pub fn insert(&mut self, a: ArmId) {
        if a.0 < 64 {
            self.0 |= 1u64 << a.0;
        }
    }

    /// Removes `a`.
    pub fn remove(&mut self, a: ArmId) {
        if a.0 < 64 {
            self.0 &= !(1u64 << a.0);
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of arms.
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }

    /// Intersection.
    pub fn and(self, o: ArmMask) -> ArmMask {
        ArmMask(self.0 & o.0)
    }

    /// The arms in increasing order.
    pub fn iter(self) -> impl Iterator<Item = ArmId> {
        let mut m = self.0;
        std::iter::from_fn(move || {
            if m == 0 {
                None
            } else {
                let a = m.trailing_zeros() as u8;
                m &= m - 1;
                Some(ArmId(a))
            }
        })
    }
}

/// Context features: `[1, load, load², batch, prompt, device]`, each input
/// clamped to [0, 2] (NaN reads as 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Features(pub [f64; FEATURE_DIM]);

impl Features {
    /// Features from normalised load (1 = nominal capacity), batch size and
    /// prompt length (fractions of their maxima) and a device class in [0, 1].
    pub fn new(load: f64, batch: f64, prompt: f64, device: f64) -> Features {
        let c = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 2.0) };
        let load = c(load);
        Features([1.0, load, load * load, c(batch), c(prompt), c(device)])
    }
}

/// What a bandit conditions on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// The discretised context (per-bucket statistics).
    pub bucket: ContextBucket,
    /// The continuous context (linear models).
    pub features: Features,
}

impl Context {
    /// A context whose bucket is the load level (`load_levels` equal bins
    /// over [0, 1], the top bin open-ended) times the device class.
    pub fn bucketed(load: f64, batch: f64, prompt: f64, device: u16, load_levels: u16) -> Context {
        let levels = load_levels.max(1);
        let l = if load.is_nan() { 0.0 } else { load.max(0.0) };
        let level = ((l * f64::from(levels)) as u16).min(levels - 1);
        Context {
            bucket: ContextBucket(level + levels * device),
            features: Features::new(load, batch, prompt, f64::from(device.min(1))),
        }
    }
}

/// Exponential discount per update: 1.0 is stationary, 0.99 gives evidence
/// a half-life of about 69 updates in its bucket. Range (0.5, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Discount(f64);

impl Discount {
    /// No forgetting.
    pub const NONE: Discount = Discount(1.0);

    /// A discount factor in (0.5, 1].
    pub fn new(gamma: f64) -> Result<Discount, TunerError> {
        if !(gamma > 0.5 && gamma <= 1.0) {
            return Err(TunerError::OutOfRange {
                what: "Discount",
                value: gamma,
                lo: 0.5,
                hi: 1.0,
                unit: "per update",
            });
        }
        Ok(Discount(gamma))
    }

    /// The factor.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// Worst-case work per decision, in abstract operations (about one
/// floating-point operation or one random draw each). Policies compute
/// their worst case at construction and refuse budgets they cannot meet, so
/// a decision's cost is known before it is ever made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeBudget(pub u64);

impl ComputeBudget {
    /// A generous default: one million operations (about a millisecond).
    pub const DEFAULT: ComputeBudget = ComputeBudget(1_000_000);

    /// Errors if `needed` exceeds this budget.
    pub fn check(self, policy: &'static str, needed: u64) -> Result<(), TunerError> {
        if needed > self.0 {
            return Err(TunerError::OverBudget { policy, needed, budget: self.0 });
        }
        Ok(())
    }
}

/// A discrete-choice policy.
pub trait BanditPolicy {
    /// Number of arms.
    fn arms(&self) -> usize;
    /// Picks an arm from `eligible` (an empty mask means "any arm").
    fn select(&mut self, ctx: &Context, eligible: ArmMask) -> ArmId;
    /// Records the reward of `arm` in `ctx`.
    fn update(&mut self, ctx: &Context, arm: ArmId, reward: f64);
    /// Worst-case operations of one `select` or `update`.
    fn worst_case_ops(&self) -> u64;
}

/// Validates the shared shape arguments of per-bucket policies.
pub(crate) fn check_shape(what: &'static str, arms: usize, buckets: usize) -> Result<(), TunerError> {
    if arms == 0 || arms > MAX_ARMS {
        return Err(TunerError::config(what, format!("{arms} arms, need 1..={MAX_ARMS}")));
    }
    if buckets == 0 || buckets > usize::from(u16::MAX) {
        return Err(TunerError::config(what, format!("{buckets} context buckets")));
    }
    Ok(())
}

/// The mask to select from: `eligible` restricted to `0..arms`, or every
/// arm if that is empty.
#[inline]
pub(crate) fn effective_mask(eligible: ArmMask, arms: usize) -> ArmMask {
    let m = eligible.and(ArmMask::all(arms));
    if m.is_empty() {
        ArmMask::all(arms)
    } else {
        m
    }
}

/// The bucket index of `ctx`, folded into `0..buckets`.
#[inline]
pub(crate) fn bucket_of(ctx: &Context, buckets: usize) -> usize {
    usize::from(ctx.bucket.0) % buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_ops() {
        let mut m = ArmMask::all(5);
        assert_eq!(m.count(), 5);
        m.remove(ArmId(2));
        assert_eq!(m.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        assert!(!m.contains(ArmId(2)));
        assert_eq!(ArmMask::all(64).count(), 64);
        assert_eq!(effective_mask(ArmMask(0), 3), ArmMask(0b111));
        assert_eq!(effective_mask(ArmMask(0b1000), 3), ArmMask(0b111));
    }

    #[test]
    fn discount_range_checked() {
        assert!(Discount::new(1.0).is_ok());
        assert!(Discount::new(0.5).is_err());
        assert!(Discount::new(1.01).is_err());
        assert!(Discount::new(f64::NAN).is_err());
    }

    #[test]
    fn context_buckets() {
        assert_eq!(Context::bucketed(0.1, 0.0, 0.0, 0, 4).bucket.0, 0);
        assert_eq!(Context::bucketed(0.6, 0.0, 0.0, 0, 4).bucket.0, 2);
        assert_eq!(Context::bucketed(3.0, 0.0, 0.0, 1, 4).bucket.0, 7);
        let f = Context::bucketed(f64::NAN, 0.5, 9.0, 1, 4).features;
        assert_eq!(f.0, [1.0, 0.0, 0.0, 0.5, 2.0, 1.0]);
    }

    #[test]
    fn budget_refuses_overruns() {
        assert!(ComputeBudget(10).check("x", 11).is_err());
        assert!(ComputeBudget(10).check("x", 10).is_ok());
    }
}
