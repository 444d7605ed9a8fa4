//! Tier 2, continuous knobs: derivative-free optimisers with an ask/tell API.
//!
//! Purpose: tune a vector of continuous knobs from noisy rewards, one
//! candidate at a time (each candidate becomes a proposal that the executor
//! canaries). All work in the unit cube `[0, 1]^dim`; map to knob values with
//! [`crate::KnobSpace::patch_from_unit`]. Implementations: [`Spsa`]
//! (simultaneous-perturbation gradient ascent), [`Es`] (evolution strategy
//! with antithetic sampling and rank shaping), [`CmaEs`] (small-dimension
//! CMA-ES, written here: the crates available pull in a linear-algebra
//! stack and allocate per generation), and [`Pbt`] (a PBT-lite pool:
//! exploit the top quartile, explore by perturbation).
//!
//! Usage: `let id = opt.ask(&mut x); ... opt.tell(id, reward)?`. Rewards are
//! maximised. Every `ask` must be told before the next `ask`
//! ([`crate::TunerError::AskTellMismatch`] otherwise). A non-finite reward
//! counts as the worst possible outcome (SPSA skips the step).
//!
//! Invariants: deterministic under a seed; points asked are always inside
//! the unit cube; `ask` and `tell` do not allocate after construction; each
//! optimiser's worst-case operations per decision are checked against its
//! [`crate::bandit::ComputeBudget`] at construction.

mod cmaes;
mod es;
mod pbt;
mod spsa;

pub use cmaes::{CmaEs, CmaEsConfig};
pub use es::{Es, EsConfig};
pub use pbt::{Pbt, PbtConfig};
pub use spsa::{Spsa, SpsaConfig};

use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::knobs::MAX_KNOBS;

/// Identifies one `ask` so its `tell` can be matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AskId(pub u64);

/// A derivative-free maximiser over the unit cube.
pub trait Optimizer {
    /// Number of coordinates.
    fn dim(&self) -> usize;
    /// Writes the next candidate into `x[..dim]` (inside [0, 1]).
    fn ask(&mut self, x: &mut [f64]) -> AskId;
    /// Reports the reward of the candidate `id`.
    fn tell(&mut self, id: AskId, reward: f64) -> Result<(), TunerError>;
    /// The current best guess (for SPSA/ES/CMA-ES the search mean).
    fn incumbent(&self) -> &[f64];
    /// Candidates evaluated so far.
    fn evaluations(&self) -> u64;
    /// Worst-case operations of one `ask` or `tell`.
    fn worst_case_ops(&self) -> u64;
}

/// Outstanding-ask bookkeeping shared by the optimisers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AskTell {
    next: u64,
    outstanding: Option<u64>,
}

impl AskTell {
    /// Issues an id; an unanswered previous ask is abandoned.
    pub fn ask(&mut self) -> AskId {
        let id = self.next;
        self.next += 1;
        self.outstanding = Some(id);
        AskId(id)
    }

    /// Checks `id` is the outstanding ask and clears it.
    pub fn tell(&mut self, id: AskId) -> Result<(), TunerError> {
        match self.outstanding {
            Some(o) if o == id.0 => {
                self.outstanding = None;
                Ok(())
            }
            o => Err(TunerError::AskTellMismatch { expected: o.unwrap_or(u64::MAX), got: id.0 }),
        }
    }
}

/// Checks a dimension and an optional start point; returns the start point
/// (default: the cube's centre).
pub(crate) fn start_point(what: &'static str, dim: usize, x0: Option<&[f64]>) -> Result<Vec<f64>, TunerError> {
    if dim == 0 || dim > MAX_KNOBS {
        return Err(TunerError::config(what, format!("dim {dim}, need 1..={MAX_KNOBS}")));
    }
    match x0 {
        None => Ok(vec![0.5; dim]),
        Some(x) if x.len() == dim && x.iter().all(|v| (0.0..=1.0).contains(v)) => Ok(x.to_vec()),
        Some(_) => Err(TunerError::config(what, "x0 must have dim entries in [0, 1]")),
    }
}

/// Maps non-finite rewards to the worst value.
#[inline]
pub(crate) fn sanitize(r: f64) -> f64 {
    if r.is_nan() {
        f64::NEG_INFINITY
    } else {
        r
    }
}

/// Ranks `fitness` (descending) into `order` and writes centred utilities in
/// [-0.5, 0.5] into `util` (best gets 0.5). Allocation-free.
pub(crate) fn rank_utilities(fitness: &[f64], order: &mut [usize], util: &mut [f64]) {
    let n = fitness.len();
    for (i, o) in order.iter_mut().enumerate().take(n) {
        *o = i;
    }
    order[..n].sort_unstable_by(|&a, &b| fitness[b].total_cmp(&fitness[a]).then(a.cmp(&b)));
    let denom = (n.max(2) - 1) as f64;
    for (rank, &i) in order[..n].iter().enumerate() {
        util[i] = 0.5 - rank as f64 / denom;
    }
}

#[cfg(test)]
pub(crate) mod testfn {
    //! A noisy smooth test surface for the optimisers' unit tests.
    use crate::rng::TunerRng;

    /// `exp(-Σ 4 (x - x*)²)` with optimum 1 at `x* = 0.3 + 0.4 i/(d-1)`.
    pub fn value(x: &[f64]) -> f64 {
        let d = x.len();
        let s: f64 = x
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let o = 0.3 + 0.4 * i as f64 / (d.max(2) - 1) as f64;
                4.0 * (v - o) * (v - o)
            })
            .sum();
        (-s).exp()
    }

    pub fn noisy(x: &[f64], rng: &mut TunerRng, sd: f64) -> f64 {
        value(x) + sd * rng.normal()
    }

    /// Runs `evals` ask/tell rounds of `o` on the noisy 4-d surface (noise
    /// seed `noise_seed`), checking every candidate stays in the unit box,
    /// and returns the surface's value at the incumbent.
    pub fn climb(o: &mut impl super::Optimizer, noise_seed: u64, evals: usize) -> f64 {
        let mut rng = TunerRng::seeded(noise_seed);
        let mut x = [0.0; 4];
        for _ in 0..evals {
            let id = o.ask(&mut x);
            assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
            o.tell(id, noisy(&x, &mut rng, 0.01)).unwrap();
        }
        value(o.incumbent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ask_tell_matching() {
        let mut at = AskTell::default();
        assert!(at.tell(AskId(0)).is_err());
        let a = at.ask();
        assert!(at.tell(AskId(a.0 + 1)).is_err());
        assert!(at.tell(a).is_ok());
        assert!(at.tell(a).is_err());
    }

    #[test]
    fn utilities_rank_descending() {
        let f = [0.1, f64::NEG_INFINITY, 0.9, 0.5];
        let mut order = [0; 4];
        let mut u = [0.0; 4];
        rank_utilities(&f, &mut order, &mut u);
        assert_eq!(order, [2, 3, 0, 1]);
        assert_eq!(u[2], 0.5);
        assert_eq!(u[1], -0.5);
    }

    #[test]
    fn start_point_checked() {
        assert!(start_point("t", 0, None).is_err());
        assert!(start_point("t", 17, None).is_err());
        assert!(start_point("t", 2, Some(&[0.5, 1.5])).is_err());
        assert_eq!(start_point("t", 2, None).unwrap(), vec![0.5, 0.5]);
    }
}
