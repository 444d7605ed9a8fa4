//! Our CUDA kernels (feature `cuda`): the module images `build.rs` compiled
//! from `kernels/cuda/*.cu`, the choice of image for a GPU, and the typed
//! launch wrappers in [`launch`].
//!
//! Each source file is one CUDA module, embedded as a cubin for sm_80, sm_86,
//! sm_89 and sm_90 and as compute_80 PTX. A cubin runs on GPUs of its major
//! version and an equal or higher minor one, so [`select_image`] takes the
//! newest such cubin and otherwise falls back to the PTX, which the driver
//! JIT-compiles (once per process) for anything from 8.0 up, Blackwell included.

pub mod graph;
pub mod launch;
pub mod tune;

pub use launch::CudaKernels;

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::KernelError;

pub use crate::launches::CudaModule;

/// Stops cudarc making two CUDA events for every buffer allocated on `ctx`
/// from now on (and destroying them at its free): driver calls for each of
/// the hundreds of buffers an eager step makes. cudarc waits on those events
/// only to order work between streams it made itself (its multi-stream mode);
/// a process that runs through candle's device makes none (candle and our
/// launches take each thread's default stream), so they were never waited on.
/// Between threads' streams the runtime orders work itself
/// (`arqon_runtime::device::settle`), as cudarc asks once tracking is off.
pub fn without_event_tracking(ctx: &Arc<CudaContext>) {
    // SAFETY: cudarc leaves the ordering of a buffer's uses across streams to the caller. No stream
    // this process uses is one cudarc orders (none is made with `new_stream`), so turning the tracking
    // off changes no ordering; the runtime synchronises what one thread hands another.
    unsafe { ctx.disable_event_tracking() }
}

/// The embedded images of `module`.
fn images(module: CudaModule) -> &'static Images {
    match module {
        CudaModule::RmsNorm => &RMS_NORM,
        CudaModule::RopeKv => &ROPE_KV,
        CudaModule::PagedAttention => &PAGED_ATTENTION,
        CudaModule::QuantGemv => &QUANT_GEMV,
        CudaModule::Sampling => &SAMPLING,
        CudaModule::SiluMul => &SILU_MUL,
        CudaModule::DenseGemv => &DENSE_GEMV,
    }
}

/// A loadable module image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// Machine code for `sm_{major}{minor}`.
    Cubin {
        /// The (major, minor) it was compiled for.
        arch: (u32, u32),
        /// The cubin.
        bytes: &'static [u8],
    },
    /// compute_80 PTX, JIT-compiled by the driver.
    Ptx(&'static str),
}

struct Images {
    cubins: [((u32, u32), &'static [u8]); 4],
    ptx: &'static str,
}

macro_rules! images {
    ($name:ident, $stem:literal) => {
        static $name: Images = Images {
            cubins: [
                ((8, 0), include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".sm_80.cubin"))),
                ((8, 6), include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".sm_86.cubin"))),
                ((8, 9), include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".sm_89.cubin"))),
                ((9, 0), include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".sm_90.cubin"))),
            ],
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".compute_80.ptx")),
        };
    };
}

images!(RMS_NORM, "rms_norm");
images!(ROPE_KV, "rope_kv");
images!(PAGED_ATTENTION, "paged_attention");
images!(QUANT_GEMV, "quant_gemv");
images!(SAMPLING, "sampling");
images!(SILU_MUL, "silu_mul");
images!(DENSE_GEMV, "dense_gemv");

/// The image of `module` for a GPU of compute capability `(major, minor)`:
/// the cubin of the same major with the highest minor not above the GPU's,
/// else the PTX when the GPU is at least 8.0. Older GPUs are an error.
pub fn select_image(module: CudaModule, cc: (u32, u32)) -> Result<Image, KernelError> {
    let images = images(module);
    let best =
        images.cubins.iter().filter(|((maj, min), _)| *maj == cc.0 && *min <= cc.1).max_by_key(|(arch, _)| *arch);
    match best {
        Some((arch, bytes)) => Ok(Image::Cubin { arch: *arch, bytes }),
        None if cc >= (8, 0) => Ok(Image::Ptx(images.ptx)),
        None => Err(KernelError::Cuda(format!(
            "compute capability {}.{} is below 8.0, the oldest our kernels are built for",
            cc.0, cc.1
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(i: Image) -> Option<(u32, u32)> {
        match i {
            Image::Cubin { arch, bytes } => {
                assert!(!bytes.is_empty());
                Some(arch)
            }
            Image::Ptx(p) => {
                assert!(p.contains(".target sm_80"), "PTX targets compute_80");
                None
            }
        }
    }

    #[test]
    fn picks_the_matching_cubin_or_falls_back_to_ptx() {
        for m in CudaModule::ALL {
            assert_eq!(arch(select_image(m, (8, 0)).unwrap()), Some((8, 0)));
            assert_eq!(arch(select_image(m, (8, 6)).unwrap()), Some((8, 6)));
            assert_eq!(arch(select_image(m, (8, 7)).unwrap()), Some((8, 6)));
            assert_eq!(arch(select_image(m, (8, 9)).unwrap()), Some((8, 9)));
            assert_eq!(arch(select_image(m, (9, 0)).unwrap()), Some((9, 0)));
            assert_eq!(arch(select_image(m, (10, 0)).unwrap()), None);
            assert_eq!(arch(select_image(m, (12, 0)).unwrap()), None);
            assert!(select_image(m, (7, 5)).is_err());
        }
    }

    #[test]
    fn every_cubin_is_an_elf_image() {
        for m in CudaModule::ALL {
            for (_, bytes) in images(m).cubins {
                assert_eq!(&bytes[..4], b"\x7fELF", "{}", m.name());
            }
        }
    }
}
