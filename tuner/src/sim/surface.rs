//! Noisy smooth surfaces for the continuous-knob optimisers.

use serde::{Deserialize, Serialize};

use crate::rng::TunerRng;

/// `peak · exp(−Σ wᵢ dᵢ² − κ (Σ dᵢ)² / dim)` with `d = x − x*`, observed with
/// additive Gaussian noise. The coupling term κ makes coordinates interact,
/// so axis-by-axis search is not enough.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Surface {
    /// The optimum, inside `[0.15, 0.85]^dim`.
    pub optimum: Vec<f64>,
    /// Curvature per coordinate.
    pub weights: Vec<f64>,
    /// Coupling.
    pub coupling: f64,
    /// Value at the optimum.
    pub peak: f64,
    /// Observation noise deviation.
    pub noise_sd: f64,
}

impl Surface {
    /// A random surface of `dim` coordinates: optimum uniform in
    /// `[0.15, 0.85]`, curvatures in `[2, 8]`, coupling 1, peak 1, noise
    /// `noise_sd` (absolute, so relative to the peak).
    pub fn random(dim: usize, noise_sd: f64, seed: u64) -> Surface {
        let mut rng = TunerRng::seeded(seed);
        Surface {
            optimum: (0..dim).map(|_| 0.15 + 0.7 * rng.uniform()).collect(),
            weights: (0..dim).map(|_| 2.0 + 6.0 * rng.uniform()).collect(),
            coupling: 1.0,
            peak: 1.0,
            noise_sd,
        }
    }

    /// The noiseless value.
    pub fn value(&self, x: &[f64]) -> f64 {
        let mut quad = 0.0;
        let mut sum = 0.0;
        for ((xi, oi), wi) in x.iter().zip(&self.optimum).zip(&self.weights) {
            let d = xi - oi;
            quad += wi * d * d;
            sum += d;
        }
        let dim = self.optimum.len().max(1) as f64;
        self.peak * (-quad - self.coupling * sum * sum / dim).exp()
    }

    /// A noisy observation.
    pub fn sample(&self, x: &[f64], rng: &mut TunerRng) -> f64 {
        self.value(x) + self.noise_sd * rng.normal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimum_is_the_peak() {
        let s = Surface::random(8, 0.0, 3);
        assert!((s.value(&s.optimum) - 1.0).abs() < 1e-12);
        let off: Vec<f64> = s.optimum.iter().map(|v| v + 0.1).collect();
        assert!(s.value(&off) < 0.9);
    }
}
