// Weight-only quantized GEMV/GEMM for small batches: y[m, n] = x[m, k] . W[n, k]^T
// with m <= 8, W in GGML blocks of 32 weights, dequantized in registers.
//
// Block layouts (GGML, byte for byte; a row of W is k / 32 consecutive blocks):
//   Q8_0 (34 bytes): d f16, qs i8[32];          w_j = d * qs[j]
//   Q4_0 (18 bytes): d f16, qs u8[16];          w_j = d * (nib_j - 8)
//   Q4_1 (20 bytes): d f16, m f16, qs u8[16];   w_j = d * nib_j + m
//   where nib_j = qs[j] & 15 for j < 16 and qs[j - 16] >> 4 for j >= 16.
// Per block the kernels compute d * sum(q_j x_j) (+ m * sum(x_j)), in f32.
// x and y are T = f32 | bf16 | f16. k % 32 == 0.
//
// Variants: `warp` (one warp per output row, 4 rows per 128-thread block, each
// lane a whole block at a time, x read through the cache) and `smem` (8 rows
// per 256-thread block, x staged in shared memory in tiles of 512 columns,
// each lane half a block; each block of 32 staged values is followed by one
// float of padding, so the 32 lanes of a warp, reading element j of their 16
// blocks' halves at once, hit 32 different banks instead of 2).
#include "common.cuh"
using namespace arqon;

constexpr int QK = 32;
constexpr int MAX_M = 8;
constexpr int TILE_K = 512;
constexpr int TILE_STRIDE = QK + 1;                   // a staged block and its padding float
constexpr int TILE_ROW = TILE_K / QK * TILE_STRIDE;  // one row of x in shared memory

__device__ __forceinline__ float load_f16(const uint8_t* p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

struct Q8_0 {
    static constexpr int BYTES = 34;
    __device__ static float scale(const uint8_t* b) { return load_f16(b); }
    __device__ static float minv(const uint8_t*) { return 0.0f; }
    __device__ static float q(const uint8_t* b, int j) { return (float)(int8_t)b[2 + j]; }
};
struct Q4_0 {
    static constexpr int BYTES = 18;
    __device__ static float scale(const uint8_t* b) { return load_f16(b); }
    __device__ static float minv(const uint8_t*) { return 0.0f; }
    __device__ static float q(const uint8_t* b, int j) {
        const int nib = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
        return (float)(nib - 8);
    }
};
struct Q4_1 {
    static constexpr int BYTES = 20;
    __device__ static float scale(const uint8_t* b) { return load_f16(b); }
    __device__ static float minv(const uint8_t* b) { return load_f16(b + 2); }
    __device__ static float q(const uint8_t* b, int j) {
        return (float)(j < 16 ? (b[4 + j] & 15) : (b[4 + j - 16] >> 4));
    }
};

// Contribution of elements [j0, j1) of one block to one output, x given in f32.
template <typename F, typename X>
__device__ __forceinline__ float block_dot(const uint8_t* b, const X* x, int j0, int j1) {
    float sq = 0.0f, sx = 0.0f;
    for (int j = j0; j < j1; ++j) {
        const float xv = to_f32(x[j]);
        sq += F::q(b, j) * xv;
        sx += xv;
    }
    return F::scale(b) * sq + F::minv(b) * sx;
}

template <typename F, typename T>
__device__ void gemv_warp(const uint8_t* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int m, int n,
                          int k) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;
    const int nb = k / QK;
    const uint8_t* wr = w + (size_t)row * nb * F::BYTES;
    float acc[MAX_M];
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) acc[r] = 0.0f;
    for (int b = lane; b < nb; b += 32) {
#pragma unroll
        for (int r = 0; r < MAX_M; ++r)
            if (r < m) acc[r] += block_dot<F>(wr + (size_t)b * F::BYTES, x + (size_t)r * k + b * QK, 0, QK);
    }
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + row] = from_f32<T>(s);
        }
    }
}

template <typename F, typename T>
__device__ void gemv_smem(const uint8_t* __restrict__ w, const T* __restrict__ x, T* __restrict__ y, int m, int n,
                          int k) {
    __shared__ float xs[MAX_M][TILE_ROW];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + warp;
    const int nb = k / QK;
    const uint8_t* wr = w + (size_t)min(row, n - 1) * nb * F::BYTES;
    float acc[MAX_M];
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) acc[r] = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE_K) {
        const int tk = min(TILE_K, k - k0);
        __syncthreads();  // the previous tile is consumed
        for (int i = threadIdx.x; i < m * tk; i += blockDim.x) {
            const int r = i / tk, c = i % tk;
            xs[r][c / QK * TILE_STRIDE + c % QK] = to_f32(x[(size_t)r * k + k0 + c]);
        }
        __syncthreads();
        // Lane l takes half (l & 1) of block (l >> 1) of the tile: 16 blocks per tile.
        const int bt = lane >> 1, j0 = (lane & 1) * 16;
        if (row < n && bt * QK < tk) {
            const uint8_t* b = wr + (size_t)(k0 / QK + bt) * F::BYTES;
#pragma unroll
            for (int r = 0; r < MAX_M; ++r)
                if (r < m) acc[r] += block_dot<F>(b, &xs[r][bt * TILE_STRIDE], j0, j0 + 16);
        }
    }
    if (row >= n) return;
#pragma unroll
    for (int r = 0; r < MAX_M; ++r) {
        if (r < m) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + row] = from_f32<T>(s);
        }
    }
}

#define GEMV_ENTRY(FMT, FNAME, TY, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) quant_gemv_warp_##FNAME##_##NAME(                         \
        const uint8_t* w, const TY* x, TY* y, int m, int n, int k) {                                           \
        gemv_warp<FMT, TY>(w, x, y, m, n, k);                                                                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) quant_gemv_smem_##FNAME##_##NAME(                         \
        const uint8_t* w, const TY* x, TY* y, int m, int n, int k) {                                           \
        gemv_smem<FMT, TY>(w, x, y, m, n, k);                                                                  \
    }
#define GEMV_TYPES(FMT, FNAME)                   \
    GEMV_ENTRY(FMT, FNAME, float, f32)           \
    GEMV_ENTRY(FMT, FNAME, __nv_bfloat16, bf16) \
    GEMV_ENTRY(FMT, FNAME, __half, f16)

GEMV_TYPES(Q8_0, q8_0)
GEMV_TYPES(Q4_0, q4_0)
GEMV_TYPES(Q4_1, q4_1)
