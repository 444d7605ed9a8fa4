// Decode attention (one query token per sequence) for GQA over a paged KV cache.
//
// Layouts (row-major, T = f32 | bf16 | f16):
//   q, out           [num_seqs, q_heads, head_dim]
//   k_cache, v_cache [num_blocks, kv_heads, block_size, head_dim]   (as rope_kv.cu writes)
//   block_tables     [num_seqs, max_blocks_per_seq] i32: token t of sequence s is
//                    in block block_tables[s][t / block_size], offset t % block_size
//   context_lens     [num_seqs] i32 (tokens attended, clamped to max_blocks_per_seq * block_size)
// Query head h reads kv head h / (q_heads / kv_heads). head_dim % 32 == 0, <= 256.
// out = softmax(scale * q . K^T) V, accumulated in f32 with an online softmax;
// an empty context gives zeros. Table entries outside [0, num_blocks) are
// skipped (never read) so a bad table cannot fault; its result is unspecified.
//
// Variants: `decode` (one 128-thread block per (head, seq) walks the whole
// context) and `split` + `reduce` (flash-decoding: the context is cut into
// partitions of `partition_size` tokens, each block writes its partial max,
// sum and unnormalised accumulator to f32 scratch, and `reduce` merges them).
#include "common.cuh"
using namespace arqon;

constexpr int WARPS = 4;
constexpr int MAX_D = 256;
constexpr int PER_LANE = MAX_D / 32;

struct PagedParams {
    int num_seqs, q_heads, kv_heads, head_dim, block_size, num_blocks, max_blocks_per_seq;
    int partition_size, max_partitions;
    float scale;
};

struct Partial {
    float m, l;  // running max and sum of exp(s - m); accumulator is in shared `acc`
};

// Attends q (of sequence `seq`, head `h`) to tokens [t0, t1). On return every
// thread sees the block-merged (m, l) and threads e < head_dim own acc[e]
// (unnormalised, relative to m) in shared memory `s_out`.
template <typename T>
__device__ Partial attend(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                          const int* __restrict__ table, int t0, int t1, int h, const PagedParams& p,
                          float* s_out) {
    __shared__ float s_m[WARPS], s_l[WARPS];
    __shared__ float s_acc[WARPS][MAX_D];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n = p.head_dim / 32;
    const int kvh = h / (p.q_heads / p.kv_heads);
    float qr[PER_LANE], acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        qr[i] = i < n ? to_f32(q[lane + 32 * i]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int t = t0 + warp; t < t1; t += WARPS) {
        const int blk = table[t / p.block_size];
        if (blk < 0 || blk >= p.num_blocks) continue;  // uniform over the warp
        const size_t base = (((size_t)blk * p.kv_heads + kvh) * p.block_size + t % p.block_size) * p.head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i)
            if (i < n) dot += qr[i] * to_f32(kc[base + lane + 32 * i]);
        const float s = warp_sum(dot) * p.scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i)
            if (i < n) acc[i] = acc[i] * corr + e * to_f32(vc[base + lane + 32 * i]);
        m = m_new;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i)
        if (i < n) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float mm = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mm = fmaxf(mm, s_m[w]);
    float ll = 0.0f;
    float f[WARPS];
    for (int w = 0; w < WARPS; ++w) {
        f[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - mm);
        ll += s_l[w] * f[w];
    }
    for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < WARPS; ++w) a += s_acc[w][e] * f[w];
        s_out[e] = a;
    }
    return Partial{mm, ll};
}

__device__ __forceinline__ int context_of(const int* context_lens, int seq, const PagedParams& p) {
    const int cap = p.max_blocks_per_seq * p.block_size;
    const int c = context_lens[seq];
    return c < 0 ? 0 : (c > cap ? cap : c);
}

