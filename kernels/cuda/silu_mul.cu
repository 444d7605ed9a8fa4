// The MLP's activation from the stacked gate/up product (vLLM's silu_and_mul):
//   gate_up [rows, 2 * inter]   each row its gate, then its up projection
//   out     [rows, inter]       out[r, i] = silu(gate[r, i]) * up[r, i], silu(g) = g / (1 + exp(-g))
// computed in T's own arithmetic (T = f32 | bf16 | f16), as candle's SiLU and
// multiply kernels compute them: silu = g / (1 + exp(-g)) with exp, the sum and
// the quotient each in T, then the product in T; so a fused step gives the
// unfused one's numbers. Variants: one thread per output element over the whole
// batch (a 1-D grid), or one 256-thread block per row striding over it.
#include "common.cuh"
using namespace arqon;

template <typename T>
__device__ void silu_mul_element(const T* gate_up, T* out, long long rows, int inter) {
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= rows * inter) return;
    const long long r = j / inter, i = j % inter;
    const T* row = gate_up + r * 2 * inter;
    out[j] = silu_times(row[i], row[inter + i]);
}

template <typename T>
__device__ void silu_mul_row(const T* gate_up, T* out, long long rows, int inter) {
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const T* row = gate_up + r * 2 * inter;
    for (int i = threadIdx.x; i < inter; i += blockDim.x) out[r * inter + i] = silu_times(row[i], row[inter + i]);
}

#define SILU_ENTRY(TY, NAME)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        silu_mul_element_##NAME(const TY* gate_up, TY* out, long long rows, int inter) {                      \
        silu_mul_element<TY>(gate_up, out, rows, inter);                                                      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        silu_mul_row_##NAME(const TY* gate_up, TY* out, long long rows, int inter) {                          \
        silu_mul_row<TY>(gate_up, out, rows, inter);                                                          \
    }

SILU_ENTRY(float, f32)
SILU_ENTRY(__nv_bfloat16, bf16)
SILU_ENTRY(__half, f16)
