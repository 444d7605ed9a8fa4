//! Non-stationary offered load: steps, ramps, spikes and drift, plus noise.

use serde::{Deserialize, Serialize};

use crate::rng::TunerRng;
use crate::units::{Micros, Tick};

/// One change to the load level.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LoadEvent {
    /// From `at` the level is `to`.
    Step {
        /// When.
        at: Tick,
        /// New level.
        to: f64,
    },
    /// Between `from` and `until` the level moves linearly to `to`.
    Ramp {
        /// Start of the ramp.
        from: Tick,
        /// End of the ramp.
        until: Tick,
        /// Level reached at `until`.
        to: f64,
    },
    /// During `[at, at + length)` the level is raised by `extra`.
    Spike {
        /// Start.
        at: Tick,
        /// Duration.
        length: Micros,
        /// Added load.
        extra: f64,
    },
    /// From `from` the level grows by `per_hour` per hour (negative shrinks).
    Drift {
        /// Start.
        from: Tick,
        /// Change per hour.
        per_hour: f64,
    },
}

/// Offered load over time, in units of nominal capacity (1.0 = the load a
/// reference variant serves at its design point).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadProfile {
    /// Level before any event.
    pub base: f64,
    /// Changes, applied in order.
    pub events: Vec<LoadEvent>,
    /// Multiplicative noise (deviation of a normal factor around 1).
    pub noise_sd: f64,
}

impl LoadProfile {
    /// A constant load.
    pub fn constant(level: f64) -> LoadProfile {
        LoadProfile { base: level, events: Vec::new(), noise_sd: 0.0 }
    }

    /// The noiseless level at `t`.
    pub fn level(&self, t: Tick) -> f64 {
        let mut level = self.base;
        let mut extra = 0.0;
        for e in &self.events {
            match *e {
                LoadEvent::Step { at, to } if t >= at => level = to,
                LoadEvent::Ramp { until, to, .. } if t >= until => level = to,
                LoadEvent::Ramp { from, until, to } if t > from => {
                    let f = (t.0 - from.0) as f64 / (until.0 - from.0).max(1) as f64;
                    level += (to - level) * f;
                }
                LoadEvent::Spike { at, length, extra: x } if t >= at && t < at.plus(length) => {
                    extra += x;
                }
                LoadEvent::Drift { from, per_hour } if t > from => {
                    extra += per_hour * (t.0 - from.0) as f64 / 3.6e9;
                }
                _ => {}
            }
        }
        (level + extra).max(0.0)
    }

    /// The level at `t` with noise drawn from `rng`.
    pub fn sample(&self, t: Tick, rng: &mut TunerRng) -> f64 {
        let l = self.level(t);
        if self.noise_sd > 0.0 {
            (l * (1.0 + self.noise_sd * rng.normal())).max(0.0)
        } else {
            l
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_compose() {
        let s = |x: u64| Tick(x * 1_000_000);
        let p = LoadProfile {
            base: 0.3,
            events: vec![
                LoadEvent::Step { at: s(10), to: 0.6 },
                LoadEvent::Ramp { from: s(20), until: s(30), to: 0.9 },
                LoadEvent::Spike { at: s(40), length: Micros::from_secs(5), extra: 0.5 },
                LoadEvent::Drift { from: s(3600), per_hour: -0.36 },
            ],
            noise_sd: 0.0,
        };
        assert_eq!(p.level(s(0)), 0.3);
        assert_eq!(p.level(s(10)), 0.6);
        assert!((p.level(s(25)) - 0.75).abs() < 1e-12);
        assert!((p.level(s(35)) - 0.9).abs() < 1e-12);
        assert!((p.level(s(42)) - 1.4).abs() < 1e-12);
        assert!((p.level(s(45)) - 0.9).abs() < 1e-12);
        assert!((p.level(s(7200)) - 0.54).abs() < 1e-9);
    }
}
