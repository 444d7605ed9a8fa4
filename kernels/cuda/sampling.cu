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
//      The k' best (value desc, index asc; NaN never) are selected by a radix
//      select of the k'-th largest value (three passes over the row, 11/11/10
//      bits of an order-preserving key, histograms in shared memory), a pass
//      for ties at the cut when there are more than fit (lowest indices win),
//      a gather, and a bitonic sort of the k' in shared memory: five or six
//      reads of the row, where repeated argmax took k'.
//   2. p_i = exp(v_i - v_max) / Z, Z over the k' selected when top_k[r] >= 1,
//      over the whole vocabulary otherwise (top-p alone then acts within the
//      top MAX_TOP_K, which carry the mass that matters).
//   3. n = the smallest prefix with cumulative p >= top_p[r] (taken sequentially,
//      in f32); top_p outside (0, 1) keeps all k'.
//   4. out_ids[r, :n], out_probs[r, :n] = p_i / sum(p_:n); the rest -1 and 0;
//      out_count[r] = n; out_token[r] = the first id whose cumulative
//      probability exceeds uniform[r] (the last kept one if none does).
// Variants: 256 or 1024 threads per row (at least 256: thread t < 256 owns
// bins of the select's scan).
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

// A key whose unsigned order is the order of the values: -0 as +0 (they tie),
// NaN 0, below every number (whose keys are at least 0x007fffff, -inf's).
__device__ __forceinline__ unsigned int order_key(float v) {
    if (isnan(v)) return 0u;
    unsigned int b = __float_as_uint(v);
    if ((b << 1) == 0u) b = 0u;  // -0 as +0, by its bits (no compiler may fold this)
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inclusive sum of `v` over threads 0..threadIdx.x; `total` gets the block's sum. Every thread of
// the block (a multiple of 32, at most 1024) must call it; `part` holds 32 entries of shared memory.
__device__ __forceinline__ unsigned int block_scan(unsigned int v, unsigned int& total, unsigned int* part) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    unsigned int incl = v, sum = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {  // a butterfly: the lanes below take the partner group's sum
        const unsigned int other = __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane & o) incl += other;
        sum += other;
    }
    __syncthreads();  // part may still be read
    if (lane == 31) part[warp] = incl;
    __syncthreads();
    total = 0u;
    for (int w = 0; w < nw; ++w) {
        if (w == warp) incl += total;
        total += part[w];
    }
    return incl;
}

// The radix select's digits: 11, 11 and 10 bits of the key from the top. The first digit holds
// the sign, the exponent and two bits of mantissa, so logits of one row spread over a few dozen
// bins and the shared-memory atomics of a warp seldom meet at one address.
constexpr int RADIX_PASSES = 3;
constexpr int MAX_BINS = 2048;
constexpr int SCAN_OWNERS = 256;  // threads that own bins (blockDim.x >= 256)

