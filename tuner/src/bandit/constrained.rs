//! Lexicographic, uncertainty-aware constraint filtering around any bandit.
//!
//! For each (bucket, arm) and each of up to [`MAX_CONSTRAINTS`] metrics
//! (e.g. window p99 latency, memory share) the wrapper keeps discounted
//! statistics and predicts the metric pessimistically:
//! `mean + z · σ̂ / sqrt(n)`. An arm whose prediction exceeds any limit is
//! **not eligible**; the inner policy maximises reward among the eligible.
//! If no allowed arm is eligible, the arm with the smallest worst
//! normalised prediction is chosen (`fallback = true`): violation is
//! minimised before reward is considered.
//!
//! Arms with less than `min_obs` of (discounted) evidence are *unknown*;
//! `explore_unknown` decides whether they may be tried. Below
//! `confident_obs` the prediction is optimistic (`mean − z·σ̂/sqrt(n)`): an
//! arm is excluded early only if it is clearly over a limit, and a single
//! unlucky observation cannot lock a good arm out. Because evidence
//! decays, an arm found infeasible becomes unknown again after a while and
//! is re-probed: that is how the wrapper notices that load dropped or a
//! variant was fixed. Behind the executor's canary such probes are cheap.

use serde::{Deserialize, Serialize};

use crate::bandit::{bucket_of, ArmId, ArmMask, BanditPolicy, ComputeBudget, Context, Discount, DiscountedStats};
use crate::error::TunerError;

/// The most constraints one wrapper tracks.
pub const MAX_CONSTRAINTS: usize = 4;

/// One constraint: predicted metric ≤ `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstraintSpec {
    /// The limit, in the metric's unit.
    pub limit: f64,
    /// Pessimism in standard errors (≥ 0).
    pub z: f64,
    /// Floor on the metric's per-observation deviation.
    pub noise_floor: f64,
}

/// Settings of the constraint tracker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstrainedConfig {
    /// The constraints (at most [`MAX_CONSTRAINTS`]).
    pub constraints: Vec<ConstraintSpec>,
    /// Number of context buckets.
    pub buckets: usize,
    /// Forgetting per update in a bucket.
    pub discount: Discount,
    /// Evidence below which an arm is unknown.
    pub min_obs: f64,
    /// Evidence from which predictions are pessimistic (`mean + z·se`); below
    /// it they are optimistic (`mean − z·se`), so one unlucky observation
    /// cannot lock a good arm out for the whole decay horizon, while an arm
    /// that is clearly over the limit is excluded after one look.
    pub confident_obs: f64,
    /// Whether unknown arms are eligible.
    pub explore_unknown: bool,
    /// Compute budget per decision, inner policy included.
    pub budget: ComputeBudget,
}

/// The outcome of a constrained selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The chosen arm.
    pub arm: ArmId,
    /// The arms that were eligible.
    pub eligible: ArmMask,
    /// No arm was eligible; the least-violating one was chosen.
    pub fallback: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tracked {
    stats: [DiscountedStats; MAX_CONSTRAINTS],
    known: bool,
}

/// A bandit with constraint filtering.
#[derive(Clone, Debug)]
pub struct Constrained<P: BanditPolicy> {
    inner: P,
    specs: [ConstraintSpec; MAX_CONSTRAINTS],
    k: usize,
    buckets: usize,
    discount: f64,
    min_obs: f64,
    confident_obs: f64,
    explore_unknown: bool,
    tracked: Vec<Tracked>,
    /// Per bucket: arms predicted feasible.
    feasible: Vec<u64>,
    /// Per bucket: arms with enough evidence.
    known: Vec<u64>,
}

