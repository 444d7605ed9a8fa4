//! A seeded simulator of a serving system, for tests, benches and `tuner-sim`.
//!
//! Purpose: give every policy and the executor something realistic to adapt
//! to without a GPU: variants with latency/throughput/quality/memory
//! response surfaces ([`ServingModel`]), non-stationary load ([`LoadProfile`]:
//! steps, ramps, spikes, drift), observation noise, a runtime that implements
//! [`crate::executor::ServingControl`] and emits real telemetry
//! ([`SimRuntime`]), logged bandit data shared by all policies
//! ([`BanditTrace`]), smooth noisy surfaces for the optimisers ([`Surface`]),
//! and the scenarios the `tuner-sim` binary reports ([`scenario`]).
//!
//! Invariants: everything is a pure function of its seed.

mod load;
mod model;
mod runtime;
pub mod scenario;
mod surface;
mod trace;

pub use load::{LoadEvent, LoadProfile};
pub use model::{Response, ServingModel, VariantModel};
pub use runtime::{SimRuntime, WindowTruth};
pub use surface::Surface;
pub use trace::{ArmObs, BanditTrace, PolicyRun, QualityShift, TraceConfig, TraceRound};
