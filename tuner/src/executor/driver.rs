//! The driver: the only code that calls [`ServingControl`].
//!
//! Purpose: wire a pure [`Executor`] to a runtime and an optional
//! [`AuditLog`]. For each input the driver appends the input (write-ahead),
//! asks the executor, appends the decision, carries out the effect, and
//! feeds the runtime's outcome back as the next input, until no effect is
//! left (a chain is at most stage → commit, or one rollback).
//!
//! Crash safety: because inputs are logged before they are applied and
//! runtime outcomes are themselves inputs, [`Driver::recover`] rebuilds the
//! executor by replay and then feeds [`Input::Recovered`], which rolls any
//! in-flight experiment back and reconciles the runtime with the recovered
//! state.

use std::path::Path;

use crate::audit::{AuditLog, FsyncPolicy, Record, RecoveryReport};
use crate::error::TunerError;
use crate::executor::control::{ControlOp, ControlOutcome, ServingControl, StageToken};
use crate::executor::decision::{Decision, Effect};
use crate::executor::{Executor, Input};
use crate::units::Tick;

/// Longest effect chain one input can cause; a longer one is a bug.
const MAX_CHAIN: usize = 8;

/// Executor + runtime + audit log.
#[derive(Debug)]
pub struct Driver<C: ServingControl> {
    exec: Executor,
    control: C,
    log: Option<AuditLog>,
    token: Option<StageToken>,
    decisions: Vec<Decision>,
}

impl<C: ServingControl> Driver<C> {
    /// A driver for a fresh executor; writes the genesis record to `log`
    /// (which must be empty) so the log alone can rebuild the executor.
    pub fn new(exec: Executor, control: C, mut log: Option<AuditLog>) -> Result<Self, TunerError> {
        if let Some(l) = log.as_mut() {
            if l.next_seq().0 != 0 {
                return Err(TunerError::config(
                    "Driver",
                    "a new driver needs an empty audit log (use Driver::recover)",
                ));
            }
            l.append(&Record::Genesis {
                at: exec.state().started,
                guard: exec.guard().clone(),
                initial: *exec.active(),
            })?;
        }
        Ok(Driver { exec, control, log, token: None, decisions: Vec::with_capacity(MAX_CHAIN) })
    }

    /// Recovers from the log at `path`: drops a torn tail, replays every
    /// record, reopens the log for appending and feeds
    /// [`Input::Recovered`] at `at` to reconcile with the runtime.
    pub fn recover(
        path: &Path,
        policy: FsyncPolicy,
        control: C,
        at: Tick,
    ) -> Result<(Self, RecoveryReport), TunerError> {
        let (records, report) = crate::audit::recover(path)?;
        let exec = Executor::replay(&records)?;
        let log = AuditLog::open(path, policy)?;
        let mut d = Driver { exec, control, log: Some(log), token: None, decisions: Vec::with_capacity(MAX_CHAIN) };
        let runtime_active = d.control.active();
        d.handle(at, Input::Recovered { runtime_active })?;
        Ok((d, report))
    }

    /// The executor.
    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// The runtime.
    pub fn control(&self) -> &C {
        &self.control
    }

    /// The runtime, mutably (simulations advance it between inputs).
    pub fn control_mut(&mut self) -> &mut C {
        &mut self.control
    }

    /// The audit log, if any.
    pub fn log(&self) -> Option<&AuditLog> {
        self.log.as_ref()
    }

    /// Handles one input and everything it sets off; returns the decisions
    /// in order. Fails only if the audit log cannot be written, in which case
    /// the effect of the unlogged decision is *not* carried out.
    pub fn handle(&mut self, at: Tick, input: Input) -> Result<&[Decision], TunerError> {
        self.decisions.clear();
        let mut next = Some(input);
        while let Some(input) = next.take() {
            if self.decisions.len() >= MAX_CHAIN {
                break;
            }
            if let Some(l) = self.log.as_mut() {
                l.append(&Record::Input { at, input })?;
            }
            let d = self.exec.handle(at, &input);
            if let Some(l) = self.log.as_mut() {
                l.append(&Record::Decision(d))?;
            }
            self.decisions.push(d);
            if let Some(effect) = d.effect {
                next = Some(Input::Control(self.execute(&effect)));
            }
        }
        Ok(&self.decisions)
    }

    fn execute(&mut self, effect: &Effect) -> ControlOutcome {
        match effect {
            Effect::Stage(change) => match self.control.stage(change) {
                Ok(t) => {
                    self.token = Some(t);
                    ok(ControlOp::Stage)
                }
                Err(e) => failed(ControlOp::Stage, &e),
            },
            Effect::Commit(fraction) => {
                let res = match self.token {
                    Some(t) => self.control.commit(t, *fraction),
                    None => Err(crate::executor::ControlError::StaleToken(StageToken(0))),
                };
                match res {
                    Ok(()) => ok(ControlOp::Commit),
                    Err(e) => failed(ControlOp::Commit, &e),
                }
            }
            Effect::Rollback(to) => match self.control.rollback(to) {
                Ok(()) => {
                    self.token = None;
                    ok(ControlOp::Rollback)
                }
                Err(e) => failed(ControlOp::Rollback, &e),
            },
        }
    }
}

fn ok(op: ControlOp) -> ControlOutcome {
    ControlOutcome { op, error: None }
}

fn failed(op: ControlOp, e: &crate::executor::ControlError) -> ControlOutcome {
    ControlOutcome { op, error: Some(e.kind()) }
}