impl<P: BanditPolicy> Constrained<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, cfg: &ConstrainedConfig) -> Result<Constrained<P>, TunerError> {
        let k = cfg.constraints.len();
        if k == 0 || k > MAX_CONSTRAINTS {
            return Err(TunerError::config("Constrained", format!("{k} constraints, need 1..={MAX_CONSTRAINTS}")));
        }
        if cfg.constraints.iter().any(|c| !(c.limit > 0.0 && c.limit.is_finite() && c.z >= 0.0 && c.noise_floor >= 0.0))
        {
            return Err(TunerError::config(
                "Constrained",
                "limits must be positive and finite, z and noise floors non-negative",
            ));
        }
        let bad_obs =
            cfg.min_obs.is_nan() || cfg.min_obs <= 0.0 || cfg.confident_obs.is_nan() || cfg.confident_obs < cfg.min_obs;
        if cfg.buckets == 0 || bad_obs {
            return Err(TunerError::config("Constrained", "need buckets > 0 and 0 < min_obs <= confident_obs"));
        }
        let mut specs = [cfg.constraints[0]; MAX_CONSTRAINTS];
        specs[..k].copy_from_slice(&cfg.constraints);
        let arms = inner.arms();
        let c = Constrained {
            inner,
            specs,
            k,
            buckets: cfg.buckets,
            discount: cfg.discount.get(),
            min_obs: cfg.min_obs,
            confident_obs: cfg.confident_obs,
            explore_unknown: cfg.explore_unknown,
            tracked: vec![Tracked::default(); arms * cfg.buckets],
            feasible: vec![0; cfg.buckets],
            known: vec![0; cfg.buckets],
        };
        cfg.budget.check("Constrained", c.worst_case_ops())?;
        Ok(c)
    }

    /// The wrapped policy.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Arms of `allowed` that are eligible in `ctx`.
    pub fn eligible(&self, ctx: &Context, allowed: ArmMask) -> ArmMask {
        let b = bucket_of(ctx, self.buckets);
        let all = ArmMask::all(self.inner.arms());
        let unknown = if self.explore_unknown { !self.known[b] } else { 0 };
        ArmMask((self.feasible[b] | unknown) & allowed.0 & all.0)
    }

    /// The prediction of constraint `k` eligibility is judged on, for `arm` in `ctx`
    /// (`None` while the arm is unknown).
    pub fn predicted(&self, ctx: &Context, arm: ArmId, k: usize) -> Option<f64> {
        let b = bucket_of(ctx, self.buckets);
        let t = self.tracked.get(b * self.inner.arms() + arm.index())?;
        if !t.known || k >= self.k {
            return None;
        }
        Some(self.pessimistic(&t.stats[k], &self.specs[k]))
    }

    /// The prediction eligibility is judged on: optimistic while evidence is
    /// below `confident_obs`, pessimistic after.
    #[inline]
    fn pessimistic(&self, s: &DiscountedStats, c: &ConstraintSpec) -> f64 {
        let var = s.var().max(c.noise_floor * c.noise_floor);
        let sign = if s.n < self.confident_obs { -1.0 } else { 1.0 };
        s.mean() + sign * c.z * (var / s.n).sqrt()
    }

    /// Picks an arm of `allowed` (empty = all): eligible first, then reward.
    pub fn select(&mut self, ctx: &Context, allowed: ArmMask) -> Selection {
        let allowed = if allowed.is_empty() { ArmMask::all(self.inner.arms()) } else { allowed };
        let eligible = self.eligible(ctx, allowed);
        if !eligible.is_empty() {
            return Selection { arm: self.inner.select(ctx, eligible), eligible, fallback: false };
        }
        let base = bucket_of(ctx, self.buckets) * self.inner.arms();
        let mut best = allowed.iter().next().unwrap_or(ArmId(0));
        let mut best_w = f64::INFINITY;
        for a in allowed.iter() {
            if let Some(t) = self.tracked.get(base + a.index()) {
                let w = self.worst(t);
                if w < best_w {
                    best_w = w;
                    best = a;
                }
            }
        }
        Selection { arm: best, eligible, fallback: true }
    }

    /// Records the reward and the constraint metrics (`metrics[k]` for
    /// constraint `k`; missing or non-finite entries are skipped).
    pub fn update(&mut self, ctx: &Context, arm: ArmId, reward: f64, metrics: &[f64]) {
        let arms = self.inner.arms();
        if arm.index() >= arms {
            return;
        }
        self.inner.update(ctx, arm, reward);
        let b = bucket_of(ctx, self.buckets);
        let base = b * arms;
        let (mut feasible, mut known) = (0u64, 0u64);
        let (k, discount, min_obs, confident) = (self.k, self.discount, self.min_obs, self.confident_obs);
        let specs = self.specs;
        for (a, t) in self.tracked[base..base + arms].iter_mut().enumerate() {
            for s in &mut t.stats[..k] {
                s.decay(discount);
            }
            t.known = t.stats[..k].iter().all(|s| s.n >= min_obs);
            if t.known {
                known |= 1 << a;
                if t.stats[..k].iter().zip(&specs[..k]).all(|(s, c)| within(s, c, confident)) {
                    feasible |= 1 << a;
                }
            }
        }
        // The pulled arm's new observation (after the decay, as the loop above
        // did for everyone), then its status again.
        let t = &mut self.tracked[base + arm.index()];
        for (s, m) in t.stats[..k].iter_mut().zip(metrics) {
            if m.is_finite() {
                s.push(*m);
            }
        }
        t.known = t.stats[..k].iter().all(|s| s.n >= min_obs);
        let bit = 1u64 << arm.index();
        known = if t.known { known | bit } else { known & !bit };
        let ok = t.known && t.stats[..k].iter().zip(&specs[..k]).all(|(s, c)| within(s, c, confident));
        feasible = if ok { feasible | bit } else { feasible & !bit };
        self.feasible[b] = feasible;
        self.known[b] = known;
    }

    /// Worst normalised prediction of a known arm (fallback ranking).
    fn worst(&self, t: &Tracked) -> f64 {
        if !t.known {
            return f64::INFINITY;
        }
        (0..self.k)
            .map(|k| self.pessimistic(&t.stats[k], &self.specs[k]) / self.specs[k].limit)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// Worst-case operations per decision, inner policy included.
    pub fn worst_case_ops(&self) -> u64 {
        self.inner.worst_case_ops() + (8 * self.k as u64 + 6) * self.inner.arms() as u64
    }
}

