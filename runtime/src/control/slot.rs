//! The runtime's side of the tuner seam: [`SlotControl`] implements
//! `arqon_tuner::executor::ServingControl` over the [`VariantSlot`] and the
//! [`VariantSet`]. The tuner's `Driver` is its only caller, and it is the only
//! code that stores into the slot.
//!
//! - `stage` loads the candidate (or finds it resident) without touching
//!   traffic; a load failure is returned as `Rejected` and the executor rolls
//!   back to what serves now, so serving is never left without a variant;
//! - `commit` routes a share of new requests to the staged candidate; at
//!   100 % the candidate becomes the active variant;
//! - `rollback` serves `to` for all new requests;
//! - in-flight requests are never touched: they hold their own pins.
//!
//! Every method is idempotent for the same arguments, as the trait asks.

use std::sync::Arc;

use arqon_tuner::executor::{Change, ControlError, ServingControl, StageToken};
use arqon_tuner::units::CanaryFraction;
use arqon_tuner::{Config, VariantId};

use super::set::VariantSet;
use super::{Routing, VariantPin, VariantSlot};

/// The staged candidate.
#[derive(Debug)]
struct Staged {
    token: StageToken,
    config: Config,
    pin: VariantPin,
}

/// `ServingControl` over the slot.
#[derive(Debug)]
pub struct SlotControl {
    slot: Arc<VariantSlot>,
    set: VariantSet,
    staged: Option<Staged>,
    active: Config,
    next_token: u64,
    swaps: u64,
    last_error: Option<String>,
}

impl SlotControl {
    /// Control over `slot`, whose routing serves `active` now.
    pub fn new(slot: Arc<VariantSlot>, set: VariantSet, active: Config) -> SlotControl {
        SlotControl { slot, set, staged: None, active, next_token: 1, swaps: 0, last_error: None }
    }

    /// The variants.
    pub fn set(&self) -> &VariantSet {
        &self.set
    }

    /// The slot.
    pub fn slot(&self) -> &Arc<VariantSlot> {
        &self.slot
    }

    /// Stores into the slot so far.
    pub fn swaps(&self) -> u64 {
        self.swaps
    }

    /// Why the last stage or rollback was refused (the executor's log keeps
    /// only the kind), once.
    pub fn take_error(&mut self) -> Option<String> {
        self.last_error.take()
    }

    fn store(&mut self, routing: Routing) {
        // The previous routing is dropped here, on the control thread; its
        // pins go to the reaper.
        drop(self.slot.store(routing));
        self.swaps += 1;
    }

    fn protect(&self) -> Vec<VariantId> {
        let mut p = vec![self.active.variant];
        if let Some(s) = &self.staged {
            p.push(s.config.variant);
        }
        p
    }

    fn load(&mut self, vid: VariantId) -> Result<VariantPin, ControlError> {
        let protect = self.protect();
        self.set.get_or_load(vid, &protect).map_err(|e| {
            tracing::warn!(error = %e, "variant refused");
            self.last_error = Some(e.to_string());
            ControlError::Rejected { reason: e.to_string() }
        })
    }
}

impl ServingControl for SlotControl {
    fn stage(&mut self, change: &Change) -> Result<StageToken, ControlError> {
        if let Some(s) = &self.staged {
            if s.config == change.candidate {
                return Ok(s.token);
            }
        }
        let pin = self.load(change.candidate.variant)?;
        let token = StageToken(self.next_token);
        self.next_token += 1;
        self.staged = Some(Staged { token, config: change.candidate, pin });
        Ok(token)
    }

    fn commit(&mut self, token: StageToken, traffic: CanaryFraction) -> Result<(), ControlError> {
        let (config, pin) = match &self.staged {
            Some(s) if s.token == token => (s.config, s.pin.clone()),
            _ => return Err(ControlError::StaleToken(token)),
        };
        if traffic.is_full() {
            self.store(Routing { active: pin, canary: None, config });
            self.active = config;
        } else {
            let active = self.slot.load().active.clone();
            self.store(Routing { active, canary: Some((pin, traffic)), config: self.active });
        }
        Ok(())
    }

    fn rollback(&mut self, to: &Config) -> Result<(), ControlError> {
        let pin = self.load(to.variant)?;
        self.staged = None;
        self.store(Routing { active: pin, canary: None, config: *to });
        self.active = *to;
        Ok(())
    }

    fn active(&self) -> Config {
        self.active
    }
}
