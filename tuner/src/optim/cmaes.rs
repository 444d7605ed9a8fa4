//! A small-dimension CMA-ES (μ/μ_w, λ) following Hansen's tutorial
//! (arXiv:1604.00772), with cumulative step-size adaptation, rank-one and
//! rank-μ covariance updates, and a cyclic Jacobi eigensolver.
//!
//! Written here rather than taken from a crate: the available ones pull in
//! a linear-algebra stack and allocate per generation, and at dimension ≤ 16
//! the whole algorithm fits in a few hundred lines with preallocated buffers.
//! Bounds are handled by repair: a sample is clipped into the cube and the
//! clipped point (not the raw sample) feeds the update.

use serde::{Deserialize, Serialize};

use crate::bandit::ComputeBudget;
use crate::error::TunerError;
use crate::optim::{sanitize, start_point, AskId, AskTell, Optimizer};
use crate::rng::TunerRng;

/// Jacobi sweeps per eigendecomposition (quadratic convergence: plenty).
const MAX_SWEEPS: usize = 12;

/// CMA-ES settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CmaEsConfig {
    /// Dimension (1..=16).
    pub dim: usize,
    /// Initial step size (cube units).
    pub sigma0: f64,
    /// Population size (default `4 + ⌊3 ln dim⌋`).
    pub lambda: Option<usize>,
    /// Start point (default: the centre).
    pub x0: Option<Vec<f64>>,
    /// Compute budget per decision.
    pub budget: ComputeBudget,
}

impl CmaEsConfig {
    /// Defaults: σ₀ = 0.2, default λ.
    pub fn new(dim: usize) -> CmaEsConfig {
        CmaEsConfig { dim, sigma0: 0.2, lambda: None, x0: None, budget: ComputeBudget::DEFAULT }
    }
}

/// The CMA-ES optimiser.
#[derive(Clone, Debug)]
pub struct CmaEs {
    n: usize,
    lambda: usize,
    mu: usize,
    weights: Vec<f64>,
    mueff: f64,
    cc: f64,
    cs: f64,
    c1: f64,
    cmu: f64,
    damps: f64,
    chi_n: f64,
    mean: Vec<f64>,
    old_mean: Vec<f64>,
    sigma: f64,
    c: Vec<f64>,
    b: Vec<f64>,
    d: Vec<f64>,
    pc: Vec<f64>,
    ps: Vec<f64>,
    y: Vec<f64>,
    x: Vec<f64>,
    fitness: Vec<f64>,
    order: Vec<usize>,
    tmp: Vec<f64>,
    tmp2: Vec<f64>,
    work: Vec<f64>,
    member: usize,
    gen: u64,
    evals: u64,
    budget: ComputeBudget,
    at: AskTell,
    rng: TunerRng,
}

