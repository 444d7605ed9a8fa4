//! Process-level configuration: the only place that reads the environment
//! (the CLI reads its `ARQON_*` variables through clap's `env`).

use std::path::PathBuf;

use crate::fetch::FetchOptions;

/// Arqon's home: `$ARQON_HOME`, else `~/.cache/arqon`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("ARQON_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("arqon")
}

/// Fetch options for a given home (models cached under `home/models`).
pub fn fetch_options(home: Option<PathBuf>, progress: bool) -> FetchOptions {
    let home = home.unwrap_or_else(default_home);
    let python = std::env::var("ARQON_PYTHON").unwrap_or_else(|_| "python3".to_string());
    FetchOptions { cache_dir: home.join("models"), python, progress }
}

/// Process-wide CPU threading defaults, set once at the start of `main`
/// while the process is still single-threaded (setting the environment
/// later would race with threads reading it).
///
/// candle's matmul thread pool spins 25 000 times before it parks; its
/// spinning threads then compete with our rayon pool (the Q4_1 kernel) for
/// the same cores. Parking after 100 spins measured +10–20 % prefill tokens/s
/// and +1–2 % decode on 2 cores (`engine-bench`, two A/B pairs in one run,
/// 2026-12-01). An explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` wins.
pub fn init_cpu_threading() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
}
