// Fused routing: DRN (or plain softmax) and Top-p / Top-k selection of a token in one
// pass, one warp per token, the token's row held in registers (R values per lane, so
// E <= 32 R).
//
// The two-kernel path is drn_forward (reads the E logits, writes E probabilities) then
// top_p (reads the probabilities back, from DRAM once N E outgrows L2, and scans them k
// times). Here the logits are read once; statistics, softmax and all k selection rounds
// run on registers; the probabilities are written once (the backward pass and the caller
// need them). Per token: 4E bytes read, 12E + 4 written, one launch instead of two. The
// arithmetic is drn_forward's and select_row's operation for operation (the same strided
// partial sums and shuffle trees), so both paths give the same bits.
//
// drn_select_r{1,2,4,8} serve E <= 32, 64, 128, 256; the host takes the two-kernel path
// above that (more than 8 values per lane would spill registers to local memory).
// logit_status gets the first non-finite logit (drn_forward's report), prob_status the
// first non-finite probability (top_p's: a finite row can overflow under a huge theta).

#include "common.cuh"

template <int R>
__device__ __forceinline__ void drn_select_row(
    const float* __restrict__ logits, const float* __restrict__ threshold,
    float* __restrict__ probs, int* experts_out, float* weights_out,
    int* __restrict__ counts_out, unsigned* logit_status, unsigned* prob_status, unsigned t,
    unsigned e, float theta, int use_drn, float eps, unsigned limit, int use_p) {
    unsigned lane = threadIdx.x % 32;
    unsigned base = t * e;
    float v[R];
    unsigned key[R];

    // DRN statistics (drn.cu's row_stats on registers).
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < R; r++) {
        unsigned j = lane + 32u * r;
        v[r] = 0.0f;
        if (j < e) {
            v[r] = logits[base + j];
            if (!is_finite_bits(v[r])) atomicMin(logit_status, base + j);
            s += v[r];
        }
    }
    float mu = 0.0f, sigma = 1.0f;
    if (use_drn) {
        mu = warp_sum(s) / (float)e;
        float q = 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (lane + 32u * r < e) {
                float d = v[r] - mu;
                q += d * d;
            }
        }
        sigma = sqrtf(warp_sum(q) / (float)e + eps);
    }

    // Softmax of theta (z - mu) / sigma (drn_forward).
    float scale = use_drn ? theta / sigma : 1.0f;
    float zmax = -3.4e38f;
#pragma unroll
    for (int r = 0; r < R; r++)
        if (lane + 32u * r < e) zmax = fmaxf(zmax, scale * (v[r] - mu));
    zmax = warp_max(zmax);
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (lane + 32u * r < e) {
            v[r] = expf(scale * (v[r] - mu) - zmax);
            total += v[r];
        }
    }
    float inv = 1.0f / warp_sum(total);
    unsigned bad = NONE;
#pragma unroll
    for (int r = 0; r < R; r++) {
        unsigned j = lane + 32u * r;
        key[r] = 0u;
        if (j < e) {
            v[r] *= inv;
            probs[base + j] = v[r];
            key[r] = order_key(v[r]);
            if (bad == NONE && !is_finite_bits(v[r])) bad = base + j;
        }
    }
    float first = __shfl_sync(FULL, v[0], 0);

    // Selection (select.cu's select_row on registers): the picks' probabilities are
    // parked in weights_out and normalised once the mass is known.
    bool finite = __all_sync(FULL, bad == NONE);
    if (bad != NONE) atomicMin(prob_status, bad);
    unsigned k = 0;
    float acc = 0.0f;
    if (!finite) {
        if (lane == 0) {
            experts_out[base] = 0;
            weights_out[base] = first;
        }
        k = 1;
    } else {
        float p = use_p ? threshold[0] : 0.0f;
        unsigned prev_key = 0, prev_j = NONE;
        while (k < limit) {
            unsigned best_key = 0, best_j = NONE;
            float best_v = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++) {
                unsigned j = lane + 32u * r;
                if (j < e && (prev_j == NONE || before(prev_key, prev_j, key[r], j)) &&
                    (best_j == NONE || before(key[r], j, best_key, best_j))) {
                    best_key = key[r];
                    best_j = j;
                    best_v = v[r];
                }
            }
            warp_best(best_key, best_j, best_v);
            if (best_j == NONE) break;
            if (lane == 0) {
                experts_out[base + k] = (int)best_j;
                weights_out[base + k] = best_v;
            }
            k += 1;
            acc += best_v;
            prev_key = best_key;
            prev_j = best_j;
            if (use_p && acc >= p) break;
        }
    }
    // Lane 0's writes above become visible to the whole warp.
    __syncwarp();
    float mass = finite ? acc : first;
    for (unsigned slot = lane; slot < e; slot += 32) {
        if (slot < k) {
            float ps = weights_out[base + slot];
            weights_out[base + slot] = mass > 0.0f ? ps / mass : 1.0f / (float)k;
        } else {
            experts_out[base + slot] = -1;
            weights_out[base + slot] = 0.0f;
        }
    }
    if (lane == 0) counts_out[t] = (int)k;
}

// One entry point per register width R. `limit`: k_max (or E) for Top-p, k for Top-k;
// `threshold[0]` is p and is read only when use_p is set.
#define DRN_SELECT_KERNEL(R)                                                                 \
    extern "C" __global__ void drn_select_r##R(                                              \
        const float* __restrict__ logits, const float* __restrict__ threshold,               \
        float* __restrict__ probs, int* experts_out, float* weights_out,                     \
        int* __restrict__ counts_out, unsigned* logit_status, unsigned* prob_status,         \
        unsigned tokens, unsigned experts, float theta, int use_drn, float eps,              \
        unsigned limit, int use_p) {                                                         \
        unsigned t = blockIdx.x * WARPS + threadIdx.x / 32;                                  \
        if (t >= tokens) return;                                                             \
        drn_select_row<R>(logits, threshold, probs, experts_out, weights_out, counts_out,    \
                          logit_status, prob_status, t, experts, theta, use_drn, eps, limit, \
                          use_p);                                                            \
    }

DRN_SELECT_KERNEL(1)
DRN_SELECT_KERNEL(2)
DRN_SELECT_KERNEL(4)
DRN_SELECT_KERNEL(8)
