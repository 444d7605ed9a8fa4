//! PBT-lite: a small population, evaluated round-robin, that exploits and
//! explores between rounds.
//!
//! Each member holds a point and a smoothed score (exponential average of
//! its rewards, which damps noise). After every member has been told once
//! in a round, the bottom quartile copies a random top-quartile member
//! (point and score) and perturbs the point with Gaussian noise whose scale
//! decays per round. The incumbent is the member with the best smoothed score.

use serde::{Deserialize, Serialize};

use crate::bandit::ComputeBudget;
use crate::error::TunerError;
use crate::optim::{sanitize, start_point, AskId, AskTell, Optimizer};
use crate::rng::TunerRng;

/// PBT-lite settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PbtConfig {
    /// Dimension (1..=16).
    pub dim: usize,
    /// Members (≥ 4).
    pub population: usize,
    /// Initial perturbation scale (cube units).
    pub perturb: f64,
    /// Perturbation multiplier per round.
    pub perturb_decay: f64,
    /// Floor of the perturbation scale.
    pub perturb_min: f64,
    /// Weight of the newest reward in a member's score.
    pub score_weight: f64,
    /// Centre of the initial population (default: the cube's centre).
    pub x0: Option<Vec<f64>>,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl PbtConfig {
    /// Defaults: 8 members, perturbation 0.1 → 0.005 (×0.98 per round),
    /// score weight 0.5.
    pub fn new(dim: usize) -> PbtConfig {
        PbtConfig {
            dim,
            population: 8,
            perturb: 0.1,
            perturb_decay: 0.98,
            perturb_min: 0.005,
            score_weight: 0.5,
            x0: None,
            budget: ComputeBudget::DEFAULT,
        }
    }
}

/// The PBT-lite optimiser.
#[derive(Clone, Debug)]
pub struct Pbt {
    cfg: PbtConfig,
    points: Vec<f64>,
    scores: Vec<f64>,
    order: Vec<usize>,
    member: usize,
    round: u64,
    perturb: f64,
    best: usize,
    evals: u64,
    at: AskTell,
    rng: TunerRng,
}

impl Pbt {
    /// A PBT pool seeded with `seed`; members start scattered around `x0`.
    pub fn new(cfg: PbtConfig, seed: u64) -> Result<Pbt, TunerError> {
        let centre = start_point("Pbt", cfg.dim, cfg.x0.as_deref())?;
        if cfg.population < 4
            || !(cfg.perturb > 0.0 && cfg.perturb_min > 0.0 && cfg.perturb_min <= cfg.perturb)
            || !(cfg.perturb_decay > 0.0 && cfg.perturb_decay <= 1.0)
            || !(cfg.score_weight > 0.0 && cfg.score_weight <= 1.0)
        {
            return Err(TunerError::config(
                "Pbt",
                "need population >= 4, 0 < perturb_min <= perturb, decay and score weight in (0, 1]",
            ));
        }
        let mut rng = TunerRng::seeded(seed);
        let d = cfg.dim;
        let mut points = vec![0.0; cfg.population * d];
        for m in 0..cfg.population {
            for j in 0..d {
                let jitter = if m == 0 { 0.0 } else { 2.0 * cfg.perturb * rng.normal() };
                points[m * d + j] = (centre[j] + jitter).clamp(0.0, 1.0);
            }
        }
        let p = Pbt {
            points,
            scores: vec![f64::NEG_INFINITY; cfg.population],
            order: vec![0; cfg.population],
            member: 0,
            round: 0,
            perturb: cfg.perturb,
            best: 0,
            evals: 0,
            at: AskTell::default(),
            rng,
            cfg,
        };
        p.cfg.budget.check("Pbt", p.worst_case_ops())?;
        Ok(p)
    }

    fn end_round(&mut self) {
        let n = self.cfg.population;
        let d = self.cfg.dim;
        for (i, o) in self.order.iter_mut().enumerate() {
            *o = i;
        }
        let s = &self.scores;
        self.order.sort_unstable_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let q = (n / 4).max(1);
        for k in 0..q {
            let loser = self.order[n - 1 - k];
            let parent = self.order[self.rng.below(q)];
            self.scores[loser] = self.scores[parent];
            for j in 0..d {
                let v = self.points[parent * d + j] + self.perturb * self.rng.normal();
                self.points[loser * d + j] = v.clamp(0.0, 1.0);
            }
        }
        self.best = self.order[0];
        self.perturb = (self.perturb * self.cfg.perturb_decay).max(self.cfg.perturb_min);
        self.round += 1;
    }
}

impl Optimizer for Pbt {
    fn dim(&self) -> usize {
        self.cfg.dim
    }

    fn ask(&mut self, x: &mut [f64]) -> AskId {
        let d = self.cfg.dim;
        let m = self.member;
        for (o, v) in x.iter_mut().zip(&self.points[m * d..m * d + d]) {
            *o = *v;
        }
        self.at.ask()
    }

    fn tell(&mut self, id: AskId, reward: f64) -> Result<(), TunerError> {
        self.at.tell(id)?;
        self.evals += 1;
        let r = sanitize(reward);
        let s = &mut self.scores[self.member];
        *s = if s.is_finite() { (1.0 - self.cfg.score_weight) * *s + self.cfg.score_weight * r } else { r };
        self.member += 1;
        if self.member == self.cfg.population {
            self.member = 0;
            self.end_round();
        }
        Ok(())
    }

    fn incumbent(&self) -> &[f64] {
        let d = self.cfg.dim;
        &self.points[self.best * d..self.best * d + d]
    }

    fn evaluations(&self) -> u64 {
        self.evals
    }

    fn worst_case_ops(&self) -> u64 {
        let n = self.cfg.population as u64;
        n * (64 - n.leading_zeros() as u64) + 8 * n * self.cfg.dim as u64 + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testfn;

    #[test]
    fn improves_on_a_noisy_bump() {
        for seed in 0..3 {
            let mut o = Pbt::new(PbtConfig::new(4), seed).unwrap();
            let mut rng = TunerRng::seeded(400 + seed);
            let mut x = [0.0; 4];
            for _ in 0..3_200 {
                let id = o.ask(&mut x);
                o.tell(id, testfn::noisy(&x, &mut rng, 0.01)).unwrap();
            }
            let v = testfn::value(o.incumbent());
            assert!(v > 0.95, "seed {seed}: {v}");
        }
    }
}
