// Top-p and Top-k expert selection with the CPU reference's rules, one warp per token.
//
// Experts rank by probability, descending, ties to the lower expert index. Per token:
//   top_p: k = smallest k whose rank-ordered prefix sum, added one by one in f32 exactly
//          as the CPU does, reaches p (>= p); E if rounding keeps it below; capped at
//          k_max (0: no cap). p is the first value of a device buffer, so the
//          device-resident controller feeds it without a host round trip.
//   top_k: k = the given k.
// Weights: P / (sum of the k selected P, added in rank order); padding slots hold expert
// -1 and weight 0.
//
// Mapping: each round the warp finds the next expert in rank order after the previous
// pick: every lane scans its strided share of the row (coalesced loads; the row stays in
// L1 after the first round) for its best candidate, and five shuffle steps reduce the 32
// candidates. Every lane ends with the same pick and the same running sum, so the prefix
// sum is the reference's, term for term. Cost per token: k rounds of E / 32 loads per
// lane; memory traffic E floats from DRAM, 2E + 1 values written.

#include "common.cuh"

__device__ void select_row(const float* __restrict__ probs, int* __restrict__ experts_out,
                           float* __restrict__ weights_out, int* __restrict__ counts_out,
                           unsigned* __restrict__ status, unsigned t, unsigned e,
                           unsigned limit, float p, bool use_p) {
    unsigned lane = threadIdx.x % 32;
    unsigned base = t * e;
    unsigned bad = NONE;
    for (unsigned j = lane; j < e; j += 32)
        if (bad == NONE && !is_finite_bits(probs[base + j])) bad = base + j;
    bool finite = __all_sync(FULL, bad == NONE);
    if (bad != NONE) atomicMin(status, bad);

    unsigned k = 0;
    float acc = 0.0f;
    if (!finite) {
        if (lane == 0) experts_out[base] = 0;
        k = 1;
        acc = 0.0f;
    } else {
        unsigned prev_key = 0, prev_j = NONE;
        while (k < limit) {
            unsigned best_key = 0, best_j = NONE;
            float best_v = 0.0f;
            for (unsigned j = lane; j < e; j += 32) {
                float v = probs[base + j];
                unsigned key = order_key(v);
                if (prev_j != NONE && !before(prev_key, prev_j, key, j)) continue;
                if (best_j == NONE || before(key, j, best_key, best_j)) {
                    best_key = key;
                    best_j = j;
                    best_v = v;
                }
            }
            warp_best(best_key, best_j, best_v);
            if (best_j == NONE) break;
            if (lane == 0) experts_out[base + k] = (int)best_j;
            k += 1;
            acc += best_v;
            prev_key = best_key;
            prev_j = best_j;
            if (use_p && acc >= p) break;
        }
    }
    __syncwarp();
    // The mass of the selected set, summed in rank order (acc, for a finite row).
    float mass = finite ? acc : probs[base];
    for (unsigned s = lane; s < e; s += 32) {
        if (s < k) {
            float ps = probs[base + (unsigned)experts_out[base + s]];
            weights_out[base + s] = mass > 0.0f ? ps / mass : 1.0f / (float)k;
        } else {
            experts_out[base + s] = -1;
            weights_out[base + s] = 0.0f;
        }
    }
    if (lane == 0) counts_out[t] = (int)k;
}

// The kernels' scalars, one struct passed by value (as GroupedDims in grouped_matmul.cu):
// `k` is Top-k's k, or Top-p's cap (0: none).
struct SelectDims {
    unsigned tokens, experts, k;
};

extern "C" __global__ void top_p(const float* __restrict__ probs,
                                 const float* __restrict__ threshold,
                                 int* __restrict__ experts_out, float* __restrict__ weights_out,
                                 int* __restrict__ counts_out, unsigned* __restrict__ status,
                                 const SelectDims d) {
    unsigned tokens = d.tokens, experts = d.experts, k_max = d.k;
    unsigned t = blockIdx.x * WARPS + threadIdx.x / 32;
    if (t >= tokens) return;
    unsigned limit = k_max > 0 ? min(experts, k_max) : experts;
    select_row(probs, experts_out, weights_out, counts_out, status, t, experts, limit,
               threshold[0], true);
}

extern "C" __global__ void top_k(const float* __restrict__ probs,
                                 int* __restrict__ experts_out, float* __restrict__ weights_out,
                                 int* __restrict__ counts_out, unsigned* __restrict__ status,
                                 const SelectDims d) {
    unsigned tokens = d.tokens, experts = d.experts, k = d.k;
    unsigned t = blockIdx.x * WARPS + threadIdx.x / 32;
    if (t >= tokens) return;
    select_row(probs, experts_out, weights_out, counts_out, status, t, experts, k, 0.0f,
               false);
}
