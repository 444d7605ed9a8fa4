//! Arqon Serve's compute kernels.
//!
//! Every kernel has a closed [`KernelId`] and a CPU reference implementation in
//! [`reference`](mod@reference). The reference is the ground truth the optimised backends
//! (candle's CPU ops today, our CUDA kernels under the `cuda` feature) are
//! tested against, with dtype-aware tolerances.
//!
//! Our CUDA kernels (`kernels/cuda/*.cu`, f32/bf16/f16 storage, f32 math) are
//! fused residual add + RMSNorm, RoPE fused with the paged KV-cache write,
//! decode attention for GQA over the paged cache (vLLM layout `[num_blocks,
//! kv_heads, 16, head_dim]` with block tables), weight-only GEMV for 1-8 rows
//! over GGML `Q8_0`/`Q4_0`/`Q4_1` blocks, dense GEMV for 1-32 rows (f32/bf16/f16
//! weights, f32 or same-type activations), and GPU sampling (argmax, top-k/top-p
//! with the draw). Each comes in at least two variants ([`plan`]: e.g. warp vs
//! block per row, plain vs split-K attention) with identical semantics; a
//! per-SKU catalog stores the fastest as a [`KernelPlan`]. `build.rs` compiles
//! them only under `cuda`, to cubins for sm_80/86/89/90 (A100, A10, L4/L40S,
//! H100/H200) plus compute_80 PTX for newer GPUs, and the `cuda` module embeds them
//! and launches them through checked, typed wrappers. Each reference mirrors
//! its kernel's layout and rounding points and is unit-tested against an
//! independent formulation (dense attention, dequantize-then-matmul, the
//! unfused composition); `tests/backends.rs` runs one body per kernel on the
//! references and, with `cuda`, on the GPU.
//!
//! Without the `cuda` feature this crate compiles no device code: asking for a
//! device kernel yields [`KernelError::BackendDisabled`], never a panic.
#![warn(missing_docs)]
// `unsafe` is allowed in this crate only (SIMD intrinsics, CUDA launches),
// each use with a `// SAFETY:` comment.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod launches;
pub mod mmap;
pub mod plan;
pub mod quant;
pub mod reference;
pub mod threads;
pub mod tune;

pub use dtype::{DType, Elem};
pub use plan::KernelPlan;

/// The closed set of kernels Arqon Serve knows. `#[repr(i32)]` so the value can
/// cross an FFI edge without a string lookup or a magic number.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// RMSNorm, optionally fused with a residual add.
    RmsNorm = 0,
    /// Rotary position embedding (interleaved or half-split pairs).
    Rope = 1,
    /// Numerically stable softmax over the last dimension.
    Softmax = 2,
    /// Weight-only quantized matrix product (`Q4_1` weights, `Q8_1` activations).
    QuantMatmul = 3,
    /// RoPE on q and k fused with the write of k and v into the paged KV cache.
    RopeKvWrite = 4,
    /// Decode attention (one query per sequence, GQA) over the paged KV cache.
    PagedAttention = 5,
    /// Weight-only quantized GEMV for 1-8 rows (GGML `Q8_0`, `Q4_0`, `Q4_1`; activations unquantized).
    QuantGemv = 6,
    /// Greedy sampling: argmax per row.
    Argmax = 7,
    /// Top-k / top-p filtering and sampling per row.
    TopKTopP = 8,
    /// SiLU of the gate times the up projection (the MLP's activation), from their stacked product.
    SiluMul = 9,
    /// Dense GEMV for 1-32 rows, in tiles of 8 (f32/bf16/f16 weights; activations and output in f32 or the weights' type).
    DenseGemv = 10,
}

impl KernelId {
    /// Every kernel, in id order.
    pub const ALL: [KernelId; 11] = [
        KernelId::RmsNorm,
        KernelId::Rope,
        KernelId::Softmax,
        KernelId::QuantMatmul,
        KernelId::RopeKvWrite,
        KernelId::PagedAttention,
        KernelId::QuantGemv,
        KernelId::Argmax,
        KernelId::TopKTopP,
        KernelId::SiluMul,
        KernelId::DenseGemv,
    ];

    /// The kernel's stable name, used in benchmark ids (`{sku}/{kernel}/{shape}`).
    pub fn name(self) -> &'static str {
        match self {
            KernelId::RmsNorm => "rms_norm",
            KernelId::Rope => "rope",
            KernelId::Softmax => "softmax",
            KernelId::QuantMatmul => "quant_matmul",
            KernelId::RopeKvWrite => "rope_kv_write",
            KernelId::PagedAttention => "paged_attention",
            KernelId::QuantGemv => "quant_gemv",
            KernelId::Argmax => "argmax",
            KernelId::TopKTopP => "top_k_top_p",
            KernelId::SiluMul => "silu_mul",
            KernelId::DenseGemv => "dense_gemv",
        }
    }
}

/// Errors from kernel selection and launch.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel needs a backend this build does not include.
    #[error("kernel {kernel:?} needs the `{backend}` backend, which this build does not include")]
    BackendDisabled {
        /// The kernel asked for.
        kernel: KernelId,
        /// The missing backend (`cuda`).
        backend: &'static str,
    },
    /// Input shapes do not fit the kernel.
    #[error("kernel {kernel:?}: {message}")]
    Shape {
        /// The kernel asked for.
        kernel: KernelId,
        /// What is wrong.
        message: String,
    },
    /// A kernel plan or variant string does not parse or is out of bounds.
    #[error("kernel plan: {0}")]
    Plan(String),
    /// The CUDA driver refused (no device, no driver, launch failure).
    #[error("cuda: {0}")]
    Cuda(String),
}

/// The backends a kernel can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU reference (always available).
    CpuReference,
    /// CUDA (only with the `cuda` feature).
    Cuda,
}

/// Checks that `kernel` can run on `backend` in this build.
pub fn ensure_available(kernel: KernelId, backend: Backend) -> Result<(), KernelError> {
    match backend {
        Backend::CpuReference => Ok(()),
        Backend::Cuda if cfg!(feature = "cuda") => Ok(()),
        Backend::Cuda => Err(KernelError::BackendDisabled { kernel, backend: "cuda" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_named_uniquely() {
        for (i, k) in KernelId::ALL.iter().enumerate() {
            assert_eq!(*k as i32, i as i32);
        }
        let mut names: Vec<_> = KernelId::ALL.iter().map(|k| k.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), KernelId::ALL.len());
    }

    #[test]
    fn cuda_without_feature_is_a_typed_error() {
        let r = ensure_available(KernelId::Rope, Backend::Cuda);
        assert_eq!(r.is_ok(), cfg!(feature = "cuda"));
        assert!(ensure_available(KernelId::Rope, Backend::CpuReference).is_ok());
    }
}
