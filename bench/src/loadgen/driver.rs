//! Runs one load level: closed loop (fixed workers, back-to-back) or open loop (Poisson
//! arrivals). Both are bounded twice: at most `requests` requests, and none started after
//! the level's time limit; each request is bounded by its own timeout, so a level ends
//! at most `level_timeout + request_timeout` after it starts, whatever the server does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use super::client::{send, Prepared, Record};
use super::config::{Limits, Mode, RequestSpec, Target};

/// What every request task needs, shared read-only.
#[derive(Debug)]
pub struct Shared {
    /// Where to send.
    pub target: Target,
    /// What to send.
    pub spec: RequestSpec,
    /// Bounds.
    pub limits: Limits,
}

/// The records of one level and how long it took.
#[derive(Debug)]
pub struct LevelRun {
    /// The level.
    pub mode: Mode,
    /// One record per request sent, in completion order per worker.
    pub records: Vec<Record>,
    /// Requests never sent because the level's time limit passed first.
    pub unsent: u32,
    /// Level start to the end of its last response.
    pub wall: Duration,
}

/// Sends `count` requests one at a time and discards them (warm-up).
/// Request indices start at `first_index`, so warm-up prompts are not reused later.
pub async fn warm_up(shared: &Shared, count: u32, first_index: u64) -> Vec<Record> {
    let start = Instant::now();
    let mut records = Vec::new();
    for i in 0..u64::from(count) {
        let request = Prepared::new(&shared.target, &shared.spec, first_index + i);
        records.push(send(&request, shared.limits.request_timeout, start).await);
    }
    records
}

/// Runs one level. Request indices start at `first_index` (distinct prompts across levels).
pub async fn run_level(shared: &Arc<Shared>, mode: Mode, first_index: u64, seed: u64) -> LevelRun {
    let start = Instant::now();
    let (records, sent) = match mode {
        Mode::Closed { workers } => closed_loop(shared, workers, first_index, start).await,
        Mode::Open { rps } => open_loop(shared, rps, first_index, seed, start).await,
    };
    let wall = records.iter().map(|r| r.finished_at).max().unwrap_or_default();
    let unsent = shared.limits.requests.saturating_sub(sent);
    LevelRun { mode, records, unsent, wall }
}

/// `workers` tasks share one counter of requests; each takes the next number, sends,
/// waits for the whole stream, and repeats until the count or the time limit is reached.
async fn closed_loop(shared: &Arc<Shared>, workers: u32, first_index: u64, start: Instant) -> (Vec<Record>, u32) {
    let next = Arc::new(AtomicU64::new(0));
    let total = u64::from(shared.limits.requests);
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let shared = Arc::clone(shared);
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut records = Vec::new();
            loop {
                if start.elapsed() >= shared.limits.level_timeout {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let request = Prepared::new(&shared.target, &shared.spec, first_index + i);
                records.push(send(&request, shared.limits.request_timeout, start).await);
            }
            records
        });
    }
    let records = join_all(tasks).await;
    let sent = u32::try_from(records.len()).unwrap_or(u32::MAX);
    (records, sent)
}

/// Requests start at Poisson arrival times (exponential gaps with mean `1/rps`), each in
/// its own task, regardless of how many are still in flight: the open-loop behaviour that
/// shows queueing a closed loop hides.
async fn open_loop(shared: &Arc<Shared>, rps: f64, first_index: u64, seed: u64, start: Instant) -> (Vec<Record>, u32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tasks = JoinSet::new();
    let mut at = Duration::ZERO;
    let mut sent = 0;
    for i in 0..u64::from(shared.limits.requests) {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u: f64 = rng.gen();
        at += Duration::from_secs_f64(-(1.0 - u).ln() / rps);
        if at >= shared.limits.level_timeout {
            break;
        }
        tokio::time::sleep_until((start + at).into()).await;
        let shared = Arc::clone(shared);
        tasks.spawn(async move {
            let request = Prepared::new(&shared.target, &shared.spec, first_index + i);
            vec![send(&request, shared.limits.request_timeout, start).await]
        });
        sent += 1;
    }
    (join_all(tasks).await, sent)
}

/// Collects every task's records. A task that panicked (it cannot: `send` turns every
/// server behaviour into a record) would lose only its own records.
async fn join_all(mut tasks: JoinSet<Vec<Record>>) -> Vec<Record> {
    let mut records = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(mut batch) => records.append(&mut batch),
            Err(err) => eprintln!("loadgen: a request task failed: {err}"),
        }
    }
    records
}
