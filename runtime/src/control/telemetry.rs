//! Device telemetry: a background thread that samples the device the model
//! runs on and feeds the samples to the governor's guardrail through the
//! telemetry ring, and the latest reading to `/metrics`.
//!
//! Purpose: the guardrail judges device memory (and, later, heat and
//! throttling) from `Event::Device` samples. What "the device" is depends on
//! where the model runs:
//! - on the CPU, the host: this process's resident set size against installed
//!   memory ([`HostMemory`], Linux `/proc`);
//! - on a CUDA device, the GPU as NVML reports it ([`NvmlGpu`]): memory used
//!   and installed, temperature, power, SM clock, utilisation and the
//!   clocks-event (throttle) reasons.
//!
//! Invariants:
//! - Sampling never stops serving. NVML is loaded at run time (`dlopen` of
//!   `libnvidia-ml.so.1`), so a build always carries it and a machine without
//!   the library only fails [`NvmlGpu::open`]. Whether opening or one sample
//!   fails, the failure is logged once (`tracing` warn) and counted, no sample
//!   is sent, and the guardrail sees missing device telemetry exactly as the
//!   tuner defines it: a window without device samples does not judge memory,
//!   and a window with neither requests nor samples does not refresh
//!   freshness, so silence turns into staleness (hold, keep the baseline).
//! - The thread polls every half telemetry window, so every window holds at
//!   least one sample when sampling works (one per window would leave some
//!   windows empty whenever a poll lands just past a boundary).
//! - [`Sampling::poll`] is the whole per-tick behaviour, with the time passed
//!   in: tests drive it with fake samplers and fixed ticks, no thread, no clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use arqon_tuner::telemetry::{DeviceSample, Event, TelemetryRing};
use arqon_tuner::units::{Bytes, DeciCelsius, Mhz, Micros, Milliwatts, Permille, Tick};

/// What kind of device a reading describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host (CPU serving): memory only.
    Host,
    /// An NVIDIA GPU, read through NVML.
    Gpu,
}

/// NVML's clocks-event reasons (`nvmlClocksEventReasons`, formerly "throttle
/// reasons"), as its bit mask: 0 is none; `0x1` is GPU idle; `0x4` is the
/// software power cap; `0x8` hardware slowdown; `0x20`/`0x40` software and
/// hardware thermal slowdown; `0x80` power-brake slowdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThrottleReasons(pub u64);

impl ThrottleReasons {
    /// Reasons that mean the device is held back (all but "idle" and
    /// "application clocks setting").
    pub fn slowing(self) -> bool {
        self.0 & !0x3 != 0
    }
}

/// One poll of one device, in typed units. Fields a device does not report
/// (a host has no SM clock; some GPUs report no power) are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceReading {
    /// What was sampled.
    pub kind: DeviceKind,
    /// Device index (the CUDA ordinal; 0 for the host).
    pub device: u16,
    /// Memory in use.
    pub mem_used: Bytes,
    /// Memory installed.
    pub mem_total: Bytes,
    /// Temperature.
    pub temperature: DeciCelsius,
    /// Power draw.
    pub power: Milliwatts,
    /// SM clock.
    pub sm_clock: Mhz,
    /// Utilisation.
    pub utilisation: Permille,
    /// Why clocks are held back, if they are.
    pub throttle: ThrottleReasons,
}

impl DeviceReading {
    /// The tuner's sample of this reading, taken at `at`. (The tuner's
    /// `DeviceSample` has no throttle field yet: throttling shows there as a
    /// drop of the minimum SM clock; the reasons go to `/metrics`.)
    pub fn sample(&self, at: Tick) -> DeviceSample {
        DeviceSample {
            at,
            device: self.device,
            mem_used: self.mem_used,
            mem_total: self.mem_total,
            temperature: self.temperature,
            power: self.power,
            sm_clock: self.sm_clock,
            utilisation: self.utilisation,
        }
    }
}

/// Why a sampler could not open or sample its device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct SampleError {
    /// The sampler (`NVML GPU 0`, `host memory`).
    pub source_name: String,
    /// What failed.
    pub message: String,
}

/// A source of device readings. Two methods, both required; implementations
/// are the host, NVML, and the tests' fakes.
pub trait DeviceSampler: Send {
    /// What it samples, for logs and errors (`NVML GPU 0`).
    fn name(&self) -> String;
    /// Reads the device now.
    fn sample(&mut self) -> Result<DeviceReading, SampleError>;
}

