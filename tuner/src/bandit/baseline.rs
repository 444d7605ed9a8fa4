//! Baselines for the simulator: ε-greedy and uniform random.

use crate::bandit::{bucket_of, check_shape, effective_mask, ArmId, ArmMask, BanditPolicy, Context, DiscountedStats};
use crate::error::TunerError;
use crate::rng::TunerRng;

/// ε-greedy per context bucket (untried arms are tried first).
#[derive(Clone, Debug)]
pub struct EpsilonGreedy {
    arms: usize,
    buckets: usize,
    epsilon: f64,
    stats: Vec<DiscountedStats>,
    rng: TunerRng,
}

impl EpsilonGreedy {
    /// ε in [0, 1].
    pub fn new(arms: usize, buckets: usize, epsilon: f64, seed: u64) -> Result<Self, TunerError> {
        check_shape("EpsilonGreedy", arms, buckets)?;
        if !(0.0..=1.0).contains(&epsilon) {
            return Err(TunerError::OutOfRange { what: "epsilon", value: epsilon, lo: 0.0, hi: 1.0, unit: "" });
        }
        Ok(EpsilonGreedy {
            arms,
            buckets,
            epsilon,
            stats: vec![DiscountedStats::default(); arms * buckets],
            rng: TunerRng::seeded(seed),
        })
    }
}

fn random_in(rng: &mut TunerRng, m: ArmMask) -> ArmId {
    let k = rng.below(m.count() as usize);
    m.iter().nth(k).unwrap_or(ArmId(0))
}

impl BanditPolicy for EpsilonGreedy {
    fn arms(&self) -> usize {
        self.arms
    }

    fn select(&mut self, ctx: &Context, eligible: ArmMask) -> ArmId {
        let m = effective_mask(eligible, self.arms);
        if self.rng.bernoulli(self.epsilon) {
            return random_in(&mut self.rng, m);
        }
        let base = bucket_of(ctx, self.buckets) * self.arms;
        let mut best = ArmId(0);
        let mut best_v = f64::NEG_INFINITY;
        for a in m.iter() {
            let s = &self.stats[base + a.index()];
            if s.n == 0.0 {
                return a;
            }
            if s.mean() > best_v {
                best_v = s.mean();
                best = a;
            }
        }
        best
    }

    fn update(&mut self, ctx: &Context, arm: ArmId, reward: f64) {
        if reward.is_finite() && arm.index() < self.arms {
            let i = bucket_of(ctx, self.buckets) * self.arms + arm.index();
            self.stats[i].push(reward);
        }
    }

    fn worst_case_ops(&self) -> u64 {
        4 * self.arms as u64 + 8
    }
}

/// Picks uniformly among the eligible arms; learns nothing.
#[derive(Clone, Debug)]
pub struct UniformRandom {
    arms: usize,
    rng: TunerRng,
}

impl UniformRandom {
    /// A uniform policy over `arms` arms.
    pub fn new(arms: usize, seed: u64) -> Result<Self, TunerError> {
        check_shape("UniformRandom", arms, 1)?;
        Ok(UniformRandom { arms, rng: TunerRng::seeded(seed) })
    }
}

impl BanditPolicy for UniformRandom {
    fn arms(&self) -> usize {
        self.arms
    }

    fn select(&mut self, _ctx: &Context, eligible: ArmMask) -> ArmId {
        random_in(&mut self.rng, effective_mask(eligible, self.arms))
    }

    fn update(&mut self, _ctx: &Context, _arm: ArmId, _reward: f64) {}

    fn worst_case_ops(&self) -> u64 {
        self.arms as u64 + 4
    }
}
