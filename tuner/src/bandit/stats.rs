//! Exponentially discounted sufficient statistics of a scalar.

/// Discounted count, sum and sum of squares.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct DiscountedStats {
    pub n: f64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl DiscountedStats {
    /// Multiplies the evidence by `gamma`.
    #[inline]
    pub fn decay(&mut self, gamma: f64) {
        self.n *= gamma;
        self.sum *= gamma;
        self.sum_sq *= gamma;
    }

    /// Adds one observation.
    #[inline]
    pub fn push(&mut self, x: f64) {
        self.n += 1.0;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Mean (0 with no evidence).
    #[inline]
    pub fn mean(&self) -> f64 {
        if self.n > 0.0 {
            self.sum / self.n
        } else {
            0.0
        }
    }

    /// Mean and variance together, with two divisions instead of six (this
    /// runs for every arm on every update).
    #[inline]
    pub fn moments(&self) -> (f64, f64) {
        if self.n <= 0.0 {
            return (0.0, 0.0);
        }
        let inv_n = 1.0 / self.n;
        let mean = self.sum * inv_n;
        if self.n <= 1.0 {
            return (mean, 0.0);
        }
        let var = (self.sum_sq * inv_n - mean * mean) * self.n / (self.n - 1.0);
        (mean, var.max(0.0))
    }

    /// Variance of the observations (0 with under two observations' worth).
    #[inline]
    pub fn var(&self) -> f64 {
        if self.n > 1.0 {
            let m = self.mean();
            ((self.sum_sq / self.n - m * m) * self.n / (self.n - 1.0)).max(0.0)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_and_decay() {
        let mut s = DiscountedStats::default();
        for x in [1.0, 2.0, 3.0] {
            s.push(x);
        }
        assert!((s.mean() - 2.0).abs() < 1e-12);
        assert!((s.var() - 1.0).abs() < 1e-12);
        let (m, v) = s.moments();
        assert!((m - 2.0).abs() < 1e-12 && (v - 1.0).abs() < 1e-12);
        s.decay(0.5);
        assert!((s.n - 1.5).abs() < 1e-12);
        assert!((s.mean() - 2.0).abs() < 1e-12, "decay keeps the mean");
    }
}