impl CmaEs {
    /// A CMA-ES optimiser seeded with `seed`.
    pub fn new(cfg: CmaEsConfig, seed: u64) -> Result<CmaEs, TunerError> {
        let mean = start_point("CmaEs", cfg.dim, cfg.x0.as_deref())?;
        let n = cfg.dim;
        let nf = n as f64;
        let lambda = cfg.lambda.unwrap_or(4 + (3.0 * nf.ln()).floor() as usize).max(4);
        if !(cfg.sigma0 > 0.0 && cfg.sigma0 <= 1.0) || lambda > 256 {
            return Err(TunerError::config("CmaEs", "need 0 < sigma0 <= 1 and lambda <= 256"));
        }
        let mu = lambda / 2;
        let mut weights: Vec<f64> = (0..mu).map(|i| (mu as f64 + 0.5).ln() - ((i + 1) as f64).ln()).collect();
        let s: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 5.0);
        let c1 = 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        let damps = 1.0 + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + cs;
        let chi_n = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf));
        let mut eye = vec![0.0; n * n];
        for i in 0..n {
            eye[i * n + i] = 1.0;
        }
        let es = CmaEs {
            n,
            lambda,
            mu,
            weights,
            mueff,
            cc,
            cs,
            c1,
            cmu,
            damps,
            chi_n,
            old_mean: mean.clone(),
            mean,
            sigma: cfg.sigma0,
            c: eye.clone(),
            b: eye,
            d: vec![1.0; n],
            pc: vec![0.0; n],
            ps: vec![0.0; n],
            y: vec![0.0; lambda * n],
            x: vec![0.0; lambda * n],
            fitness: vec![0.0; lambda],
            order: vec![0; lambda],
            tmp: vec![0.0; n],
            tmp2: vec![0.0; n],
            work: vec![0.0; n * n],
            member: 0,
            gen: 0,
            evals: 0,
            budget: cfg.budget,
            at: AskTell::default(),
            rng: TunerRng::seeded(seed),
        };
        es.budget.check("CmaEs", es.worst_case_ops())?;
        Ok(es)
    }

    /// The current step size.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Population size.
    pub fn lambda(&self) -> usize {
        self.lambda
    }

    fn update(&mut self) {
        let n = self.n;
        for (i, o) in self.order.iter_mut().enumerate() {
            *o = i;
        }
        let f = &self.fitness;
        self.order.sort_unstable_by(|&a, &b| f[b].total_cmp(&f[a]).then(a.cmp(&b)));
        self.old_mean.copy_from_slice(&self.mean);
        self.mean.iter_mut().for_each(|m| *m = 0.0);
        for k in 0..self.mu {
            let i = self.order[k];
            for j in 0..n {
                self.mean[j] += self.weights[k] * self.x[i * n + j];
            }
        }
        // y_w = (m - m_old) / σ, then C^{-1/2} y_w = B D⁻¹ Bᵀ y_w.
        for j in 0..n {
            self.tmp[j] = (self.mean[j] - self.old_mean[j]) / self.sigma;
        }
        for i in 0..n {
            let mut acc = 0.0;
            for j in 0..n {
                acc += self.b[j * n + i] * self.tmp[j];
            }
            self.tmp2[i] = acc / self.d[i];
        }
        let k_s = (self.cs * (2.0 - self.cs) * self.mueff).sqrt();
        let mut ps_norm2 = 0.0;
        for i in 0..n {
            let mut acc = 0.0;
            for j in 0..n {
                acc += self.b[i * n + j] * self.tmp2[j];
            }
            self.ps[i] = (1.0 - self.cs) * self.ps[i] + k_s * acc;
            ps_norm2 += self.ps[i] * self.ps[i];
        }
        let ps_norm = ps_norm2.sqrt();
        let denom = (1.0 - (1.0 - self.cs).powf(2.0 * (self.gen + 1) as f64)).sqrt();
        let hsig = ps_norm / denom / self.chi_n < 1.4 + 2.0 / (n as f64 + 1.0);
        let hs = if hsig { 1.0 } else { 0.0 };
        let k_c = (self.cc * (2.0 - self.cc) * self.mueff).sqrt();
        for i in 0..n {
            self.pc[i] = (1.0 - self.cc) * self.pc[i] + hs * k_c * self.tmp[i];
        }
        let decay = 1.0 - self.c1 - self.cmu;
        let correction = (1.0 - hs) * self.cc * (2.0 - self.cc);
        for r in 0..n {
            for col in 0..=r {
                let mut rank_mu = 0.0;
                for k in 0..self.mu {
                    let i = self.order[k];
                    rank_mu += self.weights[k] * self.y[i * n + r] * self.y[i * n + col];
                }
                let old = self.c[r * n + col];
                let v = decay * old + self.c1 * (self.pc[r] * self.pc[col] + correction * old) + self.cmu * rank_mu;
                self.c[r * n + col] = v;
                self.c[col * n + r] = v;
            }
        }
        self.sigma *= ((self.cs / self.damps) * (ps_norm / self.chi_n - 1.0)).exp();
        self.sigma = self.sigma.clamp(1e-6, 0.5);
        self.eigen();
        self.gen += 1;
    }

    /// Eigendecomposition of C into B (columns) and D (sqrt of eigenvalues).
    fn eigen(&mut self) {
        let n = self.n;
        let a = &mut self.work;
        a.copy_from_slice(&self.c);
        let v = &mut self.b;
        v.iter_mut().for_each(|x| *x = 0.0);
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        jacobi(a, v, n);
        for i in 0..n {
            self.d[i] = a[i * n + i].max(1e-20).sqrt();
        }
    }
}

