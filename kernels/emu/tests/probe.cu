// Kernels that probe the emulator itself (tests/emulator.rs): what each CUDA
// construct gives, and the mistakes it must report rather than hide.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Every thread writes (threadIdx.x, blockIdx.x, blockIdx.y, blockDim.x, gridDim.x, gridDim.y) at its
// global index.
extern "C" __global__ void probe_indices(int* out) {
    const int g = (blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
    int* o = out + 6 * g;
    o[0] = threadIdx.x;
    o[1] = blockIdx.x;
    o[2] = blockIdx.y;
    o[3] = blockDim.x;
    o[4] = gridDim.x;
    o[5] = gridDim.y;
}

// The butterfly sum of the lane ids (496 in every lane), and the value of lane ^ 5.
extern "C" __global__ void probe_shuffle(int* sum, float* partner) {
    const int lane = threadIdx.x & 31;
    int v = lane;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    sum[threadIdx.x] = v;
    partner[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x * 0.5f, 5);
}

// Shared memory across a barrier: thread t reads what thread (t + 1) % n wrote, over two rounds.
extern "C" __global__ void probe_barrier(int* out) {
    __shared__ int s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = 1000 * blockIdx.x + t;
    __syncthreads();
    int a = s[(t + 1) % n];
    __syncthreads();
    s[t] = -a;
    __syncthreads();
    out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// The same without the first barrier: which value a thread reads depends on the order threads run in.
extern "C" __global__ void probe_missing_barrier(int* out) {
    __shared__ int s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = 7;
    __syncthreads();
    s[t] = t;
    out[t] = s[(t + 1) % n];
}

// Threads past `live` return; the rest meet at a barrier (fine on a GPU: returned threads do not count).
extern "C" __global__ void probe_early_return(int* out, int live) {
    __shared__ int s[1024];
    const int t = threadIdx.x;
    if (t >= live) return;
    s[t] = t;
    __syncthreads();
    out[t] = s[(t + 1) % live];
}

// Half of warp 0 at __syncthreads, the other half at a shuffle that waits for the first half: no one
// can go on. (Whole warps that return instead do not hold up a barrier: probe_early_return.)
extern "C" __global__ void probe_divergent_barrier(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
        out[threadIdx.x] = 1;
    } else {
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
    }
}

// A full-mask shuffle after half the warp returned.
extern "C" __global__ void probe_shuffle_after_return(int* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

// Reads element n of an n-element buffer.
extern "C" __global__ void probe_read_past_end(const float* x, float* out, int n) {
    if (threadIdx.x == 0) out[0] = x[n];
}

// bf16 and f16 arithmetic and conversions, one result per operation.
extern "C" __global__ void probe_halves(const float* in, float* out, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float a = in[2 * i], b = in[2 * i + 1];
        const __nv_bfloat16 ab = __float2bfloat16_rn(a), bb = __float2bfloat16_rn(b);
        const __half ah = __float2half_rn(a), bh = __float2half_rn(b);
        float* o = out + 6 * i;
        o[0] = __bfloat162float(ab);
        o[1] = __bfloat162float(ab * bb);
        o[2] = __bfloat162float(ab / bb);
        o[3] = __half2float(ah);
        o[4] = __half2float(ah + bh);
        o[5] = __half2float(-ah / bh);
    }
}

// Block b writes mark[b], then reads the mark of block b + 1: a race between blocks (the order blocks
// run in decides what it reads).
extern "C" __global__ void probe_block_race(int* mark, int* seen) {
    const int b = blockIdx.x;
    if (threadIdx.x != 0) return;
    mark[b] = b;
    seen[b] = b + 1 < (int)gridDim.x ? mark[b + 1] : b + 1;
}

// Every thread adds its index + 1 to a shared and a global counter, each side of a barrier: `old` gets
// what each thread's add saw, `total` the shared sum (after the barrier) and the global one's.
extern "C" __global__ void probe_atomic(unsigned int* old, int* total, int* global) {
    __shared__ unsigned int s;
    if (threadIdx.x == 0) s = 0u;
    __syncthreads();
    old[threadIdx.x] = atomicAdd(&s, (unsigned int)threadIdx.x + 1u);
    atomicAdd(global, 1);
    __syncthreads();
    if (threadIdx.x == 0) total[0] = (int)s;
}
