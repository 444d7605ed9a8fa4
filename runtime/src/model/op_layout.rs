//! Where a contiguous input of one of our candle ops lies in its storage:
//! the ops take views at any offset (a packed sum's half, a pool inside its
//! layer's tensor), so each reads the span its layout names.

use std::ops::Range;

use candle_core::Layout;

/// The span of storage a contiguous layout covers, or an error naming
/// `what` of `op` when it is strided.
pub(crate) fn span(l: &Layout, op: &str, what: &str) -> candle_core::Result<Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// The elements of a contiguous CUDA input, from its offset.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda::CudaDType>(
    s: &'a candle_core::CudaStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(span(l, op, what)?))
}
