//! Arqon Serve's tuner: online adaptation, bounded and safe.
//!
//! Pure Rust, no model, no GPU, no async runtime. Data flows one way:
//!
//! ```text
//! runtime ──try_push──▶ TelemetryRing ──drain──▶ Summarizer ──▶ WindowSummary
//!                                                               │
//!        policies (bandit, optim) ◀── summaries ────────────────┤
//!              │ Proposal (+ Governance)                        │ HealthSummary
//!              ▼                                                ▼
//!          Executor (tier 1, pure state machine) ──▶ Decision + Effect
//!              │                                   │
//!          AuditLog (hash-chained JSONL)     Driver ──▶ ServingControl (runtime)
//! ```
//!
//! * [`telemetry`], [`summary`]: non-blocking event ring and windowed summaries.
//! * [`knobs`], [`serving`], [`units`]: the typed, bounded knob space and [`Config`].
//! * [`bandit`], [`optim`]: tier-2 policies (Thompson, UCB, LinUCB, constrained
//!   selection; SPSA, ES, CMA-ES, PBT). They only propose.
//! * [`governance`]: proposal metadata and tier rules.
//! * [`executor`]: tier-1 guardrails, the canary, rollback, kill switch, and the
//!   [`executor::ServingControl`] trait the runtime implements.
//! * [`audit`]: the event-sourced log; [`Executor::replay`] rebuilds state from it.
//! * [`sim`]: a seeded simulator of a serving system for tests and benches.
//!
//! Determinism: every stochastic component owns a seeded [`rng::TunerRng`];
//! time is an input ([`units::Tick`]); there is no global state.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod bandit;
pub mod error;
pub mod executor;
pub mod governance;
pub mod knobs;
pub mod optim;
pub mod rng;
pub mod serving;
pub mod sim;
pub mod summary;
pub mod telemetry;
pub mod units;

pub use error::{AuditError, TunerError};
pub use executor::{Decision, Executor, Input};
pub use knobs::{Config, KnobId, KnobSpace, KnobValue, Patch, VariantId};
