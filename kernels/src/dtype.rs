//! Storage element types the kernels accept, and their f32 round trip.
//!
//! Every kernel computes in f32 and rounds once when it stores; [`Elem`] is how
//! the CPU references do the same (`half` rounds to nearest even, as CUDA's
//! `__float2bfloat16_rn` / `__float2half_rn` do), so a reference mirrors a
//! kernel's rounding, not only its math.

use half::{bf16, f16};

/// The closed set of storage types; its suffix names the CUDA entry points
/// (`rms_norm_residual_warp_bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// The suffix of this type's CUDA entry points.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Relative precision of one rounding (half an ulp at 1.0), for tolerances.
    pub fn epsilon(self) -> f32 {
        match self {
            DType::F32 => f32::EPSILON,
            DType::Bf16 => 1.0 / 256.0,
            DType::F16 => 1.0 / 2048.0,
        }
    }
}

/// A storage element: converted to f32 to compute, rounded back once.
pub trait Elem: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// This type's tag.
    const DTYPE: DType;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Rounds from f32 to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Rounds a slice of f32 into `T`.
pub fn from_f32_slice<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|x| T::from_f32(*x)).collect()
}

/// Widens a slice of `T` to f32.
pub fn to_f32_vec<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(<f16 as Elem>::from_f32(1.0 + 1.0 / 2048.0).to_f32(), 1.0);
        assert_eq!(<f32 as Elem>::from_f32(0.1), 0.1);
        assert_eq!(DType::Bf16.suffix(), "bf16");
    }
}
