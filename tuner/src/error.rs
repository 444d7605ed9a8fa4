//! The crate's one error type.
//!
//! Purpose: every fallible public function in `arqon-tuner` returns
//! [`TunerError`], whose variants carry structured fields (which knob, which
//! line, which bound) so callers can match on them and log them without
//! parsing strings.
//!
//! Two deliberate exceptions live at boundaries and convert into this enum:
//! [`crate::executor::ControlError`] is produced by the *runtime* when it
//! implements [`crate::executor::ServingControl`] (the runtime must be able to
//! build it without knowing the tuner's internals), and
//! [`crate::executor::RejectReason`] is not an error at all but a decision the
//! executor records. [`AuditError`] is an alias kept for the audit API's
//! readability.

use std::path::PathBuf;

use thiserror::Error;

use crate::executor::ControlError;

/// Why a line of the audit log could not be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptReason {
    /// The line is not valid JSON of the expected envelope shape.
    BadJson,
    /// The stored hash does not match the hash of the line's contents.
    BadHash,
    /// The line's `prev` does not equal the previous line's hash.
    BrokenChain,
    /// The sequence number is not the previous one plus one.
    BadSequence,
    /// The envelope is fine but the record inside does not decode.
    BadRecord,
}

impl std::fmt::Display for CorruptReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            CorruptReason::BadJson => "not a valid JSON envelope",
            CorruptReason::BadHash => "hash does not match contents",
            CorruptReason::BrokenChain => "hash chain broken (prev does not match)",
            CorruptReason::BadSequence => "sequence number out of order",
            CorruptReason::BadRecord => "record does not decode",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong in the tuner.
#[derive(Debug, Error)]
pub enum TunerError {
    /// A typed value was constructed outside its documented range.
    #[error("{what} = {value} is outside [{lo}, {hi}] {unit}")]
    OutOfRange {
        /// Which quantity (type or knob name).
        what: &'static str,
        /// The rejected value, widened to f64 for reporting.
        value: f64,
        /// Inclusive lower bound.
        lo: f64,
        /// Inclusive upper bound.
        hi: f64,
        /// Unit of the bounds.
        unit: &'static str,
    },
    /// A configuration object is internally inconsistent.
    #[error("invalid configuration of {what}: {why}")]
    InvalidConfig {
        /// Which configuration object.
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A policy's worst-case cost per decision exceeds its compute budget.
    #[error("{policy} needs {needed} ops per decision, budget is {budget}")]
    OverBudget {
        /// Policy name.
        policy: &'static str,
        /// Worst-case operations per decision.
        needed: u64,
        /// The configured budget.
        budget: u64,
    },
    /// `tell` was called for a candidate that is not the outstanding `ask`.
    #[error("tell for ask {got} but ask {expected} is outstanding")]
    AskTellMismatch {
        /// The id the optimiser handed out last (`u64::MAX` if none).
        expected: u64,
        /// The id passed to `tell`.
        got: u64,
    },
    /// I/O on the audit log failed.
    #[error("audit log I/O on {path}: {source}")]
    AuditIo {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line in the middle of the audit log is corrupt (a torn *last* line is
    /// not an error: recovery drops it and reports it).
    #[error("audit log {path} line {line} is corrupt: {reason}")]
    AuditCorrupt {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: CorruptReason,
    },
    /// Replaying a log produced a decision different from the logged one,
    /// or the log does not start with a genesis record.
    #[error("replay diverged at record {index}: {why}")]
    ReplayDivergence {
        /// 0-based record index in the recovered log.
        index: u64,
        /// What differed.
        why: &'static str,
    },
    /// JSON encoding or decoding failed outside the audit log's line parser.
    #[error("serialisation: {0}")]
    Serde(#[from] serde_json::Error),
    /// The runtime refused or failed a stage/commit/rollback call.
    #[error("serving control: {0}")]
    Control(#[from] ControlError),
}

/// The audit log's error type: the crate's one error enum under the name the
/// audit API documents.
pub type AuditError = TunerError;

impl TunerError {
    /// Shorthand for [`TunerError::InvalidConfig`].
    pub(crate) fn config(what: &'static str, why: impl Into<String>) -> Self {
        TunerError::InvalidConfig { what, why: why.into() }
    }
}