/// `prediction <= limit`, decided without a square root or a division
/// (this runs for every arm and constraint on every update).
///
/// With `L = n·limit − sum` (so `slack = L/n`) and the floored variance
/// `v = max((n·Σx² − sum²)/(n(n−1)), floor²)`, the width test
/// `slack² ≥ z²v/n` becomes `L²(n−1) ≥ z²·max(n·Σx² − sum², n(n−1)floor²)`
/// for `n > 1`, and `L² ≥ z²·n·floor²` for `n ≤ 1` (no variance yet).
#[inline]
fn within(s: &DiscountedStats, c: &ConstraintSpec, confident_obs: f64) -> bool {
    let n = s.n;
    let l = n * c.limit - s.sum;
    let z2 = c.z * c.z;
    let floor2 = c.noise_floor * c.noise_floor;
    let (lhs, rhs) = if n > 1.0 {
        let spread = (n * s.sum_sq - s.sum * s.sum).max(0.0);
        (l * l * (n - 1.0), z2 * spread.max(n * (n - 1.0) * floor2))
    } else {
        (l * l, z2 * n * floor2)
    };
    if n < confident_obs {
        // Optimistic: mean − w ≤ limit  ⟺  slack ≥ 0 or slack² ≤ w².
        l >= 0.0 || lhs <= rhs
    } else {
        // Pessimistic: mean + w ≤ limit  ⟺  slack ≥ 0 and slack² ≥ w².
        l >= 0.0 && lhs >= rhs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandit::{DiscountedStats, ThompsonConfig, ThompsonSampling};
    use crate::rng::TunerRng;

    fn cfg(limit: f64) -> ConstrainedConfig {
        ConstrainedConfig {
            constraints: vec![ConstraintSpec { limit, z: 1.0, noise_floor: 1.0 }],
            buckets: 1,
            discount: Discount::new(0.995).unwrap(),
            min_obs: 0.5,
            confident_obs: 0.5,
            explore_unknown: true,
            budget: ComputeBudget::DEFAULT,
        }
    }

    #[test]
    fn infeasible_best_reward_arm_is_avoided() {
        // Arm 2 has the best reward but latency 150 > 100.
        let rewards = [0.3, 0.5, 0.9];
        let latency = [50.0, 80.0, 150.0];
        let ts = ThompsonSampling::new(ThompsonConfig::new(3, 1), 1).unwrap();
        let mut c = Constrained::new(ts, &cfg(100.0)).unwrap();
        let ctx = Context::bucketed(0.5, 0.0, 0.0, 0, 1);
        let mut rng = TunerRng::seeded(2);
        let mut late = [0u32; 3];
        for i in 0..1_000 {
            let s = c.select(&ctx, ArmMask::all(3));
            assert!(!s.fallback);
            if i >= 500 {
                late[s.arm.index()] += 1;
            }
            let a = s.arm.index();
            c.update(&ctx, s.arm, rewards[a] + 0.05 * rng.normal(), &[latency[a] + 5.0 * rng.normal()]);
        }
        assert!(late[1] > 450, "{late:?}");
        assert!(late[2] < 10, "{late:?}");
        assert!(c.predicted(&ctx, ArmId(2), 0).unwrap() > 100.0);
    }

    #[test]
    fn fallback_picks_least_violating() {
        let ts = ThompsonSampling::new(ThompsonConfig::new(2, 1), 1).unwrap();
        let mut c = Constrained::new(ts, &cfg(10.0)).unwrap();
        let ctx = Context::bucketed(0.5, 0.0, 0.0, 0, 1);
        c.update(&ctx, ArmId(0), 1.0, &[50.0]);
        c.update(&ctx, ArmId(1), 0.0, &[20.0]);
        let s = c.select(&ctx, ArmMask::all(2));
        assert!(s.fallback);
        assert_eq!(s.arm, ArmId(1));
        assert!(s.eligible.is_empty());
    }

    #[test]
    fn optimistic_until_confident() {
        let ts = ThompsonSampling::new(ThompsonConfig::new(2, 1), 1).unwrap();
        let mut cfg = cfg(100.0);
        cfg.confident_obs = 3.0;
        cfg.constraints[0].noise_floor = 20.0;
        let mut c = Constrained::new(ts, &cfg).unwrap();
        let ctx = Context::bucketed(0.5, 0.0, 0.0, 0, 1);
        // One unlucky look at 110: optimistic 90 <= 100, still eligible.
        c.update(&ctx, ArmId(0), 1.0, &[110.0]);
        assert!(c.eligible(&ctx, ArmMask::all(2)).contains(ArmId(0)));
        // One look at 500: clearly over, excluded at once.
        c.update(&ctx, ArmId(1), 1.0, &[500.0]);
        assert!(!c.eligible(&ctx, ArmMask::all(2)).contains(ArmId(1)));
        // Confident and over: excluded.
        for _ in 0..5 {
            c.update(&ctx, ArmId(0), 1.0, &[110.0]);
        }
        assert!(!c.eligible(&ctx, ArmMask::all(2)).contains(ArmId(0)));
    }

    #[test]
    fn division_free_test_matches_the_formula() {
        let ts = ThompsonSampling::new(ThompsonConfig::new(2, 1), 1).unwrap();
        let mut cfg = cfg(100.0);
        cfg.confident_obs = 3.0;
        let c = Constrained::new(ts, &cfg).unwrap();
        let spec = ConstraintSpec { limit: 100.0, z: 1.5, noise_floor: 4.0 };
        let mut rng = TunerRng::seeded(9);
        for _ in 0..2_000 {
            let mut s = DiscountedStats::default();
            for _ in 0..1 + rng.below(8) {
                s.push(80.0 + 40.0 * rng.uniform());
            }
            s.decay(0.3 + 0.7 * rng.uniform());
            let pred = c.pessimistic(&s, &spec);
            if (pred - spec.limit).abs() > 1e-6 {
                assert_eq!(within(&s, &spec, 3.0), pred <= spec.limit, "{s:?} pred {pred}");
            }
        }
    }

    #[test]
    fn config_is_checked() {
        let ts = || ThompsonSampling::new(ThompsonConfig::new(2, 1), 1).unwrap();
        let mut c = cfg(10.0);
        c.constraints.clear();
        assert!(Constrained::new(ts(), &c).is_err());
        assert!(Constrained::new(ts(), &cfg(-1.0)).is_err());
        let mut c = cfg(10.0);
        c.confident_obs = 0.1;
        assert!(Constrained::new(ts(), &c).is_err());
        let mut c = cfg(10.0);
        c.min_obs = 0.0;
        assert!(Constrained::new(ts(), &c).is_err());
    }
}
