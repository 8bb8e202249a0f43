// The dispatch plan: a stable counting sort of the selected (token, expert) pairs by
// expert, in three passes over chunks of `chunk` consecutive tokens (as dispatch.wgsl).
//
//   plan_count:   one thread per chunk counts its tokens' routes per expert into its own
//                 row of chunk_offsets [num_chunks, E] (rows are private: no atomics).
//   plan_scan:    one block; thread e scans column e over the chunks (exclusive), giving
//                 expert_counts[e]; thread 0 scans the counts into expert_offsets [E + 1];
//                 then every column is shifted by its expert's offset, so
//                 chunk_offsets[c, e] is where chunk c's first route to e goes.
//   plan_scatter: one thread per chunk walks its tokens in ascending order and appends
//                 each route at its expert's cursor: routes come out ordered by expert,
//                 then by token id, exactly as the CPU reference orders them.
// Memory traffic: the [N, E] selection is read twice, the [num_chunks, E] table three
// times, the route arrays written once.

// The kernels' scalars, one struct passed by value (as GroupedDims in grouped_matmul.cu):
// plan_scan reads `experts` and `num_chunks` only.
struct PlanDims {
    unsigned tokens, experts, chunk, num_chunks;
};

__device__ __forceinline__ unsigned count_of(const int* sel_counts, unsigned t, unsigned e) {
    int c = sel_counts[t];
    return (unsigned)(c < 0 ? 0 : (c > (int)e ? (int)e : c));
}

extern "C" __global__ void plan_count(const int* __restrict__ sel_experts,
                                      const int* __restrict__ sel_counts,
                                      unsigned* __restrict__ chunk_offsets,
                                      const PlanDims d) {
    unsigned tokens = d.tokens, experts = d.experts, chunk = d.chunk;
    unsigned num_chunks = d.num_chunks;
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= num_chunks) return;
    unsigned row = c * experts;
    for (unsigned j = 0; j < experts; j++) chunk_offsets[row + j] = 0;
    unsigned end = min((c + 1) * chunk, tokens);
    for (unsigned t = c * chunk; t < end; t++) {
        unsigned k = count_of(sel_counts, t, experts);
        for (unsigned s = 0; s < k; s++) {
            unsigned x = (unsigned)sel_experts[t * experts + s];
            if (x < experts) chunk_offsets[row + x] += 1;
        }
    }
}

extern "C" __global__ void plan_scan(unsigned* __restrict__ chunk_offsets,
                                     int* __restrict__ expert_counts,
                                     int* __restrict__ expert_offsets, const PlanDims d) {
    unsigned experts = d.experts, num_chunks = d.num_chunks;
    for (unsigned j = threadIdx.x; j < experts; j += blockDim.x) {
        unsigned running = 0;
        for (unsigned c = 0; c < num_chunks; c++) {
            unsigned v = chunk_offsets[c * experts + j];
            chunk_offsets[c * experts + j] = running;
            running += v;
        }
        expert_counts[j] = (int)running;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        expert_offsets[0] = 0;
        for (unsigned j = 0; j < experts; j++) {
            acc += expert_counts[j];
            expert_offsets[j + 1] = acc;
        }
    }
    __syncthreads();
    for (unsigned j = threadIdx.x; j < experts; j += blockDim.x) {
        unsigned start = (unsigned)expert_offsets[j];
        for (unsigned c = 0; c < num_chunks; c++) chunk_offsets[c * experts + j] += start;
    }
}

extern "C" __global__ void plan_scatter(const int* __restrict__ sel_experts,
                                        const float* __restrict__ sel_weights,
                                        const int* __restrict__ sel_counts,
                                        unsigned* __restrict__ chunk_offsets,
                                        int* __restrict__ route_tokens,
                                        float* __restrict__ route_weights,
                                        int* __restrict__ token_routes, const PlanDims d) {
    unsigned tokens = d.tokens, experts = d.experts, chunk = d.chunk;
    unsigned num_chunks = d.num_chunks;
    unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= num_chunks) return;
    unsigned row = c * experts;
    unsigned end = min((c + 1) * chunk, tokens);
    for (unsigned t = c * chunk; t < end; t++) {
        unsigned k = count_of(sel_counts, t, experts);
        for (unsigned s = 0; s < experts; s++) {
            unsigned x = (unsigned)sel_experts[t * experts + s];
            if (s < k && x < experts) {
                unsigned m = chunk_offsets[row + x];
                chunk_offsets[row + x] = m + 1;
                route_tokens[m] = (int)t;
                route_weights[m] = sel_weights[t * experts + s];
                token_routes[t * experts + s] = (int)m;
            } else {
                token_routes[t * experts + s] = -1;
            }
        }
    }
}
