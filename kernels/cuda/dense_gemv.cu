// Dense GEMV/GEMM for small batches: y[m, n] = x[m, k] . W[n, k]^T with
// m <= 32 (tiles of up to 8 rows, one per row of the grid: blockIdx.y), W
// row-major in W = f32 | bf16 | f16, x in X and y in Y, each either
// f32 or W's own type (so a bf16 matrix can take the f32 residual stream's
// rows and give f32 back with no conversion launches around it). Products
// and sums in f32; y rounded once to Y.
//
// Variants: `warp` (one warp per output row, 4 rows per 128-thread block,
// one 16-byte chunk of the row per lane at a time) and `warp_x4` (the same
// with four chunks per lane in flight before their FMAs: more bytes in flight
// per warp for long rows). Both read 16-byte vectors when k is a multiple of
// a chunk's elements and w and x are 16-byte aligned (decided per launch, in
// the kernel), else one element per lane at a time.
//
// `dense_gemv_silu_*`: the same with the MLP's activation fused in front of the down product. x is
// then the stacked gate/up product [m, 2k] and the rows multiplied are silu(gate) * up, computed in
// X's arithmetic as silu_mul.cu computes them (so the numbers are silu_mul's, then this GEMV's).
// Each warp computes the activations it needs itself, n * m * k of them a launch: little next to a
// launch at one row; `arqon bench kernels` times it against silu_mul + cuBLAS at one and eight.
//
// `dense_gemv_norm_*`: the residual add and RMSNorm fused in front (rms_norm.cu's packed form, then
// this GEMV), for X == Y. From the residual rows x and the rows d added to them:
//   sum[r, j] = X(x[r, j] + d[r, j])                          (written out: the next residual stream)
//   a[r, j]   = X(f32(sum[r, j]) * rsqrt(mean_j(sum[r, :]^2) + eps) * f32(g[j]))
//   y[r, o]   = Y(sum_j f32(w[o, j]) * f32(a[r, j]))
// with the mean over the rounded sums, as rms_norm.cu takes it, so the numbers are the packed norm's,
// then this GEMV's (up to the order of the mean's f32 sum). Every warp computes the mean of the rows
// itself (m * k more reads, from L1/L2: every warp reads the same rows) and writes its share of the sums.
#include "common.cuh"
using namespace arqon;

constexpr int MAX_M = 8;  // rows per tile: equal to DENSE_ROW_TILE (src/reference/dense.rs), which plans the grid

