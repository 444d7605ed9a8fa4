//! The tuner's seeded random source.
//!
//! Purpose: every stochastic policy owns a [`TunerRng`] (ChaCha8, seeded
//! explicitly) so that a run is a pure function of its seed and inputs. There
//! is no thread-local or global generator anywhere in the crate.
//!
//! Usage: `TunerRng::seeded(seed)`; give sub-components their own stream with
//! [`TunerRng::fork`] so adding a draw in one place does not shift another's
//! sequence.
//!
//! Invariants: no method allocates; normal draws use rand_distr's ziggurat
//! (about one 64-bit draw per sample), which keeps Thompson sampling over 32
//! arms within its latency budget.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A seeded ChaCha8 generator with the draws the policies need.
#[derive(Clone, Debug)]
pub struct TunerRng {
    inner: ChaCha8Rng,
}

impl TunerRng {
    /// A generator whose whole sequence is determined by `seed`.
    pub fn seeded(seed: u64) -> TunerRng {
        TunerRng { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// An independent generator for a sub-component, on its own stream.
    pub fn fork(&mut self, stream: u64) -> TunerRng {
        let mut child = ChaCha8Rng::seed_from_u64(self.inner.next_u64());
        child.set_stream(stream);
        TunerRng { inner: child }
    }

    /// A uniform draw in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        self.inner.gen::<f64>()
    }

    /// A standard normal draw.
    #[inline]
    pub fn normal(&mut self) -> f64 {
        self.inner.sample(StandardNormal)
    }

    /// A uniform index in `0..n` (`n` must be positive).
    #[inline]
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.gen_range(0..n.max(1))
    }

    /// ±1 with equal probability.
    #[inline]
    pub fn rademacher(&mut self) -> f64 {
        if self.inner.next_u32() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// `true` with probability `p`.
    #[inline]
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// A raw 64-bit draw.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = TunerRng::seeded(7);
        let mut b = TunerRng::seeded(7);
        for _ in 0..100 {
            assert_eq!(a.normal().to_bits(), b.normal().to_bits());
        }
        let mut c = TunerRng::seeded(8);
        assert_ne!(a.next_u64(), c.next_u64());
    }

    #[test]
    fn forks_are_independent_streams() {
        let mut root = TunerRng::seeded(1);
        let mut x = root.fork(1);
        let mut y = root.fork(2);
        assert_ne!(x.next_u64(), y.next_u64());
    }

    #[test]
    fn normal_moments_are_sane() {
        let mut r = TunerRng::seeded(3);
        let n = 20_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let z = r.normal();
            s += z;
            s2 += z * z;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
