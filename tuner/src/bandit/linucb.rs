//! Disjoint LinUCB over context [`Features`], with forgetting.
//!
//! Each arm fits a ridge regression of reward on the features (`A = λI +
//! Σ γ^age x xᵀ`, `b = Σ γ^age r x`) and scores `θᵀx + α sqrt(xᵀA⁻¹x)`.
//! `A⁻¹` is kept directly and updated by Sherman–Morrison (O(d²)).
//!
//! Forgetting multiplies every arm's `A` by γ per update, i.e. `A⁻¹` by
//! 1/γ: the estimate θ stays, only the confidence widens. The scaling is kept
//! lazily as one factor per arm (O(1) per arm per update), and θ is updated
//! in recursive-least-squares form (`θ += A⁻¹x (r − xᵀθ)` with the new
//! `A⁻¹`), so it never needs `b`. The factor is capped so that the
//! best-known direction returns to the prior's 1/λ and no further: a
//! long-unpulled arm regains (bounded) uncertainty instead of overflowing.

use serde::{Deserialize, Serialize};

use crate::bandit::{
    check_shape, effective_mask, ArmId, ArmMask, BanditPolicy, ComputeBudget, Context, Discount, FEATURE_DIM,
};
use crate::error::TunerError;

const D: usize = FEATURE_DIM;

