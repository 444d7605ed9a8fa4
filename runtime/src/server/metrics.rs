//! Prometheus metrics, written in the text exposition format by hand: a few
//! counters, gauges and fixed-bucket histograms on atomics. (A metrics crate
//! would bring a registry, global state and a dependency tree for what is
//! ~150 lines; rejected.)
//!
//! Writers (handlers, the engine thread) only do relaxed atomic adds; a
//! scrape reads each value once, so one scrape may mix values from two
//! instants, as Prometheus clients allow.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::control::telemetry::{DeviceKind, DeviceTelemetry};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets it.
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Latency bucket bounds in seconds (1 ms to 60 s).
const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| s <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// HTTP statuses counted by `arqon_requests_total{status}` (index = status - 100).
const STATUSES: usize = 500;

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Vec<AtomicU64>,
    /// Time from arrival to a sequence's first token.
    pub ttft: Histogram,
    /// Time between a sequence's tokens.
    pub itl: Histogram,
    /// Time from arrival to a sequence's end.
    pub e2e: Histogram,
    /// Prompt tokens admitted, once per prompt (its `n` choices share it).
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Sequences freed because their client went away.
    pub cancelled: Counter,
    /// Sequences in the running batch.
    pub running: Gauge,
    /// Preemptions: a sequence's blocks freed for others, to compute again.
    pub preemptions: Counter,
    /// Preempted sequences waiting to resume.
    pub preempted: Gauge,
    /// Bytes the KV cache holds.
    pub kv_bytes: Gauge,
    /// Bytes running sequences hold or were promised for their prompts.
    pub kv_reserved_bytes: Gauge,
    /// Sequences in the KV cache.
    pub kv_sequences: Gauge,
    /// The KV budget.
    pub kv_budget_bytes: Gauge,
    /// Blocks in the paged KV cache.
    pub kv_blocks_total: Gauge,
    /// Blocks sequences hold.
    pub kv_blocks_used: Gauge,
    /// Blocks no sequence holds that keep a cached prefix.
    pub kv_blocks_cached: Gauge,
    /// Prompt tokens of requests that looked up the prefix cache.
    pub prefix_queried_tokens: Counter,
    /// Prompt tokens found there (not computed again).
    pub prefix_hit_tokens: Counter,
    /// Tokens drafted by self-speculative steps.
    pub spec_drafted: Counter,
    /// Drafted tokens the full model accepted.
    pub spec_accepted: Counter,
    /// Rows of steps' logits by what the host took of each: the whole row,
    /// its argmax, its best candidates, its weights and one chunk, its
    /// weights and best candidates for a top-p nucleus (all but the first
    /// picked or reduced where the logits are).
    pub rows_taken: [Counter; 5],
    /// Engine steps by how they ran ([`crate::model::DecodePath`] order):
    /// eagerly, on fixed buffers, or as a CUDA graph replay.
    pub engine_steps: [Counter; 3],
    /// The device sampler's latest reading and failures (shared with its thread).
    pub device: Arc<DeviceTelemetry>,
    /// The kernel plan in force and where it came from (`flag`, `catalog`,
    /// `default`), set once at start.
    pub kernel_plan: std::sync::OnceLock<(String, &'static str)>,
    /// Why the device can run nothing more ([`crate::device::lost`]), set
    /// once by the engine thread: the server then drains and exits with an
    /// error, so that a supervisor starts it again.
    pub device_lost: std::sync::OnceLock<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            ttft: Histogram::default(),
            itl: Histogram::default(),
            e2e: Histogram::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            cancelled: Counter::default(),
            running: Gauge::default(),
            preemptions: Counter::default(),
            preempted: Gauge::default(),
            kv_bytes: Gauge::default(),
            kv_reserved_bytes: Gauge::default(),
            kv_sequences: Gauge::default(),
            kv_budget_bytes: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            prefix_queried_tokens: Counter::default(),
            prefix_hit_tokens: Counter::default(),
            spec_drafted: Counter::default(),
            spec_accepted: Counter::default(),
            rows_taken: Default::default(),
            engine_steps: Default::default(),
            device: Arc::default(),
            kernel_plan: std::sync::OnceLock::new(),
            device_lost: std::sync::OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, status: u16) {
        if let Some(c) = (status as usize).checked_sub(100).and_then(|i| self.requests.get(i)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// The text exposition format; `queue_depth` is read from the queue itself.
    pub fn render(&self, queue_depth: usize) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(out, "# HELP arqon_requests_total HTTP requests answered, by status.");
        let _ = writeln!(out, "# TYPE arqon_requests_total counter");
        for (i, c) in self.requests.iter().enumerate() {
            let n = c.load(Relaxed);
            if n > 0 {
                let _ = writeln!(out, "arqon_requests_total{{status=\"{}\"}} {n}", i + 100);
            }
        }
        self.ttft.render(&mut out, "arqon_time_to_first_token_seconds", "Arrival to first generated token.");
        self.itl.render(&mut out, "arqon_inter_token_latency_seconds", "Time between consecutive tokens.");
        self.e2e.render(&mut out, "arqon_e2e_latency_seconds", "Arrival to the last token of a sequence.");
        let scalars: [(&str, &str, &str, u64); 20] = [
            (
                "arqon_prompt_tokens_total",
                "counter",
                "Prompt tokens admitted, once per prompt.",
                self.prompt_tokens.get(),
            ),
            ("arqon_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens.get()),
            (
                "arqon_cancelled_sequences_total",
                "counter",
                "Sequences freed after their client left.",
                self.cancelled.get(),
            ),
            ("arqon_queue_depth", "gauge", "Requests waiting for admission.", queue_depth as u64),
            ("arqon_running_sequences", "gauge", "Sequences in the running batch.", self.running.get()),
            (
                "arqon_preemptions_total",
                "counter",
                "Sequences preempted for KV-cache blocks, to be computed again.",
                self.preemptions.get(),
            ),
            ("arqon_preempted_sequences", "gauge", "Preempted sequences waiting to resume.", self.preempted.get()),
            ("arqon_kv_cache_bytes", "gauge", "Bytes held by the KV cache.", self.kv_bytes.get()),
            (
                "arqon_kv_cache_reserved_bytes",
                "gauge",
                "KV bytes running sequences hold or were promised for their prompts.",
                self.kv_reserved_bytes.get(),
            ),
            ("arqon_kv_cache_budget_bytes", "gauge", "Bytes of the paged KV cache.", self.kv_budget_bytes.get()),
            (
                "arqon_kv_cache_blocks_total",
                "gauge",
                "Blocks of 16 tokens in the KV cache.",
                self.kv_blocks_total.get(),
            ),
            ("arqon_kv_cache_blocks_used", "gauge", "KV-cache blocks sequences hold.", self.kv_blocks_used.get()),
            (
                "arqon_kv_cache_blocks_cached",
                "gauge",
                "Free KV-cache blocks keeping a cached prefix.",
                self.kv_blocks_cached.get(),
            ),
            (
                "arqon_prefix_cache_queries_tokens_total",
                "counter",
                "Prompt tokens looked up in the prefix cache.",
                self.prefix_queried_tokens.get(),
            ),
            (
                "arqon_prefix_cache_hits_tokens_total",
                "counter",
                "Prompt tokens found in the prefix cache.",
                self.prefix_hit_tokens.get(),
            ),
            ("arqon_kv_cache_sequences", "gauge", "Sequences in the KV cache.", self.kv_sequences.get()),
            (
                "arqon_spec_drafted_tokens_total",
                "counter",
                "Tokens drafted by self-speculative steps.",
                self.spec_drafted.get(),
            ),
            (
                "arqon_spec_accepted_tokens_total",
                "counter",
                "Drafted tokens the full model accepted.",
                self.spec_accepted.get(),
            ),
            ("arqon_up", "gauge", "1 while the server runs.", 1),
            (
                "arqon_device_lost",
                "gauge",
                "1 once the device can run nothing more (a CUDA error every later call repeats): the server drains and exits.",
                u64::from(self.device_lost.get().is_some()),
            ),
        ];
        for (name, kind, help, v) in scalars {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP arqon_logit_rows_total Rows of steps' logits by what the host took: the whole row, or only its argmax, its best candidates, its weights and one chunk, or its weights and best candidates for a top-p nucleus, picked or reduced where the logits are.\n# TYPE arqon_logit_rows_total counter"
        );
        for (taken, c) in ["logits", "argmax", "candidates", "chunk", "nucleus"].iter().zip(&self.rows_taken) {
            let _ = writeln!(out, "arqon_logit_rows_total{{taken=\"{taken}\"}} {}", c.get());
        }
        let _ = writeln!(
            out,
            "# HELP arqon_engine_steps_total Engine forward steps by how they ran: eagerly, on fixed buffers (a shape's first step, or the CPU's), or as a replay of a captured CUDA graph.\n# TYPE arqon_engine_steps_total counter"
        );
        for (path, c) in crate::model::DecodePath::ALL.iter().zip(&self.engine_steps) {
            let _ = writeln!(out, "arqon_engine_steps_total{{path=\"{}\"}} {}", path.name(), c.get());
        }
        if let Some((plan, source)) = self.kernel_plan.get() {
            let _ = writeln!(
                out,
                "# HELP arqon_kernel_plan_info The kernel plan in force (from --kernel-plan, the catalog, or the defaults).\n\
                 # TYPE arqon_kernel_plan_info gauge\narqon_kernel_plan_info{{plan=\"{plan}\",source=\"{source}\"}} 1"
            );
        }
        self.render_device(&mut out);
        out
    }

    /// The device sampler's failure count, and the latest GPU reading when
    /// serving on a GPU (host readings only feed the guardrail).
    fn render_device(&self, out: &mut String) {
        let failures = self.device.failures();
        let _ = writeln!(
            out,
            "# HELP arqon_device_telemetry_errors_total Device samples that failed (NVML missing or erroring).\n# TYPE arqon_device_telemetry_errors_total counter\narqon_device_telemetry_errors_total {failures}"
        );
        let Some(r) = self.device.latest().filter(|r| r.kind == DeviceKind::Gpu) else { return };
        let gauges: [(&str, &str, f64); 7] = [
            ("arqon_gpu_memory_used_bytes", "GPU memory in use.", r.mem_used.0 as f64),
            ("arqon_gpu_memory_total_bytes", "GPU memory installed.", r.mem_total.0 as f64),
            ("arqon_gpu_temperature_celsius", "GPU temperature.", f64::from(r.temperature.0) / 10.0),
            ("arqon_gpu_power_watts", "GPU power draw.", f64::from(r.power.0) / 1000.0),
            ("arqon_gpu_sm_clock_mhz", "GPU SM clock.", f64::from(r.sm_clock.0)),
            ("arqon_gpu_utilization_ratio", "Share of time a kernel ran.", f64::from(r.utilisation.get()) / 1000.0),
            (
                "arqon_gpu_clocks_event_reasons",
                "NVML clocks-event (throttle) reason bits; 0 is none.",
                r.throttle.0 as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{device=\"{}\"}} {v}", r.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_secs(2));
        m.request(200);
        m.request(429);
        let s = m.render(2);
        assert!(s.contains("arqon_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"), "{s}");
        assert!(s.contains("arqon_time_to_first_token_seconds_bucket{le=\"2.5\"} 2"));
        assert!(s.contains("arqon_time_to_first_token_seconds_count 2"));
        assert!(s.contains("arqon_requests_total{status=\"429\"} 1"));
        assert!(s.contains("arqon_queue_depth 2"));
        // No GPU reading: only the failure counter.
        assert!(s.contains("arqon_device_telemetry_errors_total 0"), "{s}");
        assert!(!s.contains("arqon_gpu_"), "{s}");
    }

    #[test]
    fn the_latest_gpu_reading_is_exported() {
        use crate::control::telemetry::{DeviceReading, DeviceSampler, SampleError, Sampling, ThrottleReasons};
        use arqon_tuner::units::{Bytes, DeciCelsius, Mhz, Milliwatts, Permille, Tick};
        struct OneGpu;
        impl DeviceSampler for OneGpu {
            fn name(&self) -> String {
                "fake GPU".into()
            }
            fn sample(&mut self) -> Result<DeviceReading, SampleError> {
                Ok(DeviceReading {
                    kind: DeviceKind::Gpu,
                    device: 1,
                    mem_used: Bytes(3 << 30),
                    mem_total: Bytes(80 << 30),
                    temperature: DeciCelsius(615),
                    power: Milliwatts(312_500),
                    sm_clock: Mhz(1755),
                    utilisation: Permille::new(875).unwrap(),
                    throttle: ThrottleReasons(0x4),
                })
            }
        }
        let m = Metrics::default();
        let ring = Arc::new(arqon_tuner::telemetry::TelemetryRing::new(8).unwrap());
        assert!(Sampling::new(Box::new(OneGpu), ring, m.device.clone()).poll(Tick(1)));
        let s = m.render(0);
        for line in [
            "arqon_gpu_memory_used_bytes{device=\"1\"} 3221225472",
            "arqon_gpu_memory_total_bytes{device=\"1\"} 85899345920",
            "arqon_gpu_temperature_celsius{device=\"1\"} 61.5",
            "arqon_gpu_power_watts{device=\"1\"} 312.5",
            "arqon_gpu_sm_clock_mhz{device=\"1\"} 1755",
            "arqon_gpu_utilization_ratio{device=\"1\"} 0.875",
            "arqon_gpu_clocks_event_reasons{device=\"1\"} 4",
        ] {
            assert!(s.contains(line), "{line} missing:\n{s}");
        }
    }
}