// 16 bytes of T as f32s (16 / sizeof(T) of them).
__device__ __forceinline__ void unpack(const uint4 v, const float*, float* out) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(const uint4 v, const __nv_bfloat16*, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack(const uint4 v, const __half*, float* out) {
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// N elements of T from a 16-byte aligned p (N * sizeof(T) a multiple of 16), as f32s.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float* out) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < N / PER; ++i) unpack(__ldg(reinterpret_cast<const uint4*>(p) + i), p, out + i * PER);
}

// Input element j of row r as f32: x[r, j], or with SILU silu(g) * u of the row's gate g = x[r, j]
// and up u = x[r, k + j] (rows of 2k), in X's arithmetic as silu_mul computes it.
template <typename X, bool SILU>
__device__ __forceinline__ float input(float g, float u) {
    if constexpr (SILU) return to_f32(silu_times<X>(from_f32<X>(g), from_f32<X>(u)));
    else return g;
}

// This block's tile of the rows: rows MAX_M * blockIdx.y on, at most MAX_M of them (the grid has
// ceil(m / MAX_M) rows of blocks, so at least one). Every warp of a tile reads the same rows, and
// the tiles of one column of blocks the same weight rows, from L2 after the first.
__device__ __forceinline__ int tile_rows(int m) {
    const int left = m - (int)blockIdx.y * MAX_M;
    return left < MAX_M ? left : MAX_M;
}

template <typename W, typename X, typename Y, int U, bool SILU>
__device__ void gemv_warp(const W* __restrict__ w, const X* __restrict__ x, Y* __restrict__ y, int m, int n, int k) {
    constexpr int VEC = 16 / sizeof(W);  // weights per 16-byte chunk
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;
    const W* wr = w + (size_t)row * k;
    float acc[MAX_M];
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) acc[r] = 0.0f;
    const size_t stride = SILU ? 2 * (size_t)k : (size_t)k;  // x's row length
    // Rows and stride keep x's 16-byte alignment (below), so the tile's first row keeps it too.
    x += (size_t)blockIdx.y * MAX_M * stride;
    y += (size_t)blockIdx.y * MAX_M * n;
    m = tile_rows(m);
    // x's chunks are VEC * sizeof(X) >= 16 bytes, so x's rows (and with SILU their up halves) stay
    // aligned when k % VEC == 0.
    const bool vec = k % VEC == 0 && ((uintptr_t)w & 15) == 0 && ((uintptr_t)x & 15) == 0;
    if (vec) {
        const int chunks = k / VEC;
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            float wf[U][VEC];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < chunks) load_f32<W, VEC>(wr + (size_t)c * VEC, wf[u]);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c >= chunks) break;
#pragma unroll
                for (int r = 0; r < MAX_M; ++r) {
                    if (r < m) {
                        const X* xr = x + (size_t)r * stride + (size_t)c * VEC;
                        float xf[VEC], uf[VEC];
                        load_f32<X, VEC>(xr, xf);
                        if constexpr (SILU) load_f32<X, VEC>(xr + k, uf);
#pragma unroll
                        for (int j = 0; j < VEC; ++j)
                            acc[r] = fmaf(wf[u][j], input<X, SILU>(xf[j], SILU ? uf[j] : 0.0f), acc[r]);
                    }
                }
            }
        }
    } else {
        for (int j = lane; j < k; j += 32) {
            const float wv = to_f32(wr[j]);
#pragma unroll
            for (int r = 0; r < MAX_M; ++r) {
                if (r < m) {
                    const X* xr = x + (size_t)r * stride + j;
                    const float g = to_f32(xr[0]), u = SILU ? to_f32(xr[k]) : 0.0f;
                    acc[r] = fmaf(wv, input<X, SILU>(g, u), acc[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + row] = from_f32<Y>(s);
        }
    }
}

// The norm's input to the product at element j of row r (inv the row's 1 / rms): a[r, j] as f32.
template <typename X>
__device__ __forceinline__ float normed(float x, float d, float g, float inv) {
    return to_f32(from_f32<X>(to_f32(from_f32<X>(x + d)) * inv * g));
}

template <typename W, typename X, int U>
__device__ void gemv_norm_warp(const W* __restrict__ w, const X* __restrict__ x, const X* __restrict__ d,
                               const X* __restrict__ g, X* __restrict__ y, X* __restrict__ sum, int m, int n, int k,
                               float eps) {
    constexpr int VEC = 16 / sizeof(W);
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;
    // This block's tile of the rows (as gemv_warp).
    const size_t first = (size_t)blockIdx.y * MAX_M * k;
    x += first;
    d += first;
    sum += first;
    y += (size_t)blockIdx.y * MAX_M * n;
    m = tile_rows(m);
    // This warp's share of the sums: elements 32 * row + lane, then every 32 * n on.
    const size_t total = (size_t)m * k;
    for (size_t i = (size_t)row * 32 + lane; i < total; i += (size_t)32 * n)
        sum[i] = from_f32<X>(to_f32(x[i]) + to_f32(d[i]));
    float inv[MAX_M];
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) {
        inv[r] = 0.0f;
        if (r < m) {  // m is the same over the warp: warp_sum's lanes all take part
            float ss = 0.0f;
            for (int j = lane; j < k; j += 32) {
                const float h = to_f32(from_f32<X>(to_f32(x[(size_t)r * k + j]) + to_f32(d[(size_t)r * k + j])));
                ss += h * h;
            }
            inv[r] = rsqrtf(warp_sum(ss) / (float)k + eps);
        }
    }
    const W* wr = w + (size_t)row * k;
    float acc[MAX_M];
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) acc[r] = 0.0f;
    const bool vec = k % VEC == 0 && (((uintptr_t)w | (uintptr_t)x | (uintptr_t)d | (uintptr_t)g) & 15) == 0;
    if (vec) {
        const int chunks = k / VEC;
        for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
            float wf[U][VEC];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < chunks) load_f32<W, VEC>(wr + (size_t)c * VEC, wf[u]);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c >= chunks) break;
                float gf[VEC];
                load_f32<X, VEC>(g + (size_t)c * VEC, gf);
