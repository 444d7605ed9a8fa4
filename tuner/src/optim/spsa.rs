//! SPSA: simultaneous-perturbation stochastic approximation (gradient ascent).
//!
//! Each iteration asks two points, `θ + c_k Δ` and `θ − c_k Δ` with Δ a
//! random ±1 vector, and steps `θ += a_k ĝ / s`, where
//! `ĝ_i = (y⁺ − y⁻) / (2 c_k Δ_i)` and `s` is a running RMS of `|ĝ_i|`
//! (so the step size is in cube units whatever the reward's scale). Gains
//! follow Spall's schedule: `a_k = a / (k + 1 + A)^0.602`,
//! `c_k = c / (k + 1)^0.101`. θ is kept inside the cube.

use serde::{Deserialize, Serialize};

use crate::bandit::ComputeBudget;
use crate::error::TunerError;
use crate::optim::{start_point, AskId, AskTell, Optimizer};
use crate::rng::TunerRng;

/// SPSA settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpsaConfig {
    /// Dimension (1..=16).
    pub dim: usize,
    /// Step gain `a` (cube units per normalised step).
    pub a: f64,
    /// Perturbation gain `c` (cube units).
    pub c: f64,
    /// Stability constant `A`.
    pub big_a: f64,
    /// Start point (default: the centre).
    pub x0: Option<Vec<f64>>,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl SpsaConfig {
    /// Defaults: a = 0.1, c = 0.1, A = 20.
    pub fn new(dim: usize) -> SpsaConfig {
        SpsaConfig { dim, a: 0.1, c: 0.1, big_a: 20.0, x0: None, budget: ComputeBudget::DEFAULT }
    }
}

/// The SPSA optimiser.
#[derive(Clone, Debug)]
pub struct Spsa {
    cfg: SpsaConfig,
    theta: Vec<f64>,
    delta: Vec<f64>,
    k: u64,
    plus_value: Option<f64>,
    asking_plus: bool,
    scale: f64,
    evals: u64,
    at: AskTell,
    rng: TunerRng,
}

impl Spsa {
    /// An SPSA optimiser seeded with `seed`.
    pub fn new(cfg: SpsaConfig, seed: u64) -> Result<Spsa, TunerError> {
        let theta = start_point("Spsa", cfg.dim, cfg.x0.as_deref())?;
        if !(cfg.a > 0.0 && cfg.c > 0.0 && cfg.c <= 0.5 && cfg.big_a >= 0.0) {
            return Err(TunerError::config("Spsa", "need a > 0, 0 < c <= 0.5, A >= 0"));
        }
        let mut s = Spsa {
            delta: vec![1.0; cfg.dim],
            theta,
            k: 0,
            plus_value: None,
            asking_plus: true,
            scale: 0.0,
            evals: 0,
            at: AskTell::default(),
            rng: TunerRng::seeded(seed),
            cfg,
        };
        cfg_check(&s)?;
        s.new_delta();
        Ok(s)
    }

    fn new_delta(&mut self) {
        for d in &mut self.delta {
            *d = self.rng.rademacher();
        }
    }

    fn gains(&self) -> (f64, f64) {
        let k = self.k as f64;
        (self.cfg.a / (k + 1.0 + self.cfg.big_a).powf(0.602), self.cfg.c / (k + 1.0).powf(0.101))
    }
}

fn cfg_check(s: &Spsa) -> Result<(), TunerError> {
    s.cfg.budget.check("Spsa", s.worst_case_ops())
}

impl Optimizer for Spsa {
    fn dim(&self) -> usize {
        self.cfg.dim
    }

    fn ask(&mut self, x: &mut [f64]) -> AskId {
        let (_, ck) = self.gains();
        let sign = if self.asking_plus { 1.0 } else { -1.0 };
        for ((o, t), d) in x.iter_mut().zip(&self.theta).zip(&self.delta) {
            *o = (t + sign * ck * d).clamp(0.0, 1.0);
        }
        self.at.ask()
    }

    fn tell(&mut self, id: AskId, reward: f64) -> Result<(), TunerError> {
        self.at.tell(id)?;
        self.evals += 1;
        if self.asking_plus {
            self.plus_value = Some(reward);
            self.asking_plus = false;
            return Ok(());
        }
        self.asking_plus = true;
        let (ak, ck) = self.gains();
        if let Some(yp) = self.plus_value.take() {
            let diff = (yp - reward) / (2.0 * ck);
            if diff.is_finite() {
                let mag = diff.abs();
                self.scale = if self.scale == 0.0 { mag } else { 0.9 * self.scale + 0.1 * mag };
                if self.scale > 0.0 {
                    let step = ak * diff / self.scale;
                    for (t, d) in self.theta.iter_mut().zip(&self.delta) {
                        // Δ_i = ±1, so 1/Δ_i = Δ_i.
                        *t = (*t + step * d).clamp(0.0, 1.0);
                    }
                }
            }
        }
        self.k += 1;
        self.new_delta();
        Ok(())
    }

    fn incumbent(&self) -> &[f64] {
        &self.theta
    }

    fn evaluations(&self) -> u64 {
        self.evals
    }

    fn worst_case_ops(&self) -> u64 {
        8 * self.cfg.dim as u64 + 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testfn;

    #[test]
    fn climbs_a_noisy_bump() {
        for seed in 0..3 {
            let mut o = Spsa::new(SpsaConfig::new(4), seed).unwrap();
            let v = testfn::climb(&mut o, 100 + seed, 3_000);
            assert!(v > 0.97, "seed {seed}: {v}");
        }
    }

    #[test]
    fn out_of_order_tell_is_refused() {
        let mut o = Spsa::new(SpsaConfig::new(2), 0).unwrap();
        let mut x = [0.0; 2];
        let id = o.ask(&mut x);
        assert!(o.tell(AskId(id.0 + 5), 1.0).is_err());
        assert!(o.tell(id, 1.0).is_ok());
    }
}
