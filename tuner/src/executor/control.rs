//! The one seam between the tuner and the runtime: [`ServingControl`].
//!
//! Purpose: the runtime implements four methods (stage, commit, rollback,
//! active); the tuner's [`crate::executor::Driver`] is the only caller, and it
//! only ever executes the executor's [`crate::executor::Effect`]s. Outcomes
//! come back into the executor as logged [`ControlOutcome`] inputs, so a
//! runtime failure is replayable like any other input.
//!
//! [`ControlError`] is the runtime's error type at this seam; it is separate
//! from [`crate::TunerError`] because the runtime must construct it, and it
//! converts into `TunerError::Control`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::executor::Change;
use crate::knobs::Config;
use crate::units::CanaryFraction;

/// Opaque handle to a staged candidate, issued by the runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StageToken(pub u64);

/// Failures the runtime reports.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ControlError {
    /// The runtime refused the change (e.g. the variant does not load).
    #[error("runtime rejected the change: {reason}")]
    Rejected {
        /// Human-readable reason.
        reason: String,
    },
    /// The token does not name the staged candidate.
    #[error("stale or unknown stage token {0:?}")]
    StaleToken(StageToken),
    /// The runtime cannot act now (shutting down, device lost).
    #[error("runtime unavailable: {reason}")]
    Unavailable {
        /// Human-readable reason.
        reason: String,
    },
}

impl ControlError {
    /// The loggable kind of this error.
    pub fn kind(&self) -> ControlErrorKind {
        match self {
            ControlError::Rejected { .. } => ControlErrorKind::Rejected,
            ControlError::StaleToken(_) => ControlErrorKind::StaleToken,
            ControlError::Unavailable { .. } => ControlErrorKind::Unavailable,
        }
    }
}

/// [`ControlError`] without its payload, for the log and the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlErrorKind {
    /// See [`ControlError::Rejected`].
    Rejected,
    /// See [`ControlError::StaleToken`].
    StaleToken,
    /// See [`ControlError::Unavailable`].
    Unavailable,
}

/// Which runtime call an outcome reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOp {
    /// `stage`.
    Stage,
    /// `commit`.
    Commit,
    /// `rollback`.
    Rollback,
}

/// The result of one runtime call, fed back to the executor as an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlOutcome {
    /// Which call.
    pub op: ControlOp,
    /// `None` on success.
    pub error: Option<ControlErrorKind>,
}

/// Implemented by the runtime. Every method must be idempotent for the same
/// arguments (the driver may repeat a rollback after a crash).
pub trait ServingControl {
    /// Prepares `change.candidate` (e.g. loads a variant) without affecting traffic.
    fn stage(&mut self, change: &Change) -> Result<StageToken, ControlError>;
    /// Routes `traffic` of new requests to the staged candidate; at 100 %
    /// the candidate becomes the active configuration.
    fn commit(&mut self, token: StageToken, traffic: CanaryFraction) -> Result<(), ControlError>;
    /// Drops any staged candidate or canary and serves `to` for all new requests.
    fn rollback(&mut self, to: &Config) -> Result<(), ControlError>;
    /// The configuration serving the control share now.
    fn active(&self) -> Config;
}