/// The host's memory: this process's resident set size against installed
/// memory, from Linux `/proc`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMemory;

impl DeviceSampler for HostMemory {
    fn name(&self) -> String {
        "host memory".into()
    }

    fn sample(&mut self) -> Result<DeviceReading, SampleError> {
        let fail = |message: String| SampleError { source_name: self.name(), message };
        let kb = |file: &str, key: &str| -> Result<u64, SampleError> {
            let text = std::fs::read_to_string(file).map_err(|e| fail(format!("{file}: {e}")))?;
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l[key.len()..].split_whitespace().next()?.parse::<u64>().ok())
                .map(|k| k * 1024)
                .ok_or_else(|| fail(format!("{file}: no {key} line")))
        };
        Ok(DeviceReading {
            kind: DeviceKind::Host,
            device: 0,
            mem_used: Bytes(kb("/proc/self/status", "VmRSS:")?),
            mem_total: Bytes(kb("/proc/meminfo", "MemTotal:")?),
            temperature: DeciCelsius(0),
            power: Milliwatts(0),
            sm_clock: Mhz(0),
            utilisation: Permille::ZERO,
            throttle: ThrottleReasons::default(),
        })
    }
}

/// One GPU through NVML.
pub struct NvmlGpu {
    nvml: nvml_wrapper::Nvml,
    index: u32,
}

impl std::fmt::Debug for NvmlGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlGpu").field("index", &self.index).finish_non_exhaustive()
    }
}

impl NvmlGpu {
    /// Loads NVML and checks that GPU `index` answers. Fails, without
    /// panicking, where `libnvidia-ml.so.1` is missing or there is no such GPU.
    pub fn open(index: u32) -> Result<Self, SampleError> {
        let fail = |e: nvml_wrapper::error::NvmlError| SampleError {
            source_name: format!("NVML GPU {index}"),
            message: e.to_string(),
        };
        let nvml = nvml_wrapper::Nvml::init().map_err(fail)?;
        nvml.device_by_index(index).map_err(fail)?;
        Ok(NvmlGpu { nvml, index })
    }

    /// The GPU's name as NVML reports it (`NVIDIA H100 80GB HBM3`): its SKU.
    pub fn device_name(&self) -> Result<String, SampleError> {
        let d = self.nvml.device_by_index(self.index).map_err(|e| self.fail(e))?;
        d.name().map_err(|e| self.fail(e))
    }

    fn fail(&self, e: nvml_wrapper::error::NvmlError) -> SampleError {
        SampleError { source_name: self.name(), message: e.to_string() }
    }
}

impl DeviceSampler for NvmlGpu {
    fn name(&self) -> String {
        format!("NVML GPU {}", self.index)
    }

    /// Memory is required; the other readings are optional (a GPU that does
    /// not report power, say, reads 0 there).
    fn sample(&mut self) -> Result<DeviceReading, SampleError> {
        use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
        let d = self.nvml.device_by_index(self.index).map_err(|e| self.fail(e))?;
        let mem = d.memory_info().map_err(|e| self.fail(e))?;
        let utilisation = d.utilization_rates().map_or(0, |u| u.gpu.min(100) * 10);
        Ok(DeviceReading {
            kind: DeviceKind::Gpu,
            device: self.index as u16,
            mem_used: Bytes(mem.used),
            mem_total: Bytes(mem.total),
            temperature: DeciCelsius(d.temperature(TemperatureSensor::Gpu).map_or(0, |c| c.min(3000) as i16 * 10)),
            power: Milliwatts(d.power_usage().unwrap_or(0)),
            sm_clock: Mhz(d.clock_info(Clock::SM).unwrap_or(0)),
            utilisation: Permille::new(utilisation as u16).unwrap_or(Permille::ZERO),
            throttle: ThrottleReasons(d.current_throttle_reasons().map_or(0, |r| r.bits())),
        })
    }
}

/// The latest reading and the failure count, shared with `/metrics`.
#[derive(Debug, Default)]
pub struct DeviceTelemetry {
    latest: ArcSwapOption<DeviceReading>,
    failures: AtomicU64,
}

impl DeviceTelemetry {
    /// The latest successful reading, if any.
    pub fn latest(&self) -> Option<DeviceReading> {
        self.latest.load().as_deref().copied()
    }

