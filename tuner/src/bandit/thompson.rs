//! Gaussian Thompson sampling per context bucket, with discounting.
//!
//! Each (bucket, arm) keeps discounted sufficient statistics; its posterior
//! over the mean reward is normal (conjugate prior `N(prior_mean,
//! prior_sd²)`, observation variance estimated per arm and floored at
//! `noise_sd²`). Posterior means and deviations are cached and refreshed on
//! `update`, so `select` is one normal draw and one fused multiply-add per
//! eligible arm.

use serde::{Deserialize, Serialize};

use crate::bandit::{
    bucket_of, check_shape, effective_mask, ArmId, ArmMask, BanditPolicy, ComputeBudget, Context, Discount,
    DiscountedStats,
};
use crate::error::TunerError;
use crate::rng::TunerRng;

/// Thompson sampling settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThompsonConfig {
    /// Number of arms (1..=64).
    pub arms: usize,
    /// Number of context buckets (bucket ids are folded modulo this).
    pub buckets: usize,
    /// Prior mean reward of an untried arm.
    pub prior_mean: f64,
    /// Prior deviation of the mean reward (larger explores more).
    pub prior_sd: f64,
    /// Floor on the per-observation noise deviation.
    pub noise_sd: f64,
    /// Forgetting per update in a bucket.
    pub discount: Discount,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl ThompsonConfig {
    /// Defaults for rewards of order one: prior N(0, 1), noise floor 0.05,
    /// discount 0.995.
    pub fn new(arms: usize, buckets: usize) -> ThompsonConfig {
        ThompsonConfig {
            arms,
            buckets,
            prior_mean: 0.0,
            prior_sd: 1.0,
            noise_sd: 0.05,
            discount: Discount::new(0.995).unwrap_or(Discount::NONE),
            budget: ComputeBudget::DEFAULT,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ArmState {
    stats: DiscountedStats,
    post_mean: f64,
    post_sd: f64,
}

/// Gaussian Thompson sampling.
#[derive(Clone, Debug)]
pub struct ThompsonSampling {
    cfg: ThompsonConfig,
    arms: Vec<ArmState>,
    rng: TunerRng,
}

impl ThompsonSampling {
    /// A sampler seeded with `seed`.
    pub fn new(cfg: ThompsonConfig, seed: u64) -> Result<ThompsonSampling, TunerError> {
        check_shape("ThompsonSampling", cfg.arms, cfg.buckets)?;
        if !(cfg.prior_sd > 0.0 && cfg.noise_sd > 0.0 && cfg.prior_mean.is_finite()) {
            return Err(TunerError::config(
                "ThompsonSampling",
                "prior_sd and noise_sd must be positive, prior_mean finite",
            ));
        }
        let mut t = ThompsonSampling {
            cfg,
            arms: vec![ArmState::default(); cfg.arms * cfg.buckets],
            rng: TunerRng::seeded(seed),
        };
        cfg.budget.check("ThompsonSampling", t.worst_case_ops())?;
        for i in 0..t.arms.len() {
            t.refresh(i);
        }
        Ok(t)
    }

    fn refresh(&mut self, i: usize) {
        let c = &self.cfg;
        let a = &mut self.arms[i];
        let (_, var) = a.stats.moments();
        let inv_noise = 1.0 / var.max(c.noise_sd * c.noise_sd);
        let prior_prec = 1.0 / (c.prior_sd * c.prior_sd);
        let inv_prec = 1.0 / (prior_prec + a.stats.n * inv_noise);
        a.post_mean = (c.prior_mean * prior_prec + a.stats.sum * inv_noise) * inv_prec;
        a.post_sd = inv_prec.sqrt();
    }

    /// Posterior mean and deviation of `arm` in `ctx`'s bucket.
    pub fn posterior(&self, ctx: &Context, arm: ArmId) -> (f64, f64) {
        let a = &self.arms[bucket_of(ctx, self.cfg.buckets) * self.cfg.arms + arm.index()];
        (a.post_mean, a.post_sd)
    }
}

impl BanditPolicy for ThompsonSampling {
    fn arms(&self) -> usize {
        self.cfg.arms
    }

    #[inline]
    fn select(&mut self, ctx: &Context, eligible: ArmMask) -> ArmId {
        let base = bucket_of(ctx, self.cfg.buckets) * self.cfg.arms;
        let mut best = ArmId(0);
        let mut best_v = f64::NEG_INFINITY;
        let mut m = effective_mask(eligible, self.cfg.arms).0;
        while m != 0 {
            let a = m.trailing_zeros() as usize;
            m &= m - 1;
            let s = &self.arms[base + a];
            let v = s.post_mean + s.post_sd * self.rng.normal();
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
        let base = bucket_of(ctx, self.cfg.buckets) * self.cfg.arms;
        let g = self.cfg.discount.get();
        for i in base..base + self.cfg.arms {
            self.arms[i].stats.decay(g);
        }
        self.arms[base + arm.index()].stats.push(reward);
        for i in base..base + self.cfg.arms {
            self.refresh(i);
        }
    }

    fn worst_case_ops(&self) -> u64 {
        // select: a normal draw (~4 ops) and a compare per arm; update: decay
        // and refresh (~12 ops) per arm.
        12 * self.cfg.arms as u64 + 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context::bucketed(0.2, 0.0, 0.0, 0, 1)
    }

    #[test]
    fn finds_the_best_arm() {
        let mut t = ThompsonSampling::new(ThompsonConfig::new(5, 1), 1).unwrap();
        let means = [0.1, 0.5, 0.3, 0.45, 0.2];
        let mut noise = TunerRng::seeded(2);
        let mut pulls = [0u32; 5];
        for _ in 0..2_000 {
            let a = t.select(&ctx(), ArmMask::all(5));
            pulls[a.index()] += 1;
            t.update(&ctx(), a, means[a.index()] + 0.1 * noise.normal());
        }
        assert!(pulls[1] > 1_200, "{pulls:?}");
    }

    #[test]
    fn respects_the_mask_and_is_deterministic() {
        let run = |seed| {
            let mut t = ThompsonSampling::new(ThompsonConfig::new(8, 2), seed).unwrap();
            (0..50)
                .map(|i| {
                    let a = t.select(&ctx(), ArmMask(0b1010_0000));
                    t.update(&ctx(), a, f64::from(i % 3));
                    a.0
                })
                .collect::<Vec<_>>()
        };
        let a = run(9);
        assert!(a.iter().all(|&x| x == 5 || x == 7));
        assert_eq!(a, run(9));
    }

    #[test]
    fn budget_is_enforced() {
        let mut c = ThompsonConfig::new(32, 1);
        c.budget = ComputeBudget(10);
        assert!(ThompsonSampling::new(c, 0).is_err());
    }

    #[test]
    fn discounting_tracks_a_swap() {
        let mut c = ThompsonConfig::new(2, 1);
        c.discount = Discount::new(0.98).unwrap();
        let mut t = ThompsonSampling::new(c, 4).unwrap();
        let mut noise = TunerRng::seeded(5);
        for phase in 0..2 {
            let means = if phase == 0 { [0.6, 0.4] } else { [0.4, 0.6] };
            let mut late = [0u32; 2];
            for i in 0..1_000 {
                let a = t.select(&ctx(), ArmMask::all(2));
                if i >= 800 {
                    late[a.index()] += 1;
                }
                t.update(&ctx(), a, means[a.index()] + 0.05 * noise.normal());
            }
            let best = if phase == 0 { 0 } else { 1 };
            assert!(late[best] > 160, "phase {phase}: {late:?}");
        }
    }
}