#pragma unroll
                for (int r = 0; r < MAX_M; ++r) {
                    if (r < m) {
                        const size_t o = (size_t)r * k + (size_t)c * VEC;
                        float xf[VEC], df[VEC];
                        load_f32<X, VEC>(x + o, xf);
                        load_f32<X, VEC>(d + o, df);
#pragma unroll
                        for (int j = 0; j < VEC; ++j)
                            acc[r] = fmaf(wf[u][j], normed<X>(xf[j], df[j], gf[j], inv[r]), acc[r]);
                    }
                }
            }
        }
    } else {
        for (int j = lane; j < k; j += 32) {
            const float wv = to_f32(wr[j]), gv = to_f32(g[j]);
#pragma unroll
            for (int r = 0; r < MAX_M; ++r) {
                if (r < m) {
                    const size_t o = (size_t)r * k + j;
                    acc[r] = fmaf(wv, normed<X>(to_f32(x[o]), to_f32(d[o]), gv, inv[r]), acc[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + row] = from_f32<X>(s);
        }
    }
}

#define NORM_VARIANT(NAME, U, WT, WN, XT, XN)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) NAME##_##WN##_##XN##_##XN(                              \
        const WT* w, const XT* x, const XT* d, const XT* g, XT* y, XT* sum, int m, int n, int k, float eps) { \
        gemv_norm_warp<WT, XT, U>(w, x, d, g, y, sum, m, n, k, eps);                                          \
    }
#define NORM_ENTRY(WT, WN, XT, XN)                           \
    NORM_VARIANT(dense_gemv_norm_warp, 1, WT, WN, XT, XN)    \
    NORM_VARIANT(dense_gemv_norm_warp_x4, 4, WT, WN, XT, XN)
NORM_ENTRY(float, f32, float, f32)
NORM_ENTRY(__nv_bfloat16, bf16, __nv_bfloat16, bf16)
NORM_ENTRY(__nv_bfloat16, bf16, float, f32)
NORM_ENTRY(__half, f16, __half, f16)
NORM_ENTRY(__half, f16, float, f32)

#define DENSE_VARIANT(NAME, U, SILU, WT, WN, XT, XN, YT, YN)                                                  \
    extern "C" __global__ void __launch_bounds__(128)                                                         \
        NAME##_##WN##_##XN##_##YN(const WT* w, const XT* x, YT* y, int m, int n, int k) {                     \
        gemv_warp<WT, XT, YT, U, SILU>(w, x, y, m, n, k);                                                     \
    }
// Each type combination: both variants, plain and with the activation fused in (x = gate_up rows).
#define DENSE_ENTRY(WT, WN, XT, XN, YT, YN)                                      \
    DENSE_VARIANT(dense_gemv_warp, 1, false, WT, WN, XT, XN, YT, YN)             \
    DENSE_VARIANT(dense_gemv_warp_x4, 4, false, WT, WN, XT, XN, YT, YN)          \
    DENSE_VARIANT(dense_gemv_silu_warp, 1, true, WT, WN, XT, XN, YT, YN)         \
    DENSE_VARIANT(dense_gemv_silu_warp_x4, 4, true, WT, WN, XT, XN, YT, YN)
// A half-precision matrix: x and y each in its type or in f32.
#define DENSE_HALF(WT, WN)                       \
    DENSE_ENTRY(WT, WN, WT, WN, WT, WN)          \
    DENSE_ENTRY(WT, WN, WT, WN, float, f32)      \
    DENSE_ENTRY(WT, WN, float, f32, WT, WN)      \
    DENSE_ENTRY(WT, WN, float, f32, float, f32)

DENSE_ENTRY(float, f32, float, f32, float, f32)
DENSE_HALF(__nv_bfloat16, bf16)
DENSE_HALF(__half, f16)

// Element-wise conversion, one thread per element: what candle launches around cuBLAS when a
// product's rows or output are in another type than the matrix (timed next to our kernels, which
// need none). y = round(x) to nearest even, as candle's conversions and `half` round.
template <typename A, typename B>
__device__ void convert(const A* __restrict__ x, B* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = from_f32<B>(to_f32(x[i]));
}

#define CONVERT_ENTRY(AT, AN, BT, BN)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) convert_##AN##_##BN(const AT* x, BT* y, long long n) { \
        convert<AT, BT>(x, y, n);                                                                            \
    }
CONVERT_ENTRY(float, f32, __nv_bfloat16, bf16)
CONVERT_ENTRY(__nv_bfloat16, bf16, float, f32)
CONVERT_ENTRY(float, f32, __half, f16)
CONVERT_ENTRY(__half, f16, float, f32)