/// Cyclic Jacobi: diagonalises the symmetric `a` in place, accumulating the
/// rotations into `v` (columns become eigenvectors).
pub(crate) fn jacobi(a: &mut [f64], v: &mut [f64], n: usize) {
    for _ in 0..MAX_SWEEPS {
        let mut off = 0.0;
        let mut diag = 0.0;
        for i in 0..n {
            diag += a[i * n + i] * a[i * n + i];
            for j in i + 1..n {
                off += a[i * n + j] * a[i * n + j];
            }
        }
        if off <= 1e-24 * diag.max(1e-300) {
            return;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta == 0.0 { 1.0 } else { theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt()) };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
}

impl Optimizer for CmaEs {
    fn dim(&self) -> usize {
        self.n
    }

    fn ask(&mut self, out: &mut [f64]) -> AskId {
        let n = self.n;
        let i = self.member;
        for z in &mut self.tmp {
            *z = self.rng.normal();
        }
        for r in 0..n {
            let mut acc = 0.0;
            for j in 0..n {
                acc += self.b[r * n + j] * self.d[j] * self.tmp[j];
            }
            let raw = self.mean[r] + self.sigma * acc;
            let x = raw.clamp(0.0, 1.0);
            self.x[i * n + r] = x;
            // Repair: the clipped point is what was evaluated and what counts.
            self.y[i * n + r] = (x - self.mean[r]) / self.sigma;
            if let Some(o) = out.get_mut(r) {
                *o = x;
            }
        }
        self.at.ask()
    }

    fn tell(&mut self, id: AskId, reward: f64) -> Result<(), TunerError> {
        self.at.tell(id)?;
        self.evals += 1;
        self.fitness[self.member] = sanitize(reward);
        self.member += 1;
        if self.member == self.lambda {
            self.member = 0;
            self.update();
        }
        Ok(())
    }

    fn incumbent(&self) -> &[f64] {
        &self.mean
    }

    fn evaluations(&self) -> u64 {
        self.evals
    }

    fn worst_case_ops(&self) -> u64 {
        let n = self.n as u64;
        let lambda = self.lambda as u64;
        let mu = self.mu as u64;
        // The generation's last tell: sort, covariance update (n² μ), and the
        // Jacobi sweeps (n²/2 rotations of 12 n ops each).
        lambda * 8 + n * n * (mu + 4) + MAX_SWEEPS as u64 * (n * n / 2) * 12 * n + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testfn;

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix() {
        let n = 4;
        let m = [4.0, 1.0, 0.5, 0.0, 1.0, 3.0, 0.2, 0.1, 0.5, 0.2, 2.0, 0.3, 0.0, 0.1, 0.3, 1.0];
        let mut a = m.to_vec();
        let mut v = vec![0.0; 16];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        jacobi(&mut a, &mut v, n);
        for r in 0..n {
            for c in 0..n {
                let rec: f64 = (0..n).map(|k| v[r * n + k] * a[k * n + k] * v[c * n + k]).sum();
                assert!((rec - m[r * n + c]).abs() < 1e-9, "({r},{c}) {rec}");
            }
        }
    }

    #[test]
    fn climbs_a_noisy_bump() {
        for seed in 0..3 {
            let mut o = CmaEs::new(CmaEsConfig::new(4), seed).unwrap();
            let v = testfn::climb(&mut o, 300 + seed, 1_600);
            assert!(v > 0.97, "seed {seed}: {v}");
        }
    }

    #[test]
    fn budget_can_refuse_large_dims() {
        let mut c = CmaEsConfig::new(16);
        c.budget = ComputeBudget(10_000);
        assert!(CmaEs::new(c, 0).is_err());
        assert!(CmaEs::new(CmaEsConfig::new(16), 0).is_ok());
    }
}
