//! The load generator's command line, parsed once into a validated [`Config`].
//!
//! Invariants a `Config` guarantees: the target is a loopback address (this tool must
//! never send traffic off the machine); every level is bounded by a request count and a
//! wall-clock limit; every request by its own timeout; `max_tokens` ≥ 1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};

/// Streaming load generator for OpenAI-compatible servers, loopback only.
///
/// Closed loop: `--concurrency 1,4,16` runs each level with that many workers, each
/// sending its next request when the previous one ends. Open loop: `--open-loop-rps 2,8`
/// sends requests at Poisson arrival times at that mean rate, however many are in flight.
/// Each level sends `--requests` requests and stops after `--level-timeout-s`.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// Server base URL; must be loopback (127.0.0.0/8, ::1 or localhost).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Model name sent in the request body.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Name of the server in the table and JSON (default: the URL).
    #[arg(long)]
    pub label: Option<String>,
    /// Which endpoint to load.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Closed-loop levels: comma-separated worker counts.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<u32>,
    /// Open-loop levels: comma-separated mean arrival rates in requests/s.
    #[arg(long, value_delimiter = ',')]
    pub open_loop_rps: Vec<f64>,
    /// Requests per level (successful or not).
    #[arg(long, default_value_t = 32)]
    pub requests: u32,
    /// Untimed requests sent one at a time before the first level.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Output tokens asked for per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// File holding the prompt text.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Send the prompt unchanged in every request, letting servers reuse a cached prefix.
    /// By default each request starts with its own line, as distinct users' prompts would.
    #[arg(long)]
    pub same_prompt: bool,
    /// Do not send `"ignore_eos": true` (for servers that reject unknown fields).
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Token ids to ban with `"logit_bias": {id: -100}`: for servers without
    /// `ignore_eos` (llama-cpp-python's), banning the end-of-sequence tokens does the same.
    #[arg(long, value_delimiter = ',')]
    pub ban_tokens: Vec<u32>,
    /// Do not ask for `stream_options.include_usage`; tokens are then counted as chunks.
    #[arg(long)]
    pub no_usage: bool,
    /// Count a stream that stops early with finish_reason "stop" as a success.
    #[arg(long)]
    pub allow_early_stop: bool,
    /// Bearer token for the Authorization header.
    #[arg(long, env = "LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout_s: f64,
    /// Per-level wall-clock limit in seconds: no request starts after it, and requests
    /// still running one request-timeout later are cut off.
    #[arg(long, default_value_t = 300.0)]
    pub level_timeout_s: f64,
    /// Seed for open-loop arrival times.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The request API to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `POST /v1/completions` with a `prompt`.
    Completions,
    /// `POST /v1/chat/completions` with one user message.
    Chat,
}

impl Endpoint {
    /// Path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// A loopback HTTP server: where to connect, and what to put in `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Socket address to connect to; always loopback.
    pub addr: SocketAddr,
    /// `host:port` as given, for the `Host` header.
    pub authority: String,
    /// Path prefix from the URL without a trailing slash (usually empty).
    pub base_path: String,
}

impl Target {
    /// Parses `http://HOST:PORT[/prefix]`, refusing anything that is not loopback.
    pub fn parse(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--url must start with http:// (got {url:?})");
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p.parse::<u16>().with_context(|| format!("bad port in {url:?}"))?),
            _ => (authority, 80),
        };
        let ip = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .with_context(|| format!("--url host must be an IP literal or localhost (got {h:?})"))?,
        };
        ensure!(ip.is_loopback(), "--url must be loopback; {ip} is not");
        let base_path = format!("/{}", path.trim_end_matches('/'));
        let base_path = base_path.trim_end_matches('/').to_owned();
        Ok(Self { addr: SocketAddr::new(ip, port), authority: authority.to_owned(), base_path })
    }
}

/// One load level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `workers` workers, each sending back-to-back requests.
    Closed {
        /// Number of concurrent workers (≥ 1).
        workers: u32,
    },
    /// Poisson arrivals at a mean `rps` requests/s (> 0), unbounded in flight.
    Open {
        /// Mean arrival rate.
        rps: f64,
    },
}

impl Mode {
    /// `closed` or `open`, for the table and JSON.
    pub fn kind(self) -> &'static str {
        match self {
            Mode::Closed { .. } => "closed",
            Mode::Open { .. } => "open",
        }
    }

    /// The level's load figure: workers, or requests/s.
    pub fn level(self) -> f64 {
        match self {
            Mode::Closed { workers } => f64::from(workers),
            Mode::Open { rps } => rps,
        }
    }
}

/// What every request of a run asks for.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// `model` field.
    pub model: String,
    /// Prompt text (before any per-request line).
    pub prompt: String,
    /// Prefix each prompt with a line naming its request, so no two prompts share a prefix.
    pub distinct_prompts: bool,
    /// Output tokens asked for (≥ 1).
    pub max_tokens: u32,
    /// Send `"ignore_eos": true`.
    pub ignore_eos: bool,
    /// Ask for usage in the stream.
    pub include_usage: bool,
    /// Token ids sent with a -100 logit bias (none: no `logit_bias` field).
    pub ban_tokens: Vec<u32>,
    /// Count an early stop with finish_reason "stop" as success.
    pub allow_early_stop: bool,
    /// Bearer token.
    pub api_key: Option<String>,
}

