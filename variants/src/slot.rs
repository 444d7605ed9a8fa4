//! The variant slot: which variant new requests take, swapped atomically, and
//! the protocol that frees a replaced variant off the hot path.
//!
//! Purpose: the scheduler reads the slot once per admission ([`Slot::load`],
//! lock-free: `arc_swap::ArcSwap`) and pins what it read for the life of the
//! request; the control thread swaps in a new value ([`Slot::store`]).
//! Requests in flight keep the variant they pinned, new ones take the new
//! one, none fails.
//!
//! The protocol (model-checked with loom by `variants/loom`, which compiles
//! this file with `--cfg loom`):
//! - every strong reference to a variant is a [`Pinned`]; there are no bare
//!   `Arc`s of variants anywhere else (the slot's value holds `Pinned`s too);
//! - dropping a [`Pinned`] never frees the variant where it is dropped: it
//!   moves its `Arc` into the [`Reaper`]'s channel (one non-blocking send), and
//!   the reaper thread drops it. So whichever reference goes last (the
//!   scheduler's, the slot's, the resident set's), the variant's weights are
//!   freed on the reaper thread, never on the engine thread mid-step;
//! - a variant is freed exactly once, after its last pin is gone, and never
//!   while a reader can still reach it.
//!
//! Usage: `let reaper = Reaper::spawn("arqon-reaper")?; let v = reaper.pin(variant);`
//! then put `v.clone()`s in the slot's value and in each request.

use std::fmt;
use std::ops::Deref;

#[cfg(loom)]
use loom::sync::{mpsc, Arc, Mutex};
#[cfg(not(loom))]
use std::sync::Arc;

/// A counted reference to a variant whose last release is carried out by the
/// [`Reaper`], not by the thread that drops it.
pub struct Pinned<T: Send + Sync + 'static> {
    arc: Option<Arc<T>>,
    tx: Tx<T>,
}

impl<T: Send + Sync + 'static> Pinned<T> {
    /// Whether two pins refer to the same variant.
    pub fn same(a: &Pinned<T>, b: &Pinned<T>) -> bool {
        match (&a.arc, &b.arc) {
            (Some(x), Some(y)) => Arc::ptr_eq(x, y),
            _ => false,
        }
    }
}

impl<T: Send + Sync + 'static> Clone for Pinned<T> {
    fn clone(&self) -> Self {
        Pinned { arc: self.arc.clone(), tx: self.tx.clone() }
    }
}

impl<T: Send + Sync + 'static> Deref for Pinned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // Only `drop` takes the Arc out.
        self.arc.as_deref().expect("a live Pinned holds its Arc")
    }
}

impl<T: Send + Sync + 'static + fmt::Debug> fmt::Debug for Pinned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pinned").field(&self.arc).finish()
    }
}

impl<T: Send + Sync + 'static> Drop for Pinned<T> {
    fn drop(&mut self) {
        if let Some(arc) = self.arc.take() {
            // A failed send means the reaper is gone (process exit): the Arc
            // comes back in the error and is dropped here, which is then fine.
            let _ = self.tx.send(arc);
        }
    }
}

#[cfg(not(loom))]
type Tx<T> = crossbeam::channel::Sender<Arc<T>>;
#[cfg(loom)]
type Tx<T> = mpsc::Sender<Arc<T>>;

/// The thread that frees released variants.
pub struct Reaper<T: Send + Sync + 'static> {
    tx: Tx<T>,
}

impl<T: Send + Sync + 'static> Clone for Reaper<T> {
    fn clone(&self) -> Self {
        Reaper { tx: self.tx.clone() }
    }
}

impl<T: Send + Sync + 'static> fmt::Debug for Reaper<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reaper")
    }
}

impl<T: Send + Sync + 'static> Reaper<T> {
    /// Starts the reaper thread. It runs until every [`Reaper`] and
    /// [`Pinned`] handle is gone, dropping each `Arc` it receives and calling
    /// `on_free` with each value it frees last (outside any lock).
    #[cfg(not(loom))]
    pub fn spawn(name: &str, on_free: impl Fn(&T) + Send + 'static) -> std::io::Result<Reaper<T>> {
        let (tx, rx) = crossbeam::channel::unbounded::<Arc<T>>();
        std::thread::Builder::new().name(name.to_string()).spawn(move || {
            for arc in rx {
                if let Some(v) = Arc::into_inner(arc) {
                    on_free(&v);
                    drop(v);
                }
            }
        })?;
        Ok(Reaper { tx })
    }

    /// A reaper over an explicit channel (loom tests drive the receiving end).
    #[cfg(loom)]
    pub fn with_channel(tx: mpsc::Sender<Arc<T>>) -> Reaper<T> {
        Reaper { tx }
    }

    /// The first pin of a freshly loaded variant.
    pub fn pin(&self, value: T) -> Pinned<T> {
        Pinned { arc: Some(Arc::new(value)), tx: self.tx.clone() }
    }
}

/// The atomic slot: readers never block, a store never waits for readers.
pub struct Slot<R> {
    #[cfg(not(loom))]
    cell: arc_swap::ArcSwap<R>,
    #[cfg(loom)]
    cell: Mutex<Arc<R>>,
}

impl<R> fmt::Debug for Slot<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl<R> Slot<R> {
    /// A slot holding `value`.
    pub fn new(value: R) -> Slot<R> {
        #[cfg(not(loom))]
        return Slot { cell: arc_swap::ArcSwap::from_pointee(value) };
        #[cfg(loom)]
        return Slot { cell: Mutex::new(Arc::new(value)) };
    }

    /// The current value (one atomic load and a reference-count increment).
    pub fn load(&self) -> Arc<R> {
        #[cfg(not(loom))]
        return self.cell.load_full();
        #[cfg(loom)]
        return self.cell.lock().expect("loom mutex").clone();
    }

    /// Replaces the value; returns the previous one (the caller drops it,
    /// which releases its pins through the reaper).
    pub fn store(&self, value: R) -> Arc<R> {
        #[cfg(not(loom))]
        return self.cell.swap(Arc::new(value));
        #[cfg(loom)]
        return std::mem::replace(&mut *self.cell.lock().expect("loom mutex"), Arc::new(value));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc as std_mpsc;

    struct Weights {
        id: u32,
        freed: std::sync::Arc<AtomicUsize>,
    }
    impl Drop for Weights {
        fn drop(&mut self) {
            assert_eq!(std::thread::current().name(), Some("test-reaper"), "freed off the reaper thread");
            self.freed.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_last_pin_frees_on_the_reaper_thread_only() {
        let freed = std::sync::Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = std_mpsc::channel();
        let reaper = Reaper::spawn("test-reaper", move |w: &Weights| done_tx.send(w.id).unwrap()).unwrap();
        let a = reaper.pin(Weights { id: 1, freed: freed.clone() });
        let b = reaper.pin(Weights { id: 2, freed: freed.clone() });
        let slot = Slot::new(a.clone());
        let in_flight = (*slot.load()).clone();
        drop(a);
        drop(slot.store(b.clone()));
        drop(b);
        // Variant 1 is still pinned by the request in flight.
        assert_eq!(in_flight.id, 1);
        assert!(done_rx.recv_timeout(std::time::Duration::from_millis(50)).is_err());
        drop(in_flight);
        assert_eq!(done_rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(slot.load().id, 2);
        // `on_free` runs just before the value is dropped, on the reaper.
        let t0 = std::time::Instant::now();
        while freed.load(Ordering::SeqCst) == 0 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }
}
