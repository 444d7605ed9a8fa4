//! Response surfaces of a simulated serving system.
//!
//! A [`VariantModel`] describes one serving variant: quality, capacity,
//! unloaded latencies, memory footprint and error rate. Latency grows with
//! utilisation like an M/M/1 queue (`p99 ≈ base · (1 + 2ρ/(1−ρ))`, capped at
//! 50× base when saturated). One knob, the normalised batch window `w`,
//! trades latency for capacity (`capacity · (1 + 0.4 w)`, `+ 30 ms · w`),
//! so knob optimisers have something real to push against.

use serde::{Deserialize, Serialize};

/// One serving variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VariantModel {
    /// Name for reports.
    pub name: String,
    /// Output quality in [0, 1].
    pub quality: f64,
    /// Load it saturates at (nominal capacity units).
    pub capacity: f64,
    /// p99 time to first token when idle, ms.
    pub ttft_ms: f64,
    /// p99 inter-token latency when idle, ms.
    pub itl_ms: f64,
    /// Device memory share when loaded.
    pub mem: f64,
    /// Base error rate.
    pub error_rate: f64,
}

/// The expected behaviour of a variant under a load.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// p99 time to first token, ms.
    pub ttft_p99_ms: f64,
    /// p99 inter-token latency, ms.
    pub itl_p99_ms: f64,
    /// Output quality.
    pub quality: f64,
    /// Memory share.
    pub mem: f64,
    /// Error rate.
    pub error_rate: f64,
    /// Utilisation.
    pub utilisation: f64,
    /// Load actually served (nominal capacity units): offered load up to
    /// the effective capacity.
    pub throughput: f64,
}

/// A catalog of variants plus the objective and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServingModel {
    /// The variants (arm i = variant i).
    pub variants: Vec<VariantModel>,
    /// p99 TTFT SLO, ms.
    pub slo_ttft_ms: f64,
    /// Memory share limit.
    pub mem_limit: f64,
    /// Reward = quality − `latency_weight` · min(p99 / SLO, 3).
    pub latency_weight: f64,
}

impl ServingModel {
    /// Eight variants of one model family: large/small, fp16/int8/int4,
    /// speculative decoding, early exit, an adapter mix. At low load the
    /// large fp16 is best; as load rises the quantised variants take over;
    /// the speculative one never fits in memory.
    pub fn catalog() -> ServingModel {
        let v = |name: &str, quality, capacity, ttft_ms, itl_ms, mem| VariantModel {
            name: name.to_owned(),
            quality,
            capacity,
            ttft_ms,
            itl_ms,
            mem,
            error_rate: 0.001,
        };
        ServingModel {
            variants: vec![
                v("large-fp16", 0.97, 0.70, 120.0, 30.0, 0.80),
                v("large-fp16-spec", 0.97, 0.85, 100.0, 22.0, 0.94),
                v("large-int8", 0.90, 1.10, 90.0, 24.0, 0.55),
                v("large-int4", 0.84, 1.60, 70.0, 18.0, 0.35),
                v("small-fp16", 0.75, 2.20, 40.0, 12.0, 0.30),
                v("small-int4", 0.68, 3.00, 30.0, 9.0, 0.15),
                v("large-early-exit", 0.80, 1.40, 80.0, 20.0, 0.55),
                v("large-adapter-mix", 0.87, 0.90, 110.0, 26.0, 0.60),
            ],
            slo_ttft_ms: 400.0,
            mem_limit: 0.90,
            latency_weight: 0.1,
        }
    }

    /// Expected response of variant `v` at `load` with batch window `w` in [0, 1].
    pub fn response(&self, v: usize, load: f64, w: f64) -> Response {
        let m = &self.variants[v.min(self.variants.len() - 1)];
        let w = w.clamp(0.0, 1.0);
        let cap = m.capacity * (1.0 + 0.4 * w);
        let rho = (load.max(0.0) / cap).min(0.999);
        let factor = if rho >= 0.98 { 50.0 } else { (1.0 + 2.0 * rho / (1.0 - rho)).min(50.0) };
        Response {
            ttft_p99_ms: m.ttft_ms * factor + 30.0 * w,
            itl_p99_ms: m.itl_ms * (1.0 + rho),
            quality: m.quality,
            mem: m.mem,
            error_rate: m.error_rate * if rho >= 0.98 { 20.0 } else { 1.0 },
            utilisation: rho,
            throughput: load.max(0.0).min(cap),
        }
    }

    /// The reward of a response.
    pub fn reward(&self, r: &Response) -> f64 {
        r.quality - self.latency_weight * (r.ttft_p99_ms / self.slo_ttft_ms).min(3.0)
    }

    /// Whether a response meets the SLO and the memory limit.
    pub fn feasible(&self, r: &Response) -> bool {
        r.ttft_p99_ms <= self.slo_ttft_ms && r.mem <= self.mem_limit
    }

    /// The best feasible variant at `load` (window 0), if any.
    pub fn best_feasible(&self, load: f64) -> Option<usize> {
        (0..self.variants.len()).filter(|&v| self.feasible(&self.response(v, load, 0.0))).max_by(|&a, &b| {
            let ra = self.reward(&self.response(a, load, 0.0));
            let rb = self.reward(&self.response(b, load, 0.0));
            ra.total_cmp(&rb)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_arm_moves_with_load() {
        let m = ServingModel::catalog();
        assert_eq!(m.best_feasible(0.3), Some(0));
        assert_eq!(m.best_feasible(0.6), Some(2));
        assert_eq!(m.best_feasible(0.9), Some(3));
        assert!(!m.feasible(&m.response(1, 0.1, 0.0)), "spec variant never fits");
    }

    #[test]
    fn batch_window_trades_latency_for_capacity() {
        let m = ServingModel::catalog();
        let a = m.response(3, 1.4, 0.0);
        let b = m.response(3, 1.4, 1.0);
        assert!(b.utilisation < a.utilisation);
        assert!(b.ttft_p99_ms < a.ttft_p99_ms, "at high load the window pays off");
        let lo_a = m.response(3, 0.1, 0.0);
        let lo_b = m.response(3, 0.1, 1.0);
        assert!(lo_b.ttft_p99_ms > lo_a.ttft_p99_ms, "at low load it only adds delay");
        assert_eq!(m.response(3, 5.0, 0.0).throughput, 1.6, "throughput saturates at capacity");
    }
}
