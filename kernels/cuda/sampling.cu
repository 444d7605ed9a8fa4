// Sampling on the GPU, so logits need not cross to the host.
//
// argmax: token[r] = the index of the largest logits[r, :] (lowest index on
// ties, NaN never chosen, an all-NaN row gives 0). Variants: `block` (one
// 512-thread block per row) and `split` (rows x chunks of 4096 logits give
// partial maxima in f32/i32 scratch, then `argmax_split_reduce` per row).
//
// top_k_top_p: per row r, with v = logits[r, :] * s (s = inv_temp[r], taken as
// 1 unless finite and > 0):
//   1. k' = top_k[r] if 1 <= top_k[r] <= MAX_TOP_K, else MAX_TOP_K; k' <= vocab.
//      The k' best (value desc, index asc) are selected by repeated block argmax.
//   2. p_i = exp(v_i - v_max) / Z, Z over the k' selected when top_k[r] >= 1,
//      over the whole vocabulary otherwise (top-p alone then acts within the
//      top MAX_TOP_K, which carry the mass that matters).
//   3. n = the smallest prefix with cumulative p >= top_p[r] (taken sequentially,
//      in f32); top_p outside (0, 1) keeps all k'.
//   4. out_ids[r, :n], out_probs[r, :n] = p_i / sum(p_:n); the rest -1 and 0;
//      out_count[r] = n; out_token[r] = the first id whose cumulative
//      probability exceeds uniform[r] (the last kept one if none does).
// Variants: 256 or 1024 threads per row.
#include "common.cuh"
using namespace arqon;

constexpr int MAX_TOP_K = 128;
constexpr int ARGMAX_CHUNK = 4096;

template <typename T>
__device__ void argmax_range(const T* row, int begin, int end, float& bv, int& bi, float* sv, int* si) {
    bv = -INFINITY;
    bi = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_f32(row[i]);
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    block_argmax(bv, bi, sv, si);
}

template <typename T>
__device__ void argmax_block(const T* logits, int* token, int rows, int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    float v;
    int i;
    argmax_range(logits + (size_t)r * vocab, 0, vocab, v, i, sv, si);
    if (threadIdx.x == 0) token[r] = i == 0x7fffffff ? 0 : i;
}

template <typename T>
__device__ void argmax_split(const T* logits, float* part_v, int* part_i, int rows, int vocab) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.y, c = blockIdx.x, chunks = gridDim.x;
    if (r >= rows) return;
    float v;
    int i;
    argmax_range(logits + (size_t)r * vocab, c * ARGMAX_CHUNK, min(vocab, (c + 1) * ARGMAX_CHUNK), v, i, sv, si);
    if (threadIdx.x == 0) { part_v[r * chunks + c] = v; part_i[r * chunks + c] = i; }
}

extern "C" __global__ void __launch_bounds__(256) argmax_split_reduce(const float* part_v, const int* part_i,
                                                                      int* token, int rows, int chunks) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const float v = part_v[r * chunks + c];
        const int i = part_i[r * chunks + c];
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    block_argmax(bv, bi, sv, si);
    if (threadIdx.x == 0) token[r] = bi == 0x7fffffff ? 0 : bi;
}

struct TopKParams {
    int rows, vocab;
};