/// Bounds on a run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests per level (≥ 1).
    pub requests: u32,
    /// Untimed warm-up requests before the first level.
    pub warmup: u32,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Per-level limit on starting requests.
    pub level_timeout: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server name in reports.
    pub label: String,
    /// Where to send requests.
    pub target: Target,
    /// What to send.
    pub spec: RequestSpec,
    /// Levels, in the order they run: closed levels first, then open ones.
    pub modes: Vec<Mode>,
    /// Bounds.
    pub limits: Limits,
    /// Seed for open-loop arrivals.
    pub seed: u64,
    /// JSON report path.
    pub json: Option<PathBuf>,
}

/// The prompt used when none is given: it keeps a small model counting for as long as
/// asked, so a stream that stops early says something about the server, not the text.
const DEFAULT_PROMPT: &str = "Count upward from one, one number per line, and never stop.\n1\n2\n3\n4\n5\n6\n";

/// Longest request and level timeouts accepted, to keep every run bounded.
const MAX_TIMEOUT_S: f64 = 3600.0;
/// Most requests per level accepted.
const MAX_REQUESTS: u32 = 100_000;
/// Most concurrent workers accepted.
const MAX_WORKERS: u32 = 4096;

impl Config {
    /// Validates the command line.
    pub fn from_args(args: Args) -> Result<Self> {
        let target = Target::parse(&args.url)?;
        let prompt = match (&args.prompt, &args.prompt_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).with_context(|| format!("reading --prompt-file {}", path.display()))?
            }
            (None, None) => DEFAULT_PROMPT.to_owned(),
        };
        ensure!(!prompt.is_empty(), "the prompt is empty");
        ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
        ensure!((1..=MAX_REQUESTS).contains(&args.requests), "--requests must be in 1..={MAX_REQUESTS}");
        let request_timeout = seconds("--request-timeout-s", args.request_timeout_s)?;
        let level_timeout = seconds("--level-timeout-s", args.level_timeout_s)?;
        let mut modes = Vec::new();
        for &workers in &args.concurrency {
            ensure!((1..=MAX_WORKERS).contains(&workers), "--concurrency values must be in 1..={MAX_WORKERS}");
            modes.push(Mode::Closed { workers });
        }
        for &rps in &args.open_loop_rps {
            ensure!(rps.is_finite() && rps > 0.0, "--open-loop-rps values must be positive");
            modes.push(Mode::Open { rps });
        }
        if modes.is_empty() {
            modes.push(Mode::Closed { workers: 1 });
        }
        let spec = RequestSpec {
            endpoint: args.endpoint,
            model: args.model,
            prompt,
            distinct_prompts: !args.same_prompt,
            max_tokens: args.max_tokens,
            ignore_eos: !args.no_ignore_eos,
            include_usage: !args.no_usage,
            ban_tokens: args.ban_tokens,
            allow_early_stop: args.allow_early_stop,
            api_key: args.api_key,
        };
        let limits = Limits { requests: args.requests, warmup: args.warmup, request_timeout, level_timeout };
        Ok(Self {
            label: args.label.unwrap_or_else(|| args.url.clone()),
            target,
            spec,
            modes,
            limits,
            seed: args.seed,
            json: args.json,
        })
    }
}

/// A positive, bounded number of seconds.
fn seconds(flag: &str, value: f64) -> Result<Duration> {
    ensure!(value.is_finite() && value > 0.0 && value <= MAX_TIMEOUT_S, "{flag} must be in (0, {MAX_TIMEOUT_S}]");
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_parse() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((t.authority.as_str(), t.base_path.as_str()), ("127.0.0.1:8080", ""));
        let t = Target::parse("http://localhost:9/api/").unwrap();
        assert_eq!((t.addr.port(), t.base_path.as_str()), (9, "/api"));
        assert!(Target::parse("http://[::1]:8000").unwrap().addr.ip().is_loopback());
        assert_eq!(Target::parse("http://127.0.0.1").unwrap().addr.port(), 80);
    }

    #[test]
    fn non_loopback_and_bad_urls_are_refused() {
        for url in
            ["http://10.0.0.1:80", "http://example.com:80", "https://127.0.0.1:1", "127.0.0.1:80", "http://127.0.0.1:x"]
        {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn levels_and_bounds_are_checked() {
        let parse = |extra: &[&str]| {
            let argv = ["loadgen"].iter().chain(extra).copied();
            Config::from_args(Args::try_parse_from(argv)?)
        };
        let c = parse(&["--concurrency", "1,4", "--open-loop-rps", "2.5"]).unwrap();
        assert_eq!(c.modes, vec![Mode::Closed { workers: 1 }, Mode::Closed { workers: 4 }, Mode::Open { rps: 2.5 }]);
        assert!(c.spec.distinct_prompts && c.spec.ignore_eos);
        assert_eq!(parse(&[]).unwrap().modes, vec![Mode::Closed { workers: 1 }]);
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--open-loop-rps", "0"]).is_err());
        assert!(parse(&["--requests", "0"]).is_err());
        assert!(parse(&["--max-tokens", "0"]).is_err());
        assert!(parse(&["--request-timeout-s=-1"]).is_err());
        assert!(parse(&["--url", "http://192.168.1.1:80"]).is_err());
    }
}
