// Fused residual add + RMSNorm.
//
// For each row of `dim` elements (rows contiguous, row-major):
//   h[i]        = T(x[i] + residual[i])           (computed in f32, rounded once)
//   residual[i] = h[i]                            (written back for the next block)
//   out[i]      = T(f32(h[i]) * rsqrt(mean(h^2) + eps) * f32(w[i]))
// The mean is taken over the rounded h, so CPU and GPU normalise the same
// values. Variants: one warp per row (4 rows per 128-thread block; best for
// small dims / many rows) and one 256-thread block per row (large dims).
//
// Two forms of each: `rms_norm_residual_*` updates the residual in place;
// `add_rms_norm_packed_*` leaves it and writes one packed output of
// [2, rows, dim]: the sums h first, then the normalised rows (the form a
// tensor library whose ops return one fresh output can call).
#include "common.cuh"
using namespace arqon;

// `res_in` and `res_out` may be the same rows (the in-place form): each
// thread reads an entry of `res_in` before it writes that entry of `res_out`.
template <typename T>
__device__ __forceinline__ void rms_row(const T* __restrict__ x, const T* res_in, T* res_out,
                                        const T* __restrict__ w, T* __restrict__ out, int dim, float eps, int tid,
                                        int nthreads, float* scratch) {
    float ss = 0.0f;
    for (int i = tid; i < dim; i += nthreads) {
        T h = from_f32<T>(to_f32(x[i]) + to_f32(res_in[i]));
        res_out[i] = h;
        float hf = to_f32(h);
        ss += hf * hf;
    }
    ss = scratch ? block_sum(ss, scratch) : warp_sum(ss);
    const float inv = rsqrtf(ss / (float)dim + eps);
    // Each thread re-reads only the sums it wrote itself.
    for (int i = tid; i < dim; i += nthreads) out[i] = from_f32<T>(to_f32(res_out[i]) * inv * to_f32(w[i]));
}

template <typename T>
__device__ void rms_warp(const T* x, const T* res_in, T* res_out, const T* w, T* out, int rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warp leaves together: no block-level sync below
    const size_t o = (size_t)row * dim;
    rms_row(x + o, res_in + o, res_out + o, w, out + o, dim, eps, threadIdx.x & 31, 32, nullptr);
}

template <typename T>
__device__ void rms_block(const T* x, const T* res_in, T* res_out, const T* w, T* out, int rows, int dim,
                          float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t o = (size_t)row * dim;
    rms_row(x + o, res_in + o, res_out + o, w, out + o, dim, eps, threadIdx.x, blockDim.x, scratch);
}

#define RMS_ENTRY(TY, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) rms_norm_residual_warp_##NAME(                     \
        const TY* x, TY* res, const TY* w, TY* out, int rows, int dim, float eps) {                      \
        rms_warp<TY>(x, res, res, w, out, rows, dim, eps);                                               \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) rms_norm_residual_block_##NAME(                    \
        const TY* x, TY* res, const TY* w, TY* out, int rows, int dim, float eps) {                      \
        rms_block<TY>(x, res, res, w, out, rows, dim, eps);                                              \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) add_rms_norm_packed_warp_##NAME(                   \
        const TY* x, const TY* res, const TY* w, TY* out, int rows, int dim, float eps) {                \
        const size_t n = (size_t)rows * dim;                                                             \
        rms_warp<TY>(x, res, out, w, out + n, rows, dim, eps);                                           \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) add_rms_norm_packed_block_##NAME(                  \
        const TY* x, const TY* res, const TY* w, TY* out, int rows, int dim, float eps) {                \
        const size_t n = (size_t)rows * dim;                                                             \
        rms_block<TY>(x, res, out, w, out + n, rows, dim, eps);                                          \
    }

RMS_ENTRY(float, f32)
RMS_ENTRY(__nv_bfloat16, bf16)
RMS_ENTRY(__half, f16)
