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