    /// Samples that failed (and opening a sampler that failed).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The sampling loop's state: one sampler (or none: telemetry missing),
/// the ring it feeds, and whether its failure has been logged.
pub struct Sampling {
    sampler: Option<Box<dyn DeviceSampler>>,
    ring: Arc<TelemetryRing>,
    shared: Arc<DeviceTelemetry>,
    warned: bool,
}

impl std::fmt::Debug for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampling")
            .field("sampler", &self.sampler.as_ref().map(|s| s.name()))
            .field("warned", &self.warned)
            .finish_non_exhaustive()
    }
}

impl Sampling {
    /// Sampling from `sampler` into `ring`, publishing to `shared`.
    pub fn new(sampler: Box<dyn DeviceSampler>, ring: Arc<TelemetryRing>, shared: Arc<DeviceTelemetry>) -> Self {
        Sampling { sampler: Some(sampler), ring, shared, warned: false }
    }

    /// No sampler: opening one failed with `why`, which is logged here, once.
    /// Polls then send nothing and the guardrail sees missing telemetry.
    pub fn missing(why: &SampleError, ring: Arc<TelemetryRing>, shared: Arc<DeviceTelemetry>) -> Self {
        let mut s = Sampling { sampler: None, ring, shared, warned: false };
        s.warn_once(why);
        s
    }

    /// Whether a failure has been logged (at most one ever is).
    pub fn warned(&self) -> bool {
        self.warned
    }

    /// One poll at `at`: a reading becomes an `Event::Device` in the ring
    /// and the latest reading; a failure is counted (and logged the first
    /// time) and sends nothing. Returns whether a sample was sent.
    pub fn poll(&mut self, at: Tick) -> bool {
        let Some(sampler) = self.sampler.as_mut() else { return false };
        match sampler.sample() {
            Ok(r) => {
                self.shared.latest.store(Some(Arc::new(r)));
                // A full ring drops the sample and counts it, as for any event.
                let _ = self.ring.try_push(Event::Device(r.sample(at)));
                true
            }
            Err(e) => {
                self.warn_once(&e);
                false
            }
        }
    }

    fn warn_once(&mut self, e: &SampleError) {
        self.shared.failures.fetch_add(1, Ordering::Relaxed);
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                error = %e,
                "device telemetry unavailable; serving goes on and the guardrail sees missing device telemetry"
            );
        }
    }

    /// Runs [`Sampling::poll`] every half `window` on a thread of its own,
    /// until the ring has no other owner (the server is gone). A `missing`
    /// sampling starts no thread.
    pub fn spawn(mut self, window: Micros) -> std::io::Result<()> {
        if self.sampler.is_none() {
            return Ok(());
        }
        let period = Duration::from_micros((window.0 / 2).max(1_000));
        std::thread::Builder::new().name("arqon-telemetry".into()).spawn(move || {
            while Arc::strong_count(&self.ring) > 1 {
                self.poll(super::governor::now_tick());
                std::thread::sleep(period);
            }
        })?;
        Ok(())
    }
}

