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

/// Where a model runs: `--device auto|cpu|cuda[:N]` (`ARQON_DEVICE`), parsed
/// once here; [`crate::device::open`] turns it into a candle `Device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has the `cuda` feature and the device
    /// opens, the CPU otherwise.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device `N` (an error in a build without the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The `--device` flag, flattened into every command that loads a model.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct DeviceArgs {
    /// Where the model runs: `auto` (CUDA device 0 if this build has CUDA and
    /// a device opens, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "ARQON_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
}

#[cfg(test)]
mod tests {
    use super::DeviceChoice;

    #[test]
    fn device_choice_parses_every_spelling_and_refuses_the_rest() {
        let ok = [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(want), "{s}");
        }
        for s in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "metal", "cuda0"] {
            let e = s.parse::<DeviceChoice>().expect_err(s);
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        }
    }

    #[test]
    fn device_choice_displays_as_it_parses() {
        for d in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(0), DeviceChoice::Cuda(7)] {
            assert_eq!(d.to_string().parse::<DeviceChoice>(), Ok(d));
        }
    }
}
