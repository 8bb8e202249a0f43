// Dynamic Routing Normalization (DRN), forward and backward, one warp per token.
//
// drn_forward: per token t over its E experts
//   mu = mean z, sigma = sqrt(mean (z - mu)^2 + eps), zhat = theta (z - mu) / sigma
//   (zhat = z when use_drn == 0), P = softmax(zhat).
// drn_backward: given dL/dP, writes dL/dz and one partial dL/dtheta per token;
// drn_theta_sum adds the partials in a fixed order (deterministic, no float atomics).
//
// Scalars come as one struct passed by value (DrnDims; dtopp_cuda::params), theta from a
// one-element buffer: training's theta is a parameter on the device, so no layer waits
// for the host to read it. The same entry points run through cudarc (`dtopp route`) and
// through burn-cuda's cubecl client on burn's own buffers (training).
//
// Mapping: a warp walks a row with lane stride 32, so each load instruction of the warp
// reads 32 consecutive floats (coalesced); reductions are warp shuffles, no shared memory
// and no block barriers. Blocks hold WARPS warps (256 threads). Memory traffic per token:
// forward reads its E logits twice (stats, exp; the second pass hits L1/L2) and writes E
// probabilities; backward reads logits, probs and grads twice, writes E gradients.
// A non-finite logit or gradient is reported by atomicMin of its row-major index into
// `status` (initialised to 0xffffffff by the host); the test is on the bits, so fast-math
// folding of NaN comparisons cannot remove it.

#include "common.cuh"

struct DrnDims {
    unsigned tokens;
    unsigned experts;
    // 0: plain softmax (theta not read).
    int use_drn;
    float eps;
};

// Mean and sigma of a row (0 and 1 without DRN); flags non-finite logits.
__device__ __forceinline__ float2 row_stats(const float* __restrict__ z, unsigned base,
                                            unsigned e, unsigned lane, int use_drn,
                                            float eps, unsigned* status) {
    float s = 0.0f;
    for (unsigned j = lane; j < e; j += 32) {
        float v = z[base + j];
        if (!is_finite_bits(v)) atomicMin(status, base + j);
        s += v;
    }
    if (!use_drn) return make_float2(0.0f, 1.0f);
    float mu = warp_sum(s) / (float)e;
    float q = 0.0f;
    for (unsigned j = lane; j < e; j += 32) {
        float d = z[base + j] - mu;
        q += d * d;
    }
    return make_float2(mu, sqrtf(warp_sum(q) / (float)e + eps));
}

extern "C" __global__ void drn_forward(const float* __restrict__ logits,
                                       const float* __restrict__ theta_buf,
                                       float* __restrict__ probs,
                                       unsigned* __restrict__ status, const DrnDims d) {
    unsigned t = blockIdx.x * WARPS + threadIdx.x / 32;
    unsigned lane = threadIdx.x % 32;
    if (t >= d.tokens) return;
    unsigned experts = d.experts;
    int use_drn = d.use_drn;
    float eps = d.eps;
    float theta = use_drn ? theta_buf[0] : 1.0f;
    unsigned base = t * experts;
    float2 st = row_stats(logits, base, experts, lane, use_drn, eps, status);
    float scale = use_drn ? theta / st.y : 1.0f;
    float zmax = -3.4e38f;
    for (unsigned j = lane; j < experts; j += 32)
        zmax = fmaxf(zmax, scale * (logits[base + j] - st.x));
    zmax = warp_max(zmax);
    float total = 0.0f;
    for (unsigned j = lane; j < experts; j += 32) {
        float x = expf(scale * (logits[base + j] - st.x) - zmax);
        probs[base + j] = x;
        total += x;
    }
    float inv = 1.0f / warp_sum(total);
    for (unsigned j = lane; j < experts; j += 32) probs[base + j] *= inv;
}

extern "C" __global__ void drn_backward(const float* __restrict__ logits,
                                        const float* __restrict__ theta_buf,
                                        const float* __restrict__ probs,
                                        const float* __restrict__ grad_probs,
                                        float* __restrict__ grad_logits,
                                        float* __restrict__ theta_partials,
                                        unsigned* __restrict__ status, const DrnDims d) {
    unsigned t = blockIdx.x * WARPS + threadIdx.x / 32;
    unsigned lane = threadIdx.x % 32;
    if (t >= d.tokens) return;
    unsigned experts = d.experts;
    int use_drn = d.use_drn;
    float eps = d.eps;
    float theta = use_drn ? theta_buf[0] : 1.0f;
    unsigned base = t * experts;
    float2 st = row_stats(logits, base, experts, lane, use_drn, eps, status);
    // dzhat_j = P_j (dP_j - sum_k P_k dP_k)
    float dot = 0.0f;
    for (unsigned j = lane; j < experts; j += 32) {
        float g = grad_probs[base + j];
        if (!is_finite_bits(g)) atomicMin(status, base + j);
        dot += probs[base + j] * g;
    }
    dot = warp_sum(dot);
    if (!use_drn) {
        for (unsigned j = lane; j < experts; j += 32)
            grad_logits[base + j] = probs[base + j] * (grad_probs[base + j] - dot);
        if (lane == 0) theta_partials[t] = 0.0f;
        return;
    }
    float sum_dzhat = 0.0f, sum_dzhat_u = 0.0f;
    for (unsigned j = lane; j < experts; j += 32) {
        float dzhat = probs[base + j] * (grad_probs[base + j] - dot);
        float u = (logits[base + j] - st.x) / st.y;
        sum_dzhat += dzhat;
        sum_dzhat_u += dzhat * u;
    }
    sum_dzhat = warp_sum(sum_dzhat);
    sum_dzhat_u = warp_sum(sum_dzhat_u);
    float du_mean = theta * sum_dzhat / (float)experts;
    float du_u_mean = theta * sum_dzhat_u / (float)experts;
    for (unsigned j = lane; j < experts; j += 32) {
        float dzhat = probs[base + j] * (grad_probs[base + j] - dot);
        float u = (logits[base + j] - st.x) / st.y;
        grad_logits[base + j] = (theta * dzhat - du_mean - u * du_u_mean) / st.y;
    }
    if (lane == 0) theta_partials[t] = sum_dzhat_u;
}

// One block of 256 threads: grad_theta[0] = sum of the partials (strided, then a tree).
extern "C" __global__ void __launch_bounds__(256)
    drn_theta_sum(const float* __restrict__ theta_partials, float* __restrict__ grad_theta,
                  const DrnDims d) {
    __shared__ float red[256];
    float s = 0.0f;
    for (unsigned t = threadIdx.x; t < d.tokens; t += blockDim.x) s += theta_partials[t];
    red[threadIdx.x] = s;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) red[threadIdx.x] += red[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) grad_theta[0] = red[0];
}
