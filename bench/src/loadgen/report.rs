//! Turns a level's records into figures, a Markdown table and JSON.
//!
//! Definitions (the same for every server, so the columns compare):
//! - requests/s and output tokens/s count successful requests only, over the level's
//!   wall time (start to the end of its last response); `all_tokens_per_s` counts every
//!   token received, failed requests included, so a server that streams fast but cuts
//!   streams short is visible as the gap between the two.
//! - TTFT: request start (before connect) to the first chunk with generated text.
//! - ITL: the gap between consecutive chunks with generated text, pooled over requests.
//!   All three servers measured send one token per chunk, so this is per-token latency.
//! - Latencies are over successful requests; tokens per request over all sent.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::driver::LevelRun;

/// A whole run against one server.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Server name.
    pub label: String,
    /// Base URL.
    pub url: String,
    /// Model name sent.
    pub model: String,
    /// `completions` or `chat`.
    pub endpoint: String,
    /// Tokens asked for per request.
    pub max_tokens: u32,
    /// Requests per level.
    pub requests_per_level: u32,
    /// One entry per level, in run order.
    pub levels: Vec<LevelReport>,
}

/// Figures for one level.
#[derive(Debug, Serialize)]
pub struct LevelReport {
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Workers (closed) or arrival rate in requests/s (open).
    pub level: f64,
    /// Requests sent.
    pub sent: u32,
    /// Requests that succeeded.
    pub ok: u32,
    /// Requests that failed (sum of `errors`).
    pub failed: u32,
    /// Requests not sent because the level's time limit passed.
    pub unsent: u32,
    /// Failures by kind.
    pub errors: BTreeMap<String, u32>,
    /// Level start to the end of its last response, seconds.
    pub wall_s: f64,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Output tokens of successful requests per second.
    pub output_tokens_per_s: f64,
    /// All output tokens received per second, failed requests included.
    pub all_tokens_per_s: f64,
    /// Time to first token, milliseconds.
    pub ttft_ms: Quantiles,
    /// Inter-token latency, milliseconds.
    pub itl_ms: Quantiles,
    /// End-to-end request latency, milliseconds.
    pub e2e_ms: Quantiles,
    /// Tokens received per request, over all sent.
    pub tokens_per_request: TokenCounts,
}

/// Distribution summary, milliseconds; all `None` when there were no samples.
#[derive(Debug, Default, Serialize)]
pub struct Quantiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest sample.
    pub max: Option<f64>,
}

/// Tokens received per request.
#[derive(Debug, Default, Serialize)]
pub struct TokenCounts {
    /// Tokens asked for.
    pub asked: u32,
    /// Fewest received.
    pub min: u32,
    /// Mean received.
    pub mean: f64,
    /// Most received.
    pub max: u32,
    /// Mean chunks with generated text per request; equal to `mean` when the server
    /// sends one token per chunk (ITL is per chunk, so per token only then).
    pub chunks_mean: f64,
}

/// Microsecond histogram, 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()
}

