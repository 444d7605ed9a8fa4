//! The CPU worker pool every CPU kernel splits its work over: ours
//! ([`crate::quant`]) and candle's CPU ops, which use the current rayon pool.
//!
//! A model step should run *on* one of the pool's threads
//! ([`install`]): then each parallel pass pushes its tasks onto the calling
//! worker's own queue, that worker does its share and the others steal the
//! rest. Called from outside (the engine thread), every pass would instead be
//! injected into the pool and the caller would sleep until it finished: two
//! cross-thread wake-ups per pass, a few hundred passes per decode token. On
//! 2 cores that hand-off measured 10–25 % of decode and prefill time
//! (`engine-bench`, README "Benchmarks").

use std::sync::OnceLock;

use rayon::{ThreadPool, ThreadPoolBuilder};

/// The pool, built on first use with rayon's default size (`RAYON_NUM_THREADS`,
/// else one thread per logical CPU), its threads named `arqon-cpu-N`; `None`
/// if its threads could not be spawned (reported once; callers then run on
/// rayon's global pool).
fn pool() -> Option<&'static ThreadPool> {
    static POOL: OnceLock<Option<ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| match ThreadPoolBuilder::new().thread_name(|i| format!("arqon-cpu-{i}")).build() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("arqon: warning: CPU worker pool: {e}; using rayon's global pool");
            None
        }
    })
    .as_ref()
}

/// Runs `op` on a thread of the CPU pool (inline when already on one) and
/// returns its result; parallel iterators and candle's CPU ops inside it use
/// that pool.
pub fn install<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(op),
        None => op(),
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    #[test]
    fn install_runs_on_the_pool_and_nests_inline() {
        let outer = super::install(|| {
            let here = rayon::current_thread_index();
            assert!(here.is_some(), "install runs on a pool thread");
            let name = std::thread::current().name().map(str::to_owned);
            assert!(name.as_deref().is_some_and(|n| n.starts_with("arqon-cpu-")), "{name:?}");
            // Nested: inline, on the same thread.
            let inner = super::install(rayon::current_thread_index);
            assert_eq!(inner, here);
            (0..1000u64).into_par_iter().sum::<u64>()
        });
        assert_eq!(outer, 499_500);
        assert!(rayon::current_thread_index().is_none());
    }
}