template <typename T>
__device__ void decode(const T* q, const T* kc, const T* vc, const int* tables, const int* context_lens, T* out,
                       PagedParams p) {
    __shared__ float s_out[MAX_D];
    const int h = blockIdx.x, seq = blockIdx.y;
    const size_t qo = ((size_t)seq * p.q_heads + h) * p.head_dim;
    const int ctx = context_of(context_lens, seq, p);
    Partial r = attend(q + qo, kc, vc, tables + (size_t)seq * p.max_blocks_per_seq, 0, ctx, h, p, s_out);
    for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x)
        out[qo + e] = from_f32<T>(r.l > 0.0f ? s_out[e] / r.l : 0.0f);
}

// Scratch: part_ml [num_seqs, q_heads, max_partitions, 2] (m, l), part_acc
// [num_seqs, q_heads, max_partitions, head_dim], all f32.
template <typename T>
__device__ void split(const T* q, const T* kc, const T* vc, const int* tables, const int* context_lens,
                      float* part_ml, float* part_acc, PagedParams p) {
    __shared__ float s_out[MAX_D];
    const int h = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const size_t qo = ((size_t)seq * p.q_heads + h) * p.head_dim;
    const size_t po = ((size_t)seq * p.q_heads + h) * p.max_partitions + part;
    const int ctx = context_of(context_lens, seq, p);
    const int t0 = part * p.partition_size;
    const int t1 = min(ctx, t0 + p.partition_size);
    if (t0 >= ctx) {  // empty partition: neutral element of the merge
        if (threadIdx.x == 0) { part_ml[2 * po] = -INFINITY; part_ml[2 * po + 1] = 0.0f; }
        for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) part_acc[po * p.head_dim + e] = 0.0f;
        return;
    }
    Partial r = attend(q + qo, kc, vc, tables + (size_t)seq * p.max_blocks_per_seq, t0, t1, h, p, s_out);
    if (threadIdx.x == 0) { part_ml[2 * po] = r.m; part_ml[2 * po + 1] = r.l; }
    for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) part_acc[po * p.head_dim + e] = s_out[e];
}

template <typename T>
__device__ void reduce(const float* part_ml, const float* part_acc, T* out, PagedParams p) {
    const int h = blockIdx.x, seq = blockIdx.y;
    const size_t qo = ((size_t)seq * p.q_heads + h) * p.head_dim;
    const size_t po = ((size_t)seq * p.q_heads + h) * p.max_partitions;
    float mm = -INFINITY;
    for (int i = 0; i < p.max_partitions; ++i) mm = fmaxf(mm, part_ml[2 * (po + i)]);
    float ll = 0.0f;
    for (int i = 0; i < p.max_partitions; ++i) {
        const float m = part_ml[2 * (po + i)];
        if (m != -INFINITY) ll += part_ml[2 * (po + i) + 1] * expf(m - mm);
    }
    for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
        float a = 0.0f;
        for (int i = 0; i < p.max_partitions; ++i) {
            const float m = part_ml[2 * (po + i)];
            if (m != -INFINITY) a += part_acc[(po + i) * p.head_dim + e] * expf(m - mm);
        }
        out[qo + e] = from_f32<T>(ll > 0.0f ? a / ll : 0.0f);
    }
}

#define PA_ENTRY(TY, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_##NAME(                          \
        const TY* q, const TY* kc, const TY* vc, const int* tables, const int* lens, TY* out, PagedParams p) { \
        decode<TY>(q, kc, vc, tables, lens, out, p);                                                          \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_split_##NAME(                           \
        const TY* q, const TY* kc, const TY* vc, const int* tables, const int* lens, float* part_ml,          \
        float* part_acc, PagedParams p) {                                                                     \
        split<TY>(q, kc, vc, tables, lens, part_ml, part_acc, p);                                             \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_reduce_##NAME(                          \
        const float* part_ml, const float* part_acc, TY* out, PagedParams p) {                                \
        reduce<TY>(part_ml, part_acc, out, p);                                                                \
    }

PA_ENTRY(float, f32)
PA_ENTRY(__nv_bfloat16, bf16)
PA_ENTRY(__half, f16)
