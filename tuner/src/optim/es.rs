//! Evolution strategy with antithetic sampling and rank-based fitness shaping.
//!
//! Each generation draws `pairs` directions ε and asks `mean + σε` and
//! `mean − σε` (antithetic pairs cancel the even part of the noise). After
//! the whole population is told, fitnesses are replaced by centred rank
//! utilities (scale-free, robust to outliers) and the mean moves by
//! `lr · σ · Σ_p (u⁺_p − u⁻_p) ε_p / pairs`. σ decays geometrically to a
//! floor, so steps shrink as the search settles.

use serde::{Deserialize, Serialize};

use crate::bandit::ComputeBudget;
use crate::error::TunerError;
use crate::optim::{rank_utilities, sanitize, start_point, AskId, AskTell, Optimizer};
use crate::rng::TunerRng;

/// ES settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EsConfig {
    /// Dimension (1..=16).
    pub dim: usize,
    /// Antithetic pairs per generation (population = 2 · pairs).
    pub pairs: usize,
    /// Initial perturbation scale (cube units).
    pub sigma: f64,
    /// Floor of σ.
    pub sigma_min: f64,
    /// σ multiplier per generation.
    pub sigma_decay: f64,
    /// Learning rate (in units of σ).
    pub lr: f64,
    /// Start point (default: the centre).
    pub x0: Option<Vec<f64>>,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl EsConfig {
    /// Defaults: 8 pairs, σ 0.15 → 0.01 (×0.97 per generation), lr 2.
    pub fn new(dim: usize) -> EsConfig {
        EsConfig {
            dim,
            pairs: 8,
            sigma: 0.15,
            sigma_min: 0.01,
            sigma_decay: 0.97,
            lr: 2.0,
            x0: None,
            budget: ComputeBudget::DEFAULT,
        }
    }
}

/// The ES optimiser.
#[derive(Clone, Debug)]
pub struct Es {
    cfg: EsConfig,
    mean: Vec<f64>,
    eps: Vec<f64>,
    fitness: Vec<f64>,
    order: Vec<usize>,
    util: Vec<f64>,
    member: usize,
    sigma: f64,
    evals: u64,
    at: AskTell,
    rng: TunerRng,
}

impl Es {
    /// An ES optimiser seeded with `seed`.
    pub fn new(cfg: EsConfig, seed: u64) -> Result<Es, TunerError> {
        let mean = start_point("Es", cfg.dim, cfg.x0.as_deref())?;
        if cfg.pairs == 0
            || !(cfg.sigma > 0.0 && cfg.sigma_min > 0.0 && cfg.sigma_min <= cfg.sigma)
            || !(cfg.sigma_decay > 0.0 && cfg.sigma_decay <= 1.0 && cfg.lr > 0.0)
        {
            return Err(TunerError::config(
                "Es",
                "need pairs > 0, 0 < sigma_min <= sigma, 0 < sigma_decay <= 1, lr > 0",
            ));
        }
        let pop = 2 * cfg.pairs;
        let mut es = Es {
            eps: vec![0.0; cfg.pairs * cfg.dim],
            fitness: vec![0.0; pop],
            order: vec![0; pop],
            util: vec![0.0; pop],
            member: 0,
            sigma: cfg.sigma,
            evals: 0,
            at: AskTell::default(),
            rng: TunerRng::seeded(seed),
            mean,
            cfg,
        };
        es.cfg.budget.check("Es", es.worst_case_ops())?;
        es.draw();
        Ok(es)
    }

    fn draw(&mut self) {
        for e in &mut self.eps {
            *e = self.rng.normal();
        }
    }

    /// The current σ.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }
}

impl Optimizer for Es {
    fn dim(&self) -> usize {
        self.cfg.dim
    }

    fn ask(&mut self, x: &mut [f64]) -> AskId {
        let d = self.cfg.dim;
        let p = self.member / 2;
        let sign = if self.member.is_multiple_of(2) { 1.0 } else { -1.0 };
        let eps = &self.eps[p * d..p * d + d];
        for ((o, m), e) in x.iter_mut().zip(&self.mean).zip(eps) {
            *o = (m + sign * self.sigma * e).clamp(0.0, 1.0);
        }
        self.at.ask()
    }

    fn tell(&mut self, id: AskId, reward: f64) -> Result<(), TunerError> {
        self.at.tell(id)?;
        self.evals += 1;
        self.fitness[self.member] = sanitize(reward);
        self.member += 1;
        if self.member < self.fitness.len() {
            return Ok(());
        }
        self.member = 0;
        rank_utilities(&self.fitness, &mut self.order, &mut self.util);
        let d = self.cfg.dim;
        let k = self.cfg.lr * self.sigma / self.cfg.pairs as f64;
        for p in 0..self.cfg.pairs {
            let w = k * (self.util[2 * p] - self.util[2 * p + 1]);
            for (m, e) in self.mean.iter_mut().zip(&self.eps[p * d..p * d + d]) {
                *m += w * e;
            }
        }
        for m in &mut self.mean {
            *m = m.clamp(0.0, 1.0);
        }
        self.sigma = (self.sigma * self.cfg.sigma_decay).max(self.cfg.sigma_min);
        self.draw();
        Ok(())
    }

    fn incumbent(&self) -> &[f64] {
        &self.mean
    }

    fn evaluations(&self) -> u64 {
        self.evals
    }

    fn worst_case_ops(&self) -> u64 {
        // The generation's last tell: sort (p log p), update (p·d), redraw (p·d).
        let pop = 2 * self.cfg.pairs as u64;
        let d = self.cfg.dim as u64;
        pop * (64 - pop.leading_zeros() as u64) + 8 * pop * d + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testfn;

    #[test]
    fn climbs_a_noisy_bump() {
        for seed in 0..3 {
            let mut o = Es::new(EsConfig::new(4), seed).unwrap();
            let v = testfn::climb(&mut o, 200 + seed, 3_200);
            assert!(v > 0.97, "seed {seed}: {v}");
        }
    }

    #[test]
    fn nan_rewards_rank_last() {
        let mut o = Es::new(EsConfig::new(2), 1).unwrap();
        let mut x = [0.0; 2];
        for i in 0..16 {
            let id = o.ask(&mut x);
            o.tell(id, if i % 3 == 0 { f64::NAN } else { 1.0 }).unwrap();
        }
        assert!(o.incumbent().iter().all(|v| v.is_finite()));
    }
}
