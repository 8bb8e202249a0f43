// Gather and combine around the experts' FFNs (as gather_combine.wgsl).
//
//   gather:  out[m, d] = x[route_tokens[m], d] for m < M = expert_offsets[E] (M read on
//            the device, so the host never waits for it); rows m >= M are zeroed.
//   combine: out[i, d] = sum over slots s of route_weights[m] * y[m, d],
//            m = token_routes[i, s], in slot order: a per-token gather-and-sum, so no
//            float atomics and a deterministic result.
//
// Mapping: one thread per output element, consecutive threads on consecutive d, so the
// row reads and writes of a warp are coalesced. Memory traffic: gather reads and writes
// C*D floats; combine reads k_i rows of y per token (M*D floats in total), writes N*D.

extern "C" __global__ void gather(const int* __restrict__ route_tokens,
                                  const int* __restrict__ expert_offsets,
                                  const float* __restrict__ x, float* __restrict__ gathered,
                                  unsigned rows, unsigned hidden, unsigned experts) {
    unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned long long)rows * hidden) return;
    unsigned m = (unsigned)(idx / hidden);
    unsigned d = (unsigned)(idx % hidden);
    unsigned routes = (unsigned)expert_offsets[experts];
    gathered[idx] = m < routes
        ? x[(unsigned long long)(unsigned)route_tokens[m] * hidden + d]
        : 0.0f;
}

extern "C" __global__ void combine(const int* __restrict__ token_routes,
                                   const float* __restrict__ route_weights,
                                   const float* __restrict__ y, float* __restrict__ combined,
                                   unsigned rows, unsigned hidden, unsigned experts) {
    unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (unsigned long long)rows * hidden) return;
    unsigned i = (unsigned)(idx / hidden);
    unsigned d = (unsigned)(idx % hidden);
    float acc = 0.0f;
    for (unsigned s = 0; s < experts; s++) {
        int m = token_routes[i * experts + s];
        if (m < 0) break;
        acc += route_weights[m] * y[(unsigned long long)m * hidden + d];
    }
    combined[idx] = acc;
}
