// The CUDA subset our kernels use, on the host, for arqon-kernels-emu: every
// `.cu` in kernels/cuda is compiled as C++ with this header included first, so
// the very source nvcc builds runs on CPU threads of control (fibers) with the
// semantics a kernel may rely on:
//   - threadIdx / blockIdx / blockDim / gridDim of the running fiber;
//   - __syncthreads(): a barrier over the block's live threads;
//   - __shfl_xor_sync(): an exchange over the warp's 32 lanes (all of them must
//     take part, as the full mask our kernels pass says);
//   - atomicAdd() on int / unsigned int: fibers switch only at barriers, so a
//     plain read-modify-write is atomic;
//   - __shared__: one copy per launch thread (the blocks of a launch run one
//     after another on it), shared by the block's fibers;
//   - __half / __nv_bfloat16: 16-bit storage, f32 arithmetic rounded to nearest
//     even after every operation, conversions as cuda_fp16.h / cuda_bf16.h.
// What it does not model: timing, memory coalescing, and data races that no
// order of the fibers shows (runtime.cpp runs them in both orders).
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define __global__ __attribute__((visibility("default")))
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};

namespace arqon_emu {
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
// Exchanges 8 bytes with lane `lane ^ mask_lane` of the running fiber's warp.
uint64_t shfl_xor_bits(unsigned int mask, uint64_t bits, int mask_lane);

inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
}  // namespace arqon_emu

#define threadIdx (::arqon_emu::thread_idx())
#define blockIdx (::arqon_emu::block_idx())
#define blockDim (::arqon_emu::block_dim())
#define gridDim (::arqon_emu::grid_dim())

inline void __syncthreads() { ::arqon_emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = ::arqon_emu::shfl_xor_bits(mask, bits, lane_mask);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
inline float __uint_as_float(unsigned int u) { return ::arqon_emu::bits_f32(u); }
inline unsigned int __float_as_uint(float f) { return ::arqon_emu::f32_bits(f); }
// A fiber runs until it reaches a barrier, so a read-modify-write is atomic as it stands.
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = (int)((unsigned int)old + (unsigned int)v);
    return old;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---- 16-bit floats -------------------------------------------------------

namespace arqon_emu {
// f32 -> bf16, round to nearest even; NaN stays NaN (quiet), as `half` does.
inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

// f32 -> IEEE binary16, round to nearest even, with subnormals, overflow to inf, NaN quiet.
inline uint16_t f32_to_f16_bits(float f) {
    const uint32_t u = f32_bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {                                      // below the smallest normal half, 2^-14
        if (a < 0x33000000u) return sign;                       // below half the smallest subnormal: zero
        const uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 + 113 - e - 1: the implicit bit lands on 2^-24 units
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return (uint16_t)(sign | q);
    }
    uint32_t v = a - 0x38000000u;  // rebias 127 -> 15
    const uint32_t rem = v & 0x1fffu;
    v >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
    return (uint16_t)(sign | v);
}
inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        if (m == 0) return bits_f32(sign);
        return (sign ? -1.0f : 1.0f) * ldexpf((float)m, -24);
    }
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}
}  // namespace arqon_emu

struct __half {
    uint16_t bits;
};
struct __half2 {
    __half x, y;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h) { return ::arqon_emu::f16_bits_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{::arqon_emu::f32_to_f16_bits(f)}; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::arqon_emu::bf16_bits_to_f32(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::arqon_emu::f32_to_bf16_bits(f)}; }

#define ARQON_EMU_HALF_OPS(T, TO, FROM)                                  \
    inline T operator+(T a, T b) { return FROM(TO(a) + TO(b)); }         \
    inline T operator-(T a, T b) { return FROM(TO(a) - TO(b)); }         \
    inline T operator*(T a, T b) { return FROM(TO(a) * TO(b)); }         \
    inline T operator/(T a, T b) { return FROM(TO(a) / TO(b)); }         \
    inline T operator-(T a) { return T{(uint16_t)(a.bits ^ 0x8000u)}; } \
    inline T hexp(T a) { return FROM(expf(TO(a))); }
ARQON_EMU_HALF_OPS(__half, __half2float, __float2half_rn)
ARQON_EMU_HALF_OPS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
#undef ARQON_EMU_HALF_OPS
