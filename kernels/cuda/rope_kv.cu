// RoPE on the queries and keys of a stacked q/k/v projection, fused with the write of keys and values into a paged KV cache.
//
// Layouts (row-major, T = f32 | bf16 | f16):
//   src      [tokens, q_heads + 2 * kv_heads, head_dim]   read only: the stacked q/k/v
//            projection (each token's query heads, then its key heads, then its value heads)
//   q_out    [tokens, q_heads, head_dim]    the rotated queries
//   cos_sin  [max_pos, head_dim] f32        cos of pair i at [p, i], sin at [p, head_dim/2 + i]
//   positions[tokens] i32, slots[tokens] i32 (slot = block * block_size + offset)
//   k_cache, v_cache [num_blocks, kv_heads, block_size, head_dim] (vLLM's layout
//            without the x-packing of keys): token at `slot`, head h, element e is at
//            ((slot / bs * kv_heads + h) * bs + slot % bs) * head_dim + e.
// Pairs: 0 = interleaved (2i, 2i+1), 1 = half-split (i, i + head_dim/2).
// Rotations are computed in T's arithmetic, as candle's RoPE kernels do (see
// rope_pair). A token whose position is outside [0, max_pos) is left untouched (its q_out
// rows too); a token whose slot is outside the cache (padding uses -1) gets its
// queries rotated but no cache write. Variants: a 128-thread block per token looping over all pairs
// of all heads, or one warp per (token, head).
#include "common.cuh"
using namespace arqon;

struct RopeKvParams {
    int tokens, q_heads, kv_heads, head_dim, block_size, num_blocks, max_pos, pairs;
};

__device__ __forceinline__ void pair_index(int i, int d, int pairs, int& a, int& b) {
    if (pairs == 0) { a = 2 * i; b = 2 * i + 1; } else { a = i; b = i + d / 2; }
}

// Pair `i` of head `hh` (q heads first, then kv heads) of token `t`.
// Row `t` of `src`, head `hh` (query heads, then key heads, then value heads).
template <typename T>
__device__ __forceinline__ const T* src_head(const T* src, int t, int hh, const RopeKvParams& p) {
    return src + ((size_t)t * (p.q_heads + 2 * p.kv_heads) + hh) * p.head_dim;
}

template <typename T>
__device__ __forceinline__ void rope_pair(const T* src, T* q_out, T* kc, const float* cs, int t, int hh, int i,
                                          int pos, long long cache_base, const RopeKvParams& p) {
    const int d = p.head_dim;
    int a, b;
    pair_index(i, d, p.pairs, a, b);
    // In T's own arithmetic, as candle's RoPE kernels compute (the table
    // rounded to T, each product and the sum rounded to T; in f32 the plain
    // formula), so that a fused step gives the unfused one's numbers.
    const T c = from_f32<T>(cs[(size_t)pos * d + i]), s = from_f32<T>(cs[(size_t)pos * d + d / 2 + i]);
    const T* x = src_head(src, t, hh, p);
    T* y = nullptr;
    if (hh < p.q_heads) {
        y = q_out + ((size_t)t * p.q_heads + hh) * d;
    } else if (cache_base >= 0) {
        y = kc + cache_base + (size_t)(hh - p.q_heads) * p.block_size * d;
    }
    if (y) {
        const T xa = x[a], xb = x[b];
        y[a] = xa * c - xb * s;
        y[b] = xa * s + xb * c;
    }
}

// Offset of (token slot, head 0, element 0) in the cache, or -1 for no write.
__device__ __forceinline__ long long cache_base_of(int slot, const RopeKvParams& p) {
    if (slot < 0 || (long long)slot >= (long long)p.num_blocks * p.block_size) return -1;
    const long long blk = slot / p.block_size, off = slot % p.block_size;
    return (blk * p.kv_heads * p.block_size + off) * p.head_dim;
}

template <typename T>
__device__ void rope_kv_token(const T* src, T* q_out, const float* cs, const int* positions,
                              const int* slots, T* kc, T* vc, RopeKvParams p) {
    const int t = blockIdx.x;
    if (t >= p.tokens) return;
    const int pos = positions[t];
    if (pos < 0 || pos >= p.max_pos) return;
    const long long base = cache_base_of(slots[t], p);
    const int half = p.head_dim / 2, heads = p.q_heads + p.kv_heads;
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) rope_pair(src, q_out, kc, cs, t, j / half, j % half, pos, base, p);
    if (base < 0) return;
    for (int j = threadIdx.x; j < p.kv_heads * p.head_dim; j += blockDim.x) {
        const int h = j / p.head_dim, e = j % p.head_dim;
        vc[base + (size_t)h * p.block_size * p.head_dim + e] = src_head(src, t, p.q_heads + p.kv_heads + h, p)[e];
    }
}

template <typename T>
__device__ void rope_kv_head(const T* src, T* q_out, const float* cs, const int* positions,
                             const int* slots, T* kc, T* vc, RopeKvParams p) {
    const int t = blockIdx.x, hh = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= p.tokens || hh >= p.q_heads + p.kv_heads) return;
    const int pos = positions[t];
    if (pos < 0 || pos >= p.max_pos) return;
    const long long base = cache_base_of(slots[t], p);
    for (int i = lane; i < p.head_dim / 2; i += 32) rope_pair(src, q_out, kc, cs, t, hh, i, pos, base, p);
    if (hh < p.q_heads || base < 0) return;
    const int h = hh - p.q_heads;
    const T* v = src_head(src, t, p.q_heads + p.kv_heads + h, p);
    for (int e = lane; e < p.head_dim; e += 32) vc[base + (size_t)h * p.block_size * p.head_dim + e] = v[e];
}

#define ROPE_ENTRY(TY, NAME)                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) rope_kv_write_token_##NAME(                            \
        const TY* src, TY* q_out, const float* cs, const int* positions, const int* slots, TY* kc, TY* vc,   \
        RopeKvParams p) {                                                                                    \
        rope_kv_token<TY>(src, q_out, cs, positions, slots, kc, vc, p);                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) rope_kv_write_head_##NAME(                             \
        const TY* src, TY* q_out, const float* cs, const int* positions, const int* slots, TY* kc, TY* vc,   \
        RopeKvParams p) {                                                                                    \
        rope_kv_head<TY>(src, q_out, cs, positions, slots, kc, vc, p);                                       \
    }

ROPE_ENTRY(float, f32)
ROPE_ENTRY(__nv_bfloat16, bf16)
ROPE_ENTRY(__half, f16)
