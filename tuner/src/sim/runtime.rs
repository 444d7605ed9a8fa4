//! A simulated runtime: implements [`ServingControl`] and emits telemetry.
//!
//! It serves one [`ServingModel`] under a [`LoadProfile`]: each window it
//! generates requests (count ∝ load), routes each to the canary with the
//! committed fraction, samples time-to-first-token and inter-token latency
//! from log-normals whose p99 matches the model's response, and pushes
//! [`RequestEvent`]s and a [`DeviceSample`] into a [`TelemetryRing`] —
//! exactly what the real runtime will do. Failures (stage refusals,
//! telemetry outages) can be injected to exercise the executor.

use serde::{Deserialize, Serialize};

use crate::executor::{Change, ControlError, ServingControl, StageToken};
use crate::knobs::{Config, KnobId, KnobValue};
use crate::rng::TunerRng;
use crate::sim::load::LoadProfile;
use crate::sim::model::{Response, ServingModel};
use crate::telemetry::{Cohort, ContextBucket, DeviceSample, Event, RequestEvent, TelemetryRing};
use crate::units::{Bytes, CanaryFraction, DeciCelsius, Mhz, Micros, Milliwatts, Permille, Tick};

/// z-score of the 99th percentile of a normal.
const Z99: f64 = 2.326;
/// Log-normal shape of per-request latencies.
const LATENCY_SIGMA: f64 = 0.35;
/// Simulated device memory.
const DEVICE_BYTES: u64 = 80 << 30;

/// What one simulated window really was (the truth behind the telemetry).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowTruth {
    /// Offered load.
    pub load: f64,
    /// Expected response of the active configuration.
    pub control: Response,
    /// Expected response of the canary, if one is routed.
    pub canary: Option<Response>,
    /// Requests generated.
    pub requests: u32,
}

/// The simulated runtime.
#[derive(Clone, Debug)]
pub struct SimRuntime {
    model: ServingModel,
    load: LoadProfile,
    /// Knob carrying the normalised batch window, if the space has one.
    window_knob: Option<KnobId>,
    /// Requests per window at load 1.0.
    rate: f64,
    active: Config,
    staged: Option<(StageToken, Config)>,
    canary: Option<(Config, CanaryFraction)>,
    next_token: u64,
    /// Refuse the next `stage` call.
    pub fail_next_stage: bool,
    /// Emit no telemetry (an outage) while set.
    pub outage: bool,
    rng: TunerRng,
}

impl SimRuntime {
    /// A runtime serving `initial`, seeded.
    pub fn new(
        model: ServingModel,
        load: LoadProfile,
        initial: Config,
        window_knob: Option<KnobId>,
        seed: u64,
    ) -> SimRuntime {
        SimRuntime {
            model,
            load,
            window_knob,
            rate: 400.0,
            active: initial,
            staged: None,
            canary: None,
            next_token: 1,
            fail_next_stage: false,
            outage: false,
            rng: TunerRng::seeded(seed),
        }
    }

    /// Sets the requests per window at load 1.0 (default 400).
    pub fn set_rate(&mut self, rate: f64) {
        self.rate = rate.max(0.0);
    }

    /// The model being served.
    pub fn model(&self) -> &ServingModel {
        &self.model
    }

    /// The canary and its share, if one is routed.
    pub fn canary(&self) -> Option<(Config, CanaryFraction)> {
        self.canary
    }

    fn window_of(&self, c: &Config) -> f64 {
        match self.window_knob.and_then(|k| c.knobs.get(k)) {
            Some(KnobValue::Continuous(w)) => w,
            _ => 0.0,
        }
    }

    /// Expected response of `c` at `load`.
    pub fn response(&self, c: &Config, load: f64) -> Response {
        self.model.response(usize::from(c.variant.0), load, self.window_of(c))
    }

    fn sample_latency(&mut self, p99_ms: f64) -> Micros {
        let median = p99_ms / (Z99 * LATENCY_SIGMA).exp();
        let v = median * (LATENCY_SIGMA * self.rng.normal()).exp();
        Micros((v * 1_000.0).max(1.0) as u64)
    }

    /// Simulates `[start, start + len)`, pushing its telemetry into `ring`
    /// (nothing during an outage).
    pub fn run_window(&mut self, start: Tick, len: Micros, ring: &TelemetryRing) -> WindowTruth {
        let load = self.load.sample(start, &mut self.rng);
        let control = self.response(&self.active, load);
        let canary = self.canary.map(|(c, f)| (self.response(&c, load), c, f));
        let n = (self.rate * load).round().max(0.0) as u32;
        let ctx = ContextBucket(((load * 4.0) as u16).min(3));
        if !self.outage {
            for i in 0..n {
                let at = start.plus(Micros(len.0 * u64::from(i) / u64::from(n.max(1))));
                let (cohort, resp, variant) = match canary {
                    Some((r, c, f)) if self.rng.uniform() < f.as_f64() => (Cohort::Canary, r, c.variant),
                    _ => (Cohort::Control, control, self.active.variant),
                };
                let ttft = self.sample_latency(resp.ttft_p99_ms);
                let itl = self.sample_latency(resp.itl_p99_ms);
                let error = self.rng.uniform() < resp.error_rate;
                ring.try_push(Event::Request(RequestEvent {
                    at,
                    variant,
                    cohort,
                    context: ctx,
                    ttft,
                    itl,
                    tokens: 200,
                    error,
                }));
            }
            let mem = canary.map_or(control.mem, |(r, ..)| r.mem.max(control.mem));
            ring.try_push(Event::Device(DeviceSample {
                at: start.plus(Micros(len.0 / 2)),
                device: 0,
                mem_used: Bytes((mem * DEVICE_BYTES as f64) as u64),
                mem_total: Bytes(DEVICE_BYTES),
                temperature: DeciCelsius(650),
                power: Milliwatts(400_000),
                sm_clock: Mhz(1_800),
                utilisation: Permille::ratio((control.utilisation * 1000.0) as u64, 1000),
            }));
        }
        WindowTruth { load, control, canary: canary.map(|(r, ..)| r), requests: n }
    }
}

impl ServingControl for SimRuntime {
    fn stage(&mut self, change: &Change) -> Result<StageToken, ControlError> {
        if std::mem::take(&mut self.fail_next_stage) {
            return Err(ControlError::Rejected { reason: "injected stage failure".into() });
        }
        if usize::from(change.candidate.variant.0) >= self.model.variants.len() {
            return Err(ControlError::Rejected { reason: format!("unknown variant {}", change.candidate.variant.0) });
        }
        let t = StageToken(self.next_token);
        self.next_token += 1;
        self.staged = Some((t, change.candidate));
        Ok(t)
    }

    fn commit(&mut self, token: StageToken, traffic: CanaryFraction) -> Result<(), ControlError> {
        match self.staged {
            Some((t, c)) if t == token => {
                if traffic.is_full() {
                    self.active = c;
                    self.canary = None;
                    self.staged = None;
                } else {
                    self.canary = Some((c, traffic));
                }
                Ok(())
            }
            _ => Err(ControlError::StaleToken(token)),
        }
    }

    fn rollback(&mut self, to: &Config) -> Result<(), ControlError> {
        self.active = *to;
        self.canary = None;
        self.staged = None;
        Ok(())
    }

    fn active(&self) -> Config {
        self.active
    }
}
