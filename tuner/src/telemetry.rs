//! Fixed-size telemetry events and the bounded lock-free ring they travel in.
//!
//! Purpose: the serving hot path reports what happened (one [`StepEvent`]
//! per scheduler step, one [`RequestEvent`] per finished request, one
//! [`DeviceSample`] per device poll) without ever blocking or allocating.
//! [`TelemetryRing::try_push`] is a single lock-free enqueue into a
//! pre-allocated `crossbeam::queue::ArrayQueue`; when the ring is full the
//! event is dropped and counted, never waited for.
//!
//! Usage: share one `Arc<TelemetryRing>` between producers (runtime threads)
//! and one consumer (the tuner loop), which drains it into a
//! [`crate::summary::Summarizer`].
//!
//! Invariants: every [`Event`] is `Copy` and fixed-size; `pushed + dropped`
//! equals the number of `try_push` calls; the counters are monotone.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;
use serde::{Deserialize, Serialize};

use crate::error::TunerError;
use crate::knobs::VariantId;
use crate::units::{Bytes, DeciCelsius, Mhz, Micros, Milliwatts, Permille, Tick};

/// Which side of a canary split served a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cohort {
    /// The active (known) configuration.
    Control,
    /// The configuration under trial.
    Canary,
}

impl Cohort {
    /// 0 for control, 1 for canary.
    pub fn index(self) -> usize {
        match self {
            Cohort::Control => 0,
            Cohort::Canary => 1,
        }
    }
}

/// A context bucket: a discretised (load, batch, prompt length, device)
/// situation, used to key summaries and per-context bandit statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContextBucket(pub u16);

impl ContextBucket {
    /// The bucket used for records that have no context (scheduler steps).
    pub const ALL: ContextBucket = ContextBucket(u16::MAX);
}

/// One scheduler step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    /// When the step finished.
    pub at: Tick,
    /// Variant that ran the step.
    pub variant: VariantId,
    /// Control or canary.
    pub cohort: Cohort,
    /// Requests in the batch.
    pub batch_size: u32,
    /// Tokens processed (prefill + decode).
    pub tokens: u32,
    /// Wall time of the step.
    pub step_time: Micros,
}

/// One finished (or failed) request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestEvent {
    /// When the request finished.
    pub at: Tick,
    /// Variant that served it.
    pub variant: VariantId,
    /// Control or canary.
    pub cohort: Cohort,
    /// Its context bucket.
    pub context: ContextBucket,
    /// Time to first token.
    pub ttft: Micros,
    /// Mean inter-token latency.
    pub itl: Micros,
    /// Tokens generated.
    pub tokens: u32,
    /// Whether it ended in an error.
    pub error: bool,
}

/// One poll of one device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceSample {
    /// When it was taken.
    pub at: Tick,
    /// Device index.
    pub device: u16,
    /// Memory in use.
    pub mem_used: Bytes,
    /// Memory installed.
    pub mem_total: Bytes,
    /// Temperature.
    pub temperature: DeciCelsius,
    /// Power draw.
    pub power: Milliwatts,
    /// SM clock.
    pub sm_clock: Mhz,
    /// Utilisation.
    pub utilisation: Permille,
}

/// Anything the runtime reports.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A scheduler step.
    Step(StepEvent),
    /// A finished request.
    Request(RequestEvent),
    /// A device sample.
    Device(DeviceSample),
}

impl Event {
    /// When it happened.
    pub fn at(&self) -> Tick {
        match self {
            Event::Step(e) => e.at,
            Event::Request(e) => e.at,
            Event::Device(e) => e.at,
        }
    }
}

/// Counters of a [`TelemetryRing`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStats {
    /// Events accepted.
    pub pushed: u64,
    /// Events dropped because the ring was full.
    pub dropped: u64,
    /// Events waiting now.
    pub queued: usize,
}

/// A bounded multi-producer ring that never blocks nor allocates on push.
#[derive(Debug)]
pub struct TelemetryRing {
    queue: ArrayQueue<Event>,
    pushed: AtomicU64,
    dropped: AtomicU64,
}

impl TelemetryRing {
    /// A ring holding up to `capacity` events (allocated once, here).
    pub fn new(capacity: usize) -> Result<TelemetryRing, TunerError> {
        if capacity == 0 {
            return Err(TunerError::config("TelemetryRing", "capacity must be positive"));
        }
        Ok(TelemetryRing { queue: ArrayQueue::new(capacity), pushed: AtomicU64::new(0), dropped: AtomicU64::new(0) })
    }

    /// Enqueues `ev`, or drops and counts it when full. Returns whether it
    /// was accepted. Lock-free, wait-free in the uncontended case, no allocation.
    #[inline]
    pub fn try_push(&self, ev: Event) -> bool {
        match self.queue.push(ev) {
            Ok(()) => {
                self.pushed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dequeues one event.
    #[inline]
    pub fn pop(&self) -> Option<Event> {
        self.queue.pop()
    }

    /// Dequeues up to `max` events into `f`; returns how many.
    pub fn drain(&self, max: usize, mut f: impl FnMut(Event)) -> usize {
        let mut n = 0;
        while n < max {
            match self.queue.pop() {
                Some(ev) => {
                    f(ev);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Current counters.
    pub fn stats(&self) -> RingStats {
        RingStats {
            pushed: self.pushed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            queued: self.queue.len(),
        }
    }

    /// Capacity in events.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn req(at: u64) -> Event {
        Event::Request(RequestEvent {
            at: Tick(at),
            variant: VariantId(0),
            cohort: Cohort::Control,
            context: ContextBucket(0),
            ttft: Micros(1_000),
            itl: Micros(50),
            tokens: 10,
            error: false,
        })
    }

    #[test]
    fn zero_capacity_is_an_error() {
        assert!(TelemetryRing::new(0).is_err());
    }

    #[test]
    fn full_ring_drops_and_counts() {
        let ring = TelemetryRing::new(4).unwrap();
        for i in 0..10 {
            ring.try_push(req(i));
        }
        let s = ring.stats();
        assert_eq!((s.pushed, s.dropped, s.queued), (4, 6, 4));
        let mut seen = Vec::new();
        assert_eq!(ring.drain(usize::MAX, |e| seen.push(e.at().0)), 4);
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn concurrent_producers_account_for_every_push() {
        let ring = Arc::new(TelemetryRing::new(256).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let r = Arc::clone(&ring);
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        r.try_push(req(t * 10_000 + i));
                    }
                })
            })
            .collect();
        let mut popped = 0u64;
        // Consume concurrently so some pushes succeed after the ring fills.
        for _ in 0..200 {
            popped += ring.drain(64, |_| {}) as u64;
            std::thread::yield_now();
        }
        for h in handles {
            h.join().unwrap();
        }
        popped += ring.drain(usize::MAX, |_| {}) as u64;
        let s = ring.stats();
        assert_eq!(s.pushed + s.dropped, 4_000);
        assert_eq!(s.pushed, popped);
    }
}
