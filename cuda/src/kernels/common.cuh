// Device helpers shared by the warp-per-token kernels (drn.cu, select.cu, route.cu).
// NVRTC gets sources from memory, not files: source.rs pastes this text in place of each
// `#include "common.cuh"` line before compiling, so the .cu files also build with nvcc -I.
#ifndef DTOPP_COMMON_CUH
#define DTOPP_COMMON_CUH

#define WARPS 8
#define FULL 0xffffffffu
#define NONE 0xffffffffu

// The test is on the bits, so fast-math folding of NaN comparisons cannot remove it.
__device__ __forceinline__ bool is_finite_bits(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// An integer key with the order of the float (-0 and +0 equal): ranking by keys keeps
// subnormal probabilities distinct even where a device flushes them, as the reference.
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned b = __float_as_uint(v);
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Whether (ka, ja) ranks before (kb, jb): larger key first, lower index among equals.
__device__ __forceinline__ bool before(unsigned ka, unsigned ja, unsigned kb, unsigned jb) {
    return ka > kb || (ka == kb && ja < jb);
}

// Reduces each lane's candidate (key, index, value) to the warp's best in rank order;
// every lane ends with the same pick (index NONE: no candidate anywhere).
__device__ __forceinline__ void warp_best(unsigned& key, unsigned& j, float& v) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned ok = __shfl_xor_sync(FULL, key, o);
        unsigned oj = __shfl_xor_sync(FULL, j, o);
        float ov = __shfl_xor_sync(FULL, v, o);
        if (oj != NONE && (j == NONE || before(ok, oj, key, j))) {
            key = ok;
            j = oj;
            v = ov;
        }
    }
}

#endif  // DTOPP_COMMON_CUH