/// The sampler for `device`: host memory on the CPU, NVML on a CUDA device.
/// `Err` when NVML cannot be opened (the caller logs it through
/// [`Sampling::missing`] and serves on).
pub fn sampler_for(device: &candle_core::Device) -> Result<Box<dyn DeviceSampler>, SampleError> {
    match crate::device::cuda_ordinal(device) {
        None => Ok(Box::new(HostMemory)),
        Some(n) => Ok(Box::new(NvmlGpu::open(n as u32)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arqon_tuner::summary::Summarizer;

    /// A sampler that plays back a script of readings and failures.
    struct Scripted(std::collections::VecDeque<Result<DeviceReading, SampleError>>);

    impl DeviceSampler for Scripted {
        fn name(&self) -> String {
            "scripted GPU".into()
        }
        fn sample(&mut self) -> Result<DeviceReading, SampleError> {
            self.0.pop_front().unwrap_or_else(|| Err(self.error()))
        }
    }

    impl Scripted {
        fn error(&self) -> SampleError {
            SampleError { source_name: self.name(), message: "NVML_ERROR_GPU_IS_LOST".into() }
        }
    }

    fn gpu(used_gib: u64) -> DeviceReading {
        DeviceReading {
            kind: DeviceKind::Gpu,
            device: 0,
            mem_used: Bytes(used_gib << 30),
            mem_total: Bytes(80 << 30),
            temperature: DeciCelsius(655),
            power: Milliwatts(350_000),
            sm_clock: Mhz(1980),
            utilisation: Permille::new(970).unwrap(),
            throttle: ThrottleReasons(0x20),
        }
    }

    fn ring() -> Arc<TelemetryRing> {
        Arc::new(TelemetryRing::new(64).unwrap())
    }

    /// Device samples in the window `[0, 1 s)` as the guardrail would see them.
    fn device_samples_seen(ring: &TelemetryRing) -> u64 {
        let mut s = Summarizer::new(Micros::from_secs(1)).unwrap();
        let mut windows = Vec::new();
        s.drain(ring, &mut windows).unwrap();
        s.close_until(Tick(2_000_000), &mut windows);
        windows.iter().map(|w| w.health().device_samples).sum()
    }

    #[test]
    fn readings_feed_the_ring_and_the_latest_gauge() {
        let (ring, shared) = (ring(), Arc::new(DeviceTelemetry::default()));
        let script = Scripted(vec![Ok(gpu(10)), Ok(gpu(20))].into());
        let mut s = Sampling::new(Box::new(script), ring.clone(), shared.clone());
        assert!(s.poll(Tick(100_000)));
        assert!(s.poll(Tick(600_000)));
        assert_eq!(shared.latest(), Some(gpu(20)));
        assert_eq!(shared.failures(), 0);
        assert!(!s.warned());
        assert_eq!(device_samples_seen(&ring), 2);
    }

    #[test]
    fn failures_send_nothing_are_counted_and_warned_once() {
        let (ring, shared) = (ring(), Arc::new(DeviceTelemetry::default()));
        let script = Scripted(vec![Ok(gpu(10))].into());
        let mut s = Sampling::new(Box::new(script), ring.clone(), shared.clone());
        assert!(s.poll(Tick(100_000)));
        for t in 2..6 {
            assert!(!s.poll(Tick(t * 100_000)));
        }
        assert!(s.warned());
        assert_eq!(shared.failures(), 4);
        // The last good reading stays visible; the ring got only it.
        assert_eq!(shared.latest(), Some(gpu(10)));
        assert_eq!(device_samples_seen(&ring), 1);
    }

    #[test]
    fn missing_nvml_is_missing_device_telemetry() {
        let (ring, shared) = (ring(), Arc::new(DeviceTelemetry::default()));
        let why = SampleError { source_name: "NVML GPU 0".into(), message: "libnvidia-ml.so.1 not found".into() };
        let mut s = Sampling::missing(&why, ring.clone(), shared.clone());
        assert!(s.warned());
        for t in 1..4 {
            assert!(!s.poll(Tick(t * 100_000)));
        }
        assert_eq!(shared.failures(), 1, "opening failed once; polls without a sampler are not failures");
        assert_eq!(shared.latest(), None);
        // The guardrail's view: a window with no device samples, which the
        // tuner treats as missing device telemetry (memory not judged).
        assert_eq!(device_samples_seen(&ring), 0);
    }

    #[test]
    fn the_real_nvml_opens_or_fails_without_panicking() {
        // On a machine without libnvidia-ml.so.1 (CI, the dev boxes) this is
        // an error naming NVML; on a GPU machine it opens GPU 0 (or reports
        // why not). Either way: no panic, no abort.
        match NvmlGpu::open(0) {
            Ok(mut g) => assert_eq!(g.sample().map(|r| r.kind), Ok(DeviceKind::Gpu)),
            Err(e) => assert!(e.to_string().starts_with("NVML GPU 0: "), "{e}"),
        }
        // An ordinal no machine has is always an error.
        assert!(NvmlGpu::open(4096).is_err());
    }

    #[test]
    fn host_memory_reads_proc_on_linux() {
        if cfg!(target_os = "linux") {
            let r = HostMemory.sample().unwrap();
            assert_eq!(r.kind, DeviceKind::Host);
            assert!(r.mem_used.0 > 0 && r.mem_used.0 < r.mem_total.0, "{r:?}");
        }
        assert!(matches!(sampler_for(&candle_core::Device::Cpu).map(|s| s.name()), Ok(n) if n == "host memory"));
    }

    #[test]
    fn throttle_reasons_ignore_idle() {
        assert!(!ThrottleReasons(0).slowing());
        assert!(!ThrottleReasons(0x1).slowing());
        assert!(ThrottleReasons(0x20).slowing());
        assert!(ThrottleReasons(0x4 | 0x1).slowing());
    }
}