template <typename T>
__device__ void top_k_top_p(const T* logits, const int* top_k, const float* top_p, const float* inv_temp,
                            const float* uniform, int* out_ids, float* out_probs, int* out_count, int* out_token,
                            TopKParams p) {
    __shared__ float sv[32];
    __shared__ unsigned int part[32];
    __shared__ unsigned int bins[MAX_BINS];
    __shared__ float sel_v[MAX_TOP_K];
    __shared__ int sel_i[MAX_TOP_K];
    __shared__ unsigned int s_prefix, s_tied;
    __shared__ int s_need, s_last_tie, s_slots;
    const int r = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    if (r >= p.rows) return;
    const T* row = logits + (size_t)r * p.vocab;
    const float it = inv_temp[r];
    const float s = (isfinite(it) && it > 0.0f) ? it : 1.0f;
    const int want = top_k[r];
    int k = (want >= 1 && want <= MAX_TOP_K) ? want : MAX_TOP_K;
    k = min(k, p.vocab);
    if (t == 0) {
        s_prefix = 0u;
        s_tied = 0u;
        s_need = 0;
        s_last_tie = 0x7fffffff;
        s_slots = 0;
    }

    // 1. Radix select of the k-th largest key: `prefix` holds the bits fixed so far (under
    //    `mask`), `need` how many keys under it are still to be taken, `s_tied` how many share
    //    it. The first pass's total is the count of numbers (NaN has key 0), which bounds k.
    unsigned int prefix = 0u, mask = 0u;
    int need = k;
    for (int pass = 0; pass < RADIX_PASSES && k > 0; ++pass) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
        const int nb = pass == 2 ? 1024 : 2048;
        const unsigned int digit = (unsigned int)nb - 1u;
        for (int b = t; b < nb; b += nt) bins[b] = 0u;
        __syncthreads();
        for (int i = t; i < p.vocab; i += nt) {
            const unsigned int key = order_key(to_f32(row[i]) * s);
            if (key != 0u && (key & mask) == prefix) atomicAdd(&bins[(key >> shift) & digit], 1u);
        }
        __syncthreads();
        // Owner o takes the nb / 256 bins from the top down: nb - 1 - o * per - j.
        const int per = nb / SCAN_OWNERS;
        unsigned int own = 0u;
        if (t < SCAN_OWNERS)
            for (int j = 0; j < per; ++j) own += bins[nb - 1 - t * per - j];
        unsigned int total;
        const unsigned int incl = block_scan(own, total, part);
        if (pass == 0) k = min(k, (int)total);
        need = min(need, k);
        if (t < SCAN_OWNERS && k > 0 && incl >= (unsigned int)need && incl - own < (unsigned int)need) {
            unsigned int above = incl - own;
            for (int j = 0; j < per; ++j) {
                const int b = nb - 1 - t * per - j;
                if (above + bins[b] >= (unsigned int)need) {
                    s_prefix = prefix | ((unsigned int)b << shift);
                    s_need = need - (int)above;
                    s_tied = bins[b];
                    break;
                }
                above += bins[b];
            }
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= digit << shift;
    }
    // Now `prefix` is the k-th largest key: all k - need keys above it are taken, and of the
    // s_tied equal to it the need of lowest index.
    // 2. Ties at the cut: find the need-th lowest index holding the cut key. Each thread counts
    //    a contiguous stretch of the row, so a scan of the counts runs in index order.
    if (k > 0 && (int)s_tied > need) {
        const int per = (p.vocab + nt - 1) / nt, b0 = min(p.vocab, t * per), b1 = min(p.vocab, b0 + per);
        unsigned int c = 0u;
        for (int i = b0; i < b1; ++i) c += order_key(to_f32(row[i]) * s) == prefix;
        unsigned int total;
        const unsigned int lo = block_scan(c, total, part) - c;  // equal keys before this stretch
        if (lo < (unsigned int)need && lo + c >= (unsigned int)need) {
            unsigned int seen = lo;
            for (int i = b0; i < b1; ++i)
                if (order_key(to_f32(row[i]) * s) == prefix && ++seen == (unsigned int)need) {
                    s_last_tie = i;
                    break;
                }
        }
    }
    __syncthreads();
    // 3. Gather the k (order free: a sort follows), then sort them by (value desc, index asc).
    const int last_tie = s_last_tie;
    for (int i = t; i < p.vocab && k > 0; i += nt) {
        const float v = to_f32(row[i]) * s;
        const unsigned int key = order_key(v);
        if (key > prefix || (key == prefix && i <= last_tie)) {
            const int slot = atomicAdd(&s_slots, 1);
            sel_v[slot] = v;
            sel_i[slot] = i;
        }
    }
    __syncthreads();
    for (int i = k + t; i < MAX_TOP_K; i += nt) {  // padding that sorts last
        sel_v[i] = -INFINITY;
        sel_i[i] = 0x7fffffff;
    }
    for (int size = 2; size <= MAX_TOP_K; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            if (t < MAX_TOP_K / 2) {
                const int a = 2 * t - (t & (stride - 1)), b = a + stride;
                const bool first_best = (a & size) == 0;
                const bool swap = first_best ? better(sel_v[b], sel_i[b], sel_v[a], sel_i[a])
                                             : better(sel_v[a], sel_i[a], sel_v[b], sel_i[b]);
                if (swap) {
                    const float tv = sel_v[a];
                    const int ti = sel_i[a];
                    sel_v[a] = sel_v[b];
                    sel_i[a] = sel_i[b];
                    sel_v[b] = tv;
                    sel_i[b] = ti;
                }
            }
        }
    }
    __syncthreads();
    const float vmax = k > 0 ? sel_v[0] : 0.0f;
    float z = 0.0f;
    if (want < 1 && k > 0) {
        for (int i = t; i < p.vocab; i += nt) {
            const float v = to_f32(row[i]) * s;
            if (!isnan(v)) z += expf(v - vmax);
        }
        z = block_sum(z, sv);
    }
    if (t != 0) return;
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