template <typename T>
__device__ void top_k_top_p(const T* logits, const int* top_k, const float* top_p, const float* inv_temp,
                            const float* uniform, int* out_ids, float* out_probs, int* out_count, int* out_token,
                            TopKParams p) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float sel_v[MAX_TOP_K];
    __shared__ int sel_i[MAX_TOP_K];
    __shared__ int s_k;
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const T* row = logits + (size_t)r * p.vocab;
    const float it = inv_temp[r];
    const float s = (isfinite(it) && it > 0.0f) ? it : 1.0f;
    const int want = top_k[r];
    int k = (want >= 1 && want <= MAX_TOP_K) ? want : MAX_TOP_K;
    k = min(k, p.vocab);
    float last_v = INFINITY;
    int last_i = -1;
    if (threadIdx.x == 0) s_k = k;
    for (int sel = 0; sel < k; ++sel) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
            const float v = to_f32(row[i]) * s;
            // Only candidates strictly after the last selected one in the order.
            if (better(last_v, last_i, v, i) && better(v, i, bv, bi)) { bv = v; bi = i; }
        }
        block_argmax(bv, bi, sv, si);
        if (bi == 0x7fffffff) {  // only NaN left
            if (threadIdx.x == 0) s_k = sel;
            break;
        }
        if (threadIdx.x == 0) { sel_v[sel] = bv; sel_i[sel] = bi; }
        last_v = bv;
        last_i = bi;
    }
    __syncthreads();
    k = s_k;
    const float vmax = k > 0 ? sel_v[0] : 0.0f;
    float z = 0.0f;
    if (want < 1 && k > 0) {
        for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
            const float v = to_f32(row[i]) * s;
            if (!isnan(v)) z += expf(v - vmax);
        }
        z = block_sum(z, sv);
    }
    if (threadIdx.x != 0) return;
    if (want >= 1)
        for (int i = 0; i < k; ++i) z += expf(sel_v[i] - vmax);
    const float pp = top_p[r];
    const bool use_p = pp > 0.0f && pp < 1.0f;
    int n = k;
    float cum = 0.0f;
    for (int i = 0; i < k; ++i) {
        cum += expf(sel_v[i] - vmax) / z;
        if (use_p && cum >= pp) { n = i + 1; break; }
    }
    float kept = 0.0f;
    for (int i = 0; i < n; ++i) kept += expf(sel_v[i] - vmax) / z;
    const float u = uniform[r];
    int tok = n > 0 ? sel_i[n - 1] : -1;
    bool chosen = false;
    float c2 = 0.0f;
    for (int i = 0; i < MAX_TOP_K; ++i) {
        const size_t o = (size_t)r * MAX_TOP_K + i;
        if (i < n) {
            const float q = expf(sel_v[i] - vmax) / z / kept;
            out_ids[o] = sel_i[i];
            out_probs[o] = q;
            c2 += q;
            if (!chosen && u < c2) { tok = sel_i[i]; chosen = true; }
        } else {
            out_ids[o] = -1;
            out_probs[o] = 0.0f;
        }
    }
    out_count[r] = n;
    out_token[r] = tok;
}

#define SAMPLING_ENTRY(TY, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(512) argmax_block_##NAME(const TY* logits, int* token,       \
                                                                          int rows, int vocab) {              \
        argmax_block<TY>(logits, token, rows, vocab);                                                         \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) argmax_split_##NAME(const TY* logits, float* part_v,    \
                                                                          int* part_i, int rows, int vocab) { \
        argmax_split<TY>(logits, part_v, part_i, rows, vocab);                                                \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) top_k_top_p_256_##NAME(                                 \
        const TY* logits, const int* top_k, const float* top_p, const float* inv_temp, const float* uniform,  \
        int* out_ids, float* out_probs, int* out_count, int* out_token, TopKParams p) {                       \
        top_k_top_p<TY>(logits, top_k, top_p, inv_temp, uniform, out_ids, out_probs, out_count, out_token, p); \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) top_k_top_p_1024_##NAME(                               \
        const TY* logits, const int* top_k, const float* top_p, const float* inv_temp, const float* uniform,  \
        int* out_ids, float* out_probs, int* out_count, int* out_token, TopKParams p) {                       \
        top_k_top_p<TY>(logits, top_k, top_p, inv_temp, uniform, out_ids, out_probs, out_count, out_token, p); \
    }

SAMPLING_ENTRY(float, f32)
SAMPLING_ENTRY(__nv_bfloat16, bf16)
SAMPLING_ENTRY(__half, f16)
