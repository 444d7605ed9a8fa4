//! Opening the compute device that `--device` names ([`DeviceChoice`]).
//!
//! Builds without the `cuda` feature carry a disabled CUDA module that answers
//! every request for a CUDA device with a typed [`crate::Error::Device`] (never a
//! panic), so `--device cuda` there is one `arqon: error: …` line. In a CUDA
//! build, opening the device is guarded: no driver, no device or a bad
//! ordinal is an error too (and `auto` falls back to the CPU).
//!
//! What changes on a CUDA device is decided where the weights are loaded
//! ([`crate::model::weights`]): quantized matrices stay GGML-quantized for
//! candle's CUDA kernels (our SIMD Q4_1 kernel is CPU-only), dense matrices
//! are held in bf16 ([`dense_dtype`]); activations and the KV cache stay f32.
//!
//! Threads: candle queues each host thread's CUDA work on that thread's own
//! default stream, and two threads' streams are not ordered. So what one
//! thread puts on the device for another (a model loaded, an adapter, the KV
//! cache: uploads, conversions, stacked weights) is [`settle`]d before it is
//! handed over. Variants are freed on the reaper thread once the engine
//! thread drops its last pin, which it does between steps, after the step's
//! tokens came back to the host: no kernel of its stream still reads them.

use arqon_variants::Sku;
use candle_core::{DType, Device, DeviceLocation};

use crate::config::DeviceChoice;
use crate::error::{Error, Result};

/// Waits for the work this thread queued on `device` (nothing to wait for on
/// the CPU), so another thread's stream may read what it made.
pub fn settle(device: &Device) -> Result<()> {
    device.synchronize().map_err(|e| Error::Device {
        device: describe(device),
        reason: format!("cannot wait for its queued work: {e}"),
    })
}

/// Why `device` can no longer run anything, if so: after a step failed,
/// this tells an error of that step (a bad shape, memory short) from a
/// CUDA context that every later call fails on (an illegal address, a
/// kernel fault: the driver keeps such an error for good). Waits for the
/// queued work twice: the first wait may return an error cudarc kept from
/// an earlier call, which is then cleared; a lost context fails both.
/// The CPU is never lost.
pub fn lost(device: &Device) -> Option<String> {
    if device.is_cpu() {
        return None;
    }
    let first = settle(device).err()?;
    settle(device).err().map(|again| format!("{again} (first: {first})"))
}

/// Opens the device `choice` names. `auto` never fails: it is CUDA device 0
/// when this build has CUDA and the device opens, the CPU otherwise.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => cuda::open(n),
        DeviceChoice::Auto if !cuda::COMPILED => Ok(Device::Cpu),
        DeviceChoice::Auto => cuda::open(0).or_else(|e| {
            tracing::info!(error = %e, "no usable CUDA device; running on the CPU");
            Ok(Device::Cpu)
        }),
    }
}

/// The device as `--device` spells it: `cpu`, `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The CUDA ordinal of `device`, if it is a CUDA device (for NVML, which
/// numbers devices the same way unless `CUDA_VISIBLE_DEVICES` reorders them).
pub fn cuda_ordinal(device: &Device) -> Option<usize> {
    match device.location() {
        DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    }
}

/// The SKU catalog entries are measured on, for `device`: the detected CPU
/// SKU, or for a CUDA device the name NVML reports (`NVIDIA H100 80GB HBM3`).
/// Where NVML cannot name the GPU the SKU is `cuda:N (unnamed)`, which no
/// catalog entry matches; that failure is not logged here, the telemetry
/// sampler logs NVML's absence once.
pub fn sku(device: &Device) -> Sku {
    match cuda_ordinal(device) {
        None => Sku::detect_cpu(),
        Some(n) => crate::control::telemetry::NvmlGpu::open(n as u32)
            .and_then(|g| g.device_name())
            .map_or_else(|_| Sku::gpu(&format!("cuda:{n} (unnamed)")), |name| Sku::gpu(&name)),
    }
}