/// LinUCB settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinUcbConfig {
    /// Number of arms (1..=64).
    pub arms: usize,
    /// Exploration weight α.
    pub alpha: f64,
    /// Ridge regularisation λ (> 0).
    pub lambda: f64,
    /// Forgetting per update.
    pub discount: Discount,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl LinUcbConfig {
    /// Defaults: α = 0.5, λ = 1, discount 0.995.
    pub fn new(arms: usize) -> LinUcbConfig {
        LinUcbConfig {
            arms,
            alpha: 0.5,
            lambda: 1.0,
            discount: Discount::new(0.995).unwrap_or(Discount::NONE),
            budget: ComputeBudget::DEFAULT,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct ArmModel {
    /// `A⁻¹ = s · m`.
    m: [f64; D * D],
    s: f64,
    /// Largest allowed `s` (keeps min diag(A⁻¹) ≤ 1/λ).
    cap: f64,
    /// Coefficient estimate.
    theta: [f64; D],
}

impl ArmModel {
    fn new(lambda: f64) -> ArmModel {
        let mut m = [0.0; D * D];
        for i in 0..D {
            m[i * D + i] = 1.0 / lambda;
        }
        ArmModel { m, s: 1.0, cap: 1.0, theta: [0.0; D] }
    }

    #[inline]
    fn score(&self, x: &[f64; D], alpha: f64) -> f64 {
        let mut q = 0.0;
        let mut p = 0.0;
        for i in 0..D {
            let row = &self.m[i * D..i * D + D];
            let mut mx = 0.0;
            for j in 0..D {
                mx += row[j] * x[j];
            }
            q += x[i] * mx;
            p += self.theta[i] * x[i];
        }
        p + alpha * (self.s * q).max(0.0).sqrt()
    }
}

/// Disjoint LinUCB.
#[derive(Clone, Debug)]
pub struct LinUcb {
    cfg: LinUcbConfig,
    models: Vec<ArmModel>,
}

impl LinUcb {
    /// A LinUCB policy (deterministic: ties go to the lowest index).
    pub fn new(cfg: LinUcbConfig) -> Result<LinUcb, TunerError> {
        check_shape("LinUcb", cfg.arms, 1)?;
        if !(cfg.alpha >= 0.0 && cfg.lambda > 0.0 && cfg.lambda.is_finite()) {
            return Err(TunerError::config("LinUcb", "alpha must be >= 0 and lambda > 0"));
        }
        let l = LinUcb { cfg, models: vec![ArmModel::new(cfg.lambda); cfg.arms] };
        cfg.budget.check("LinUcb", l.worst_case_ops())?;
        Ok(l)
    }

    /// The current coefficient estimate θ of `arm`.
    pub fn theta(&self, arm: ArmId) -> [f64; D] {
        self.models[arm.index()].theta
    }
}

impl BanditPolicy for LinUcb {
    fn arms(&self) -> usize {
        self.cfg.arms
    }

    fn select(&mut self, ctx: &Context, eligible: ArmMask) -> ArmId {
        let x = &ctx.features.0;
        let mut best = ArmId(0);
        let mut best_v = f64::NEG_INFINITY;
        let mut mask = effective_mask(eligible, self.cfg.arms).0;
        while mask != 0 {
            let a = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let v = self.models[a].score(x, self.cfg.alpha);
            if v > best_v {
                best_v = v;
                best = ArmId(a as u8);
            }
        }
        best
    }

    fn update(&mut self, ctx: &Context, arm: ArmId, reward: f64) {
        if !reward.is_finite() || arm.index() >= self.cfg.arms {
            return;
        }
        let g = self.cfg.discount.get();
        if g < 1.0 {
            for m in &mut self.models {
                m.s = (m.s / g).min(m.cap);
            }
        }
        let x = &ctx.features.0;
        let lambda = self.cfg.lambda;
        let m = &mut self.models[arm.index()];
        // Fold the lazy factor in, then Sherman–Morrison and the RLS step.
        for v in &mut m.m {
            *v *= m.s;
        }
        m.s = 1.0;
        let mut u = [0.0; D];
        for i in 0..D {
            for j in 0..D {
                u[i] += m.m[i * D + j] * x[j];
            }
        }
        let denom = 1.0 + x.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>();
        let err = reward - m.theta.iter().zip(x).map(|(t, x)| t * x).sum::<f64>();
        let mut mindiag = f64::INFINITY;
        for i in 0..D {
            m.theta[i] += u[i] / denom * err;
            for j in 0..D {
                m.m[i * D + j] -= u[i] * u[j] / denom;
            }
        }
        for i in 0..D {
            mindiag = mindiag.min(m.m[i * D + i]);
        }
        m.cap = if mindiag > 0.0 { (1.0 / (lambda * mindiag)).max(1.0) } else { 1.0 };
    }

    fn worst_case_ops(&self) -> u64 {
        let d = D as u64;
        let arms = self.cfg.arms as u64;
        // select: 2d² + 2d per arm; update: 2 per arm + 4d² for the pulled arm.
        (arms * (2 * d * d + 2 * d + 4)).max(2 * arms + 4 * d * d + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TunerRng;

    #[test]
    fn learns_a_context_dependent_best_arm() {
        // Arm 0 is better at low load, arm 1 at high load.
        let mut l = LinUcb::new(LinUcbConfig::new(2)).unwrap();
        let mut rng = TunerRng::seeded(3);
        let reward = |a: usize, load: f64| if a == 0 { 0.8 - 0.6 * load } else { 0.3 + 0.2 * load };
        for _ in 0..3_000 {
            let load = rng.uniform();
            let ctx = Context::bucketed(load, 0.5, 0.5, 0, 1);
            let a = l.select(&ctx, ArmMask::all(2));
            l.update(&ctx, a, reward(a.index(), load) + 0.05 * rng.normal());
        }
        let pred = |l: &LinUcb, a: u8, load: f64| {
            let x = Context::bucketed(load, 0.5, 0.5, 0, 1).features.0;
            l.theta(ArmId(a)).iter().zip(&x).map(|(t, x)| t * x).sum::<f64>()
        };
        for load in [0.1, 0.5, 0.95] {
            let want = (reward(0, load), reward(1, load));
            assert!((pred(&l, 0, load) - want.0).abs() < 0.1, "arm 0 at {load}");
            assert!((pred(&l, 1, load) - want.1).abs() < 0.1, "arm 1 at {load}");
        }
        let pick = |l: &mut LinUcb, load| l.select(&Context::bucketed(load, 0.5, 0.5, 0, 1), ArmMask::all(2)).0;
        assert_eq!(pick(&mut l, 0.1), 0);
        assert_eq!(pick(&mut l, 0.95), 1);
    }

    #[test]
    fn forgetting_is_bounded_by_the_prior() {
        let mut c = LinUcbConfig::new(2);
        c.discount = Discount::new(0.9).unwrap();
        let mut l = LinUcb::new(c).unwrap();
        let ctx = Context::bucketed(0.5, 0.5, 0.5, 0, 1);
        l.update(&ctx, ArmId(1), 1.0);
        for _ in 0..100_000 {
            l.update(&ctx, ArmId(0), 0.5);
        }
        let m = &l.models[1];
        let diag: Vec<f64> = (0..D).map(|i| m.s * m.m[i * D + i]).collect();
        assert!(diag.iter().all(|d| d.is_finite() && *d > 0.0), "{diag:?}");
        let min = diag.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(min <= 1.0 / c.lambda + 1e-9, "min diag {min}");
        // Forgetting widens confidence but keeps the estimate.
        assert!(l.theta(ArmId(1)).iter().any(|v| *v != 0.0));
        assert!(l.theta(ArmId(0)).iter().all(|v| v.is_finite()));
    }
}
