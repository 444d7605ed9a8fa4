//! Model check of the slot protocol (`arqon_variants::slot`) with loom: every
//! interleaving of a reader that pins the active variant, a swapper that
//! replaces it, and the reaper.
//!
//! Run: `cargo test -p arqon-slot-loom` (part of `cargo test --workspace`).
//! This crate compiles `variants/src/slot.rs` with `--cfg loom`, where the
//! slot's `ArcSwap` is a loom `Mutex<Arc<_>>`: what is checked is our
//! protocol (pins, hand-off to the reaper, exactly-once free, no free while
//! pinned), not arc-swap itself.

use arqon_slot_loom::slot::{Pinned, Reaper, Slot};
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{mpsc, Arc, Mutex};
use loom::thread;

struct Variant {
    id: usize,
    freed: Arc<[AtomicUsize; 2]>,
    freed_on: Arc<Mutex<Vec<thread::ThreadId>>>,
}

impl Drop for Variant {
    fn drop(&mut self) {
        self.freed[self.id].fetch_add(1, Ordering::SeqCst);
        self.freed_on.lock().unwrap().push(thread::current().id());
    }
}

/// What the runtime keeps in the slot: the variant new requests take.
struct Routing {
    active: Pinned<Variant>,
}

#[test]
fn swap_while_a_request_pins_frees_each_variant_once_on_the_reaper() {
    loom::model(|| {
        let freed = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let freed_on = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let reaper = Reaper::with_channel(tx);
        let reaper_thread = thread::spawn(move || {
            // loom's channel does not report disconnection, so the reaper
            // takes exactly the releases this model makes: one per `Pinned`
            // ever made (two loads into the slot, one request's clone).
            for _ in 0..3 {
                drop(rx.recv().unwrap());
            }
            thread::current().id()
        });
        let mk = |id| Variant { id, freed: freed.clone(), freed_on: freed_on.clone() };
        let old = reaper.pin(mk(0));
        let new = reaper.pin(mk(1));
        let slot = Arc::new(Slot::new(Routing { active: old }));

        let reader = {
            let slot = slot.clone();
            let freed = freed.clone();
            thread::spawn(move || {
                // Admission: read the slot once, pin the variant, serve on it.
                let pin = slot.load().active.clone();
                let id = pin.id;
                assert_eq!(freed[id].load(Ordering::SeqCst), 0, "a pinned variant was freed");
                drop(pin);
                id
            })
        };
        let swapper = {
            let slot = slot.clone();
            thread::spawn(move || drop(slot.store(Routing { active: new })))
        };
        let served = reader.join().unwrap();
        swapper.join().unwrap();
        assert!(served == 0 || served == 1);
        // The new variant is active and alive; the old one is gone or going.
        assert_eq!(slot.load().active.id, 1);
        assert_eq!(freed[1].load(Ordering::SeqCst), 0);
        drop(slot);
        drop(reaper);
        let reaper_id = reaper_thread.join().unwrap();
        for id in 0..2 {
            assert_eq!(freed[id].load(Ordering::SeqCst), 1, "variant {id} freed exactly once");
        }
        assert!(freed_on.lock().unwrap().iter().all(|t| *t == reaper_id), "a variant was freed off the reaper");
    });
}
