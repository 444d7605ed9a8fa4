//! Discounted UCB per context bucket.
//!
//! Score = mean + `c` · σ̂ · sqrt(ln N / n), with N the bucket's discounted
//! pull count and σ̂ the arm's observed deviation floored at `noise_sd`
//! (scale-free exploration). Untried arms (n ≈ 0) are taken first, lowest
//! index first. Per-arm `σ̂/sqrt(n)` and the bucket's `sqrt(ln N)` are cached
//! on `update`, so `select` is a multiply-add and compare per arm.

use serde::{Deserialize, Serialize};

use crate::bandit::{
    bucket_of, check_shape, effective_mask, ArmId, ArmMask, BanditPolicy, ComputeBudget, Context, Discount,
    DiscountedStats,
};
use crate::error::TunerError;

/// Evidence below this counts as "untried".
const UNTRIED: f64 = 1e-3;

/// UCB settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UcbConfig {
    /// Number of arms (1..=64).
    pub arms: usize,
    /// Number of context buckets.
    pub buckets: usize,
    /// Exploration weight.
    pub c: f64,
    /// Floor on the per-observation deviation.
    pub noise_sd: f64,
    /// Forgetting per update in a bucket.
    pub discount: Discount,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl UcbConfig {
    /// Defaults: c = 1.5, noise floor 0.05, discount 0.995.
    pub fn new(arms: usize, buckets: usize) -> UcbConfig {
        UcbConfig {
            arms,
            buckets,
            c: 1.5,
            noise_sd: 0.05,
            discount: Discount::new(0.995).unwrap_or(Discount::NONE),
            budget: ComputeBudget::DEFAULT,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ArmState {
    stats: DiscountedStats,
    mean: f64,
    /// σ̂ / sqrt(n), or +inf when untried.
    width: f64,
}

/// Discounted UCB.
#[derive(Clone, Debug)]
pub struct Ucb {
    cfg: UcbConfig,
    arms: Vec<ArmState>,
    /// Per bucket: sqrt(ln N).
    log_total: Vec<f64>,
}

impl Ucb {
    /// A UCB policy (deterministic: no seed needed).
    pub fn new(cfg: UcbConfig) -> Result<Ucb, TunerError> {
        check_shape("Ucb", cfg.arms, cfg.buckets)?;
        if !(cfg.c >= 0.0 && cfg.noise_sd > 0.0) {
            return Err(TunerError::config("Ucb", "c must be >= 0 and noise_sd > 0"));
        }
        let u = Ucb {
            cfg,
            arms: vec![ArmState { width: f64::INFINITY, ..ArmState::default() }; cfg.arms * cfg.buckets],
            log_total: vec![0.0; cfg.buckets],
        };
        cfg.budget.check("Ucb", u.worst_case_ops())?;
        Ok(u)
    }
}

impl BanditPolicy for Ucb {
    fn arms(&self) -> usize {
        self.cfg.arms
    }

    #[inline]
    fn select(&mut self, ctx: &Context, eligible: ArmMask) -> ArmId {
        let b = bucket_of(ctx, self.cfg.buckets);
        let base = b * self.cfg.arms;
        let k = self.cfg.c * self.log_total[b];
        let mut best = ArmId(0);
        let mut best_v = f64::NEG_INFINITY;
        let mut m = effective_mask(eligible, self.cfg.arms).0;
        while m != 0 {
            let a = m.trailing_zeros() as usize;
            m &= m - 1;
            let s = &self.arms[base + a];
            if s.width.is_infinite() {
                return ArmId(a as u8);
            }
            let v = s.mean + k * s.width;
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
        let b = bucket_of(ctx, self.cfg.buckets);
        let base = b * self.cfg.arms;
        let g = self.cfg.discount.get();
        let floor = self.cfg.noise_sd * self.cfg.noise_sd;
        let mut total = 0.0;
        for i in base..base + self.cfg.arms {
            let s = &mut self.arms[i];
            s.stats.decay(g);
            if i == base + arm.index() {
                s.stats.push(reward);
            }
            total += s.stats.n;
            s.mean = s.stats.mean();
            s.width = if s.stats.n < UNTRIED { f64::INFINITY } else { (s.stats.var().max(floor) / s.stats.n).sqrt() };
        }
        self.log_total[b] = total.max(1.0).ln().sqrt();
    }

    fn worst_case_ops(&self) -> u64 {
        10 * self.cfg.arms as u64 + 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TunerRng;

    #[test]
    fn tries_every_arm_then_exploits() {
        let ctx = Context::bucketed(0.1, 0.0, 0.0, 0, 1);
        let mut u = Ucb::new(UcbConfig::new(4, 1)).unwrap();
        let means = [0.2, 0.7, 0.4, 0.1];
        let mut noise = TunerRng::seeded(1);
        let first: Vec<u8> = (0..4)
            .map(|_| {
                let a = u.select(&ctx, ArmMask::all(4));
                u.update(&ctx, a, means[a.index()]);
                a.0
            })
            .collect();
        assert_eq!(first, vec![0, 1, 2, 3]);
        let mut pulls = [0u32; 4];
        for _ in 0..2_000 {
            let a = u.select(&ctx, ArmMask::all(4));
            pulls[a.index()] += 1;
            u.update(&ctx, a, means[a.index()] + 0.1 * noise.normal());
        }
        assert!(pulls[1] > 1_400, "{pulls:?}");
    }

    #[test]
    fn buckets_are_independent() {
        let lo = Context::bucketed(0.1, 0.0, 0.0, 0, 2);
        let hi = Context::bucketed(0.9, 0.0, 0.0, 0, 2);
        let mut u = Ucb::new(UcbConfig::new(2, 2)).unwrap();
        for _ in 0..200 {
            for (ctx, best) in [(lo, 0usize), (hi, 1usize)] {
                let a = u.select(&ctx, ArmMask::all(2));
                u.update(&ctx, a, if a.index() == best { 1.0 } else { 0.0 });
            }
        }
        let mut wins = [0; 2];
        for _ in 0..20 {
            wins[0] += usize::from(u.select(&lo, ArmMask::all(2)).0 == 0);
            wins[1] += usize::from(u.select(&hi, ArmMask::all(2)).0 == 1);
        }
        assert_eq!(wins, [20, 20]);
    }
}