/// The dtype dense weight matrices are held in on `device`: f32 on the CPU
/// (candle's CPU bf16 matmul is slow, and the reference tests compare f32),
/// bf16 on a GPU (half the memory and bandwidth; tensor cores).
pub fn dense_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Bytes free on `device` now: the driver's free device memory for a GPU,
/// the kernel's `MemAvailable` (`/proc/meminfo`) for the CPU.
pub fn free_memory(device: &Device) -> Result<u64> {
    match device {
        Device::Cpu => {
            let unreadable = |why: String| Error::Device {
                device: "cpu".into(),
                reason: format!("cannot read the free memory ({why}): give --kv-cache-mb"),
            };
            let info = std::fs::read_to_string("/proc/meminfo").map_err(|e| unreadable(e.to_string()))?;
            mem_available(&info).ok_or_else(|| unreadable("no MemAvailable line in /proc/meminfo".into()))
        }
        other => cuda::free_memory(other),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::Device;

    use crate::error::{Error, Result};

    pub const COMPILED: bool = true;

    /// Free memory of a CUDA device, from the driver (`cuMemGetInfo`).
    pub fn free_memory(device: &Device) -> Result<u64> {
        let name = super::describe(device);
        match device {
            Device::Cuda(d) => match d.cuda_stream().context().mem_get_info() {
                Ok((free, _total)) => Ok(free as u64),
                Err(e) => Err(Error::Device { device: name, reason: format!("cannot read the free memory: {e}") }),
            },
            _ => Err(Error::Device { device: name, reason: "cannot read the free memory of this device".into() }),
        }
    }

    /// Opens CUDA device `n`. candle returns driver errors as errors; the
    /// unwind guard is for the paths in cudarc that panic instead (a missing
    /// symbol in a partial driver install), so they become errors too.
    pub fn open(n: usize) -> Result<Device> {
        let device = format!("cuda:{n}");
        match std::panic::catch_unwind(|| Device::new_cuda(n)) {
            Ok(Ok(d)) => {
                if let Device::Cuda(c) = &d {
                    arqon_kernels::cuda::without_event_tracking(c.cuda_stream().context());
                }
                Ok(d)
            }
            Ok(Err(e)) => Err(Error::Device { device, reason: format!("cannot open it: {e}") }),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the CUDA driver panicked".into());
                Err(Error::Device { device, reason: format!("cannot open it: {what}") })
            }
        }
    }
}

/// The disabled CUDA module of a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    use crate::error::{Error, Result};

    pub const COMPILED: bool = false;

    pub fn free_memory(device: &Device) -> Result<u64> {
        Err(Error::Device {
            device: super::describe(device),
            reason: "this arqon was built without CUDA support".into(),
        })
    }

    pub fn open(n: usize) -> Result<Device> {
        Err(Error::Device {
            device: format!("cuda:{n}"),
            reason: "this arqon was built without CUDA support; rebuild with `cargo build --release --features cuda`, or pass --device cpu".into(),
        })
    }
}

/// Whether this build can run on CUDA at all.
pub const CUDA_COMPILED: bool = cuda::COMPILED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_open_without_a_gpu() {
        assert!(open(DeviceChoice::Cpu).unwrap().is_cpu());
        // `auto` never fails; on a machine without a usable GPU it is the CPU.
        let d = open(DeviceChoice::Auto).unwrap();
        assert!(d.is_cpu() || CUDA_COMPILED);
        assert_eq!(describe(&Device::Cpu), "cpu");
        assert_eq!(cuda_ordinal(&Device::Cpu), None);
        assert_eq!(dense_dtype(&Device::Cpu), DType::F32);
        assert_eq!(lost(&Device::Cpu), None, "the CPU is never lost");
    }

    #[test]
    fn free_memory_is_read_from_meminfo() {
        let info = "MemTotal:       24683748 kB\nMemFree:        20422956 kB\nMemAvailable:   24099956 kB\n";
        assert_eq!(mem_available(info), Some(24099956 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots\n"), None);
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(free_memory(&Device::Cpu).unwrap() > 0);
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_typed_error() {
        let e = open(DeviceChoice::Cuda(1)).unwrap_err();
        assert!(matches!(&e, Error::Device { device, .. } if device == "cuda:1"), "{e:?}");
        assert!(e.to_string().contains("built without CUDA support"), "{e}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_missing_cuda_device_is_an_error_not_a_panic() {
        // No machine has 4096 GPUs: whether or not a driver is present, this
        // must come back as an error.
        let e = open(DeviceChoice::Cuda(4096)).unwrap_err();
        assert!(matches!(&e, Error::Device { device, .. } if device == "cuda:4096"), "{e:?}");
    }
}