fn quantiles<'a>(samples: impl Iterator<Item = &'a Duration>) -> Quantiles {
    let Some(mut h) = histogram() else { return Quantiles::default() };
    for d in samples {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        h.saturating_record(micros);
    }
    if h.is_empty() {
        return Quantiles::default();
    }
    let ms = |micros: u64| Some(micros as f64 / 1000.0);
    Quantiles {
        count: h.len(),
        mean: Some(h.mean() / 1000.0),
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

impl LevelReport {
    /// Summarises one level; `asked` is the tokens asked for per request.
    pub fn new(run: &LevelRun, asked: u32) -> Self {
        let sent = u32::try_from(run.records.len()).unwrap_or(u32::MAX);
        let mut errors = BTreeMap::new();
        for failure in run.records.iter().filter_map(|r| r.failure.as_ref()) {
            *errors.entry(failure.label()).or_insert(0u32) += 1;
        }
        let failed = errors.values().sum();
        let good: Vec<_> = run.records.iter().filter(|r| r.failure.is_none()).collect();
        let wall_s = run.wall.as_secs_f64();
        let per_s = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        let ok_tokens: u64 = good.iter().map(|r| u64::from(r.tokens)).sum();
        let all_tokens: u64 = run.records.iter().map(|r| u64::from(r.tokens)).sum();
        let tokens = run.records.iter().map(|r| r.tokens);
        let tokens_per_request = TokenCounts {
            asked,
            min: tokens.clone().min().unwrap_or(0),
            mean: if sent > 0 { all_tokens as f64 / f64::from(sent) } else { 0.0 },
            max: tokens.max().unwrap_or(0),
            chunks_mean: if sent > 0 {
                run.records.iter().map(|r| f64::from(r.text_chunks)).sum::<f64>() / f64::from(sent)
            } else {
                0.0
            },
        };
        Self {
            mode: run.mode.kind(),
            level: run.mode.level(),
            sent,
            ok: u32::try_from(good.len()).unwrap_or(u32::MAX),
            failed,
            unsent: run.unsent,
            errors,
            wall_s,
            requests_per_s: per_s(good.len() as u64),
            output_tokens_per_s: per_s(ok_tokens),
            all_tokens_per_s: per_s(all_tokens),
            ttft_ms: quantiles(good.iter().filter_map(|r| r.ttft.as_ref())),
            itl_ms: quantiles(good.iter().flat_map(|r| r.gaps.iter())),
            e2e_ms: quantiles(good.iter().map(|r| &r.e2e)),
            tokens_per_request,
        }
    }
}

/// The table header, shared by [`markdown_row`].
pub const MARKDOWN_HEADER: &str = "| server | mode | level | ok/sent | errors | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 ms | tok/req min/mean/max |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn fmt_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// One Markdown row for `level` of server `label`.
pub fn markdown_row(label: &str, level: &LevelReport) -> String {
    let errors = if level.errors.is_empty() {
        "0".to_owned()
    } else {
        level.errors.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(" ")
    };
    let errors = if level.unsent > 0 { format!("{errors} (unsent {})", level.unsent) } else { errors };
    let t = &level.tokens_per_request;
    let mut row = String::new();
    let _ = write!(
        row,
        "| {label} | {} | {} | {}/{} | {errors} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {}/{:.1}/{} |",
        level.mode,
        level.level,
        level.ok,
        level.sent,
        level.requests_per_s,
        level.output_tokens_per_s,
        fmt_ms(level.ttft_ms.p50),
        fmt_ms(level.ttft_ms.p99),
        fmt_ms(level.itl_ms.p50),
        fmt_ms(level.itl_ms.p99),
        fmt_ms(level.e2e_ms.p50),
        t.min,
        t.mean,
        t.max,
    );
    row
}

/// The whole report as a Markdown table.
pub fn markdown(report: &Report) -> String {
    let mut out = String::from(MARKDOWN_HEADER);
    for level in &report.levels {
        out.push('\n');
        out.push_str(&markdown_row(&report.label, level));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::client::{Failure, Record};
    use crate::loadgen::config::Mode;

    fn record(tokens: u32, failure: Option<Failure>, ttft_ms: u64) -> Record {
        Record {
            failure,
            detail: None,
            ttft: Some(Duration::from_millis(ttft_ms)),
            gaps: vec![Duration::from_millis(10); tokens.saturating_sub(1) as usize],
            tokens,
            text_chunks: tokens,
            e2e: Duration::from_millis(ttft_ms + 10 * u64::from(tokens)),
            finished_at: Duration::from_secs(1),
        }
    }

    #[test]
    fn failures_are_counted_and_excluded_from_goodput() {
        let run = LevelRun {
            mode: Mode::Closed { workers: 2 },
            records: vec![record(4, None, 20), record(4, None, 40), record(1, Some(Failure::Short), 5)],
            unsent: 1,
            wall: Duration::from_secs(2),
        };
        let r = LevelReport::new(&run, 4);
        assert_eq!((r.sent, r.ok, r.failed, r.unsent), (3, 2, 1, 1));
        assert_eq!(r.errors.get("short"), Some(&1));
        assert!((r.output_tokens_per_s - 4.0).abs() < 1e-9);
        assert!((r.all_tokens_per_s - 4.5).abs() < 1e-9);
        assert!((r.requests_per_s - 1.0).abs() < 1e-9);
        assert_eq!((r.tokens_per_request.min, r.tokens_per_request.max), (1, 4));
        assert_eq!(r.ttft_ms.count, 2);
        assert!((r.ttft_ms.p50.unwrap() - 20.0).abs() < 0.1);
        assert!((r.itl_ms.p99.unwrap() - 10.0).abs() < 0.1);
        let row = markdown_row("x", &r);
        assert!(row.contains("| 2/3 | short:1 (unsent 1) |"), "{row}");
    }

    #[test]
    fn empty_level_has_no_latencies() {
        let run = LevelRun { mode: Mode::Open { rps: 1.0 }, records: vec![], unsent: 0, wall: Duration::ZERO };
        let r = LevelReport::new(&run, 8);
        assert_eq!((r.sent, r.requests_per_s, r.ttft_ms.p50), (0, 0.0, None));
        assert!(markdown_row("x", &r).contains("| - |"));
    }
}
