// Row moves of a MoE layer in training, on burn-cuda's own buffers (as rows.wgsl):
// dispatch (a gather of token rows into route order), combine (the weighted sum of each
// token's routes) and both their gradients, with gathers only.
//
//   gather_rows:       out[m, d] = src[index[m], d], 0 where index[m] is outside
//                      0..sources. Dispatch forward, and the gradient of combine's rows.
//   sum_rows[_weighted]: out[r, d] = sum over s of w[m] * values[m, d], m = rows[r, s],
//                      in slot order, skipping m outside 0..sources (padding); w = 1 in
//                      sum_rows. Combine forward, and the gradient of dispatch through the
//                      plan's inverse: no atomics, a fixed order (deterministic).
//   row_dots:          out[m] = sum over d of a[m, d] * b[m, d]. The gradient of
//                      combine's weights.
//
// gather_rows and sum_rows: one thread per output element, blocks of 256 on a 1-D grid,
// so consecutive threads read consecutive floats of a row (coalesced); the slot sums run
// in rows.wgsl's order. row_dots: one warp per row (WARPS rows per block), lanes striding
// the row and a shuffle sum, because a thread per row (rows.wgsl's mapping, fine on
// lavapipe) would have a warp read 32 rows at once, one float from each.

#include "common.cuh"

struct RowDims {
    // Output rows.
    unsigned rows;
    // Width D.
    unsigned hidden;
    // Rows of the source (gather_rows) or of the values (sum_rows).
    unsigned sources;
    // Slots per output row (sum_rows).
    unsigned slots;
};

__device__ __forceinline__ unsigned long long element() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

extern "C" __global__ void __launch_bounds__(256)
    gather_rows(const float* __restrict__ src, const int* __restrict__ index,
                float* __restrict__ out, const RowDims d) {
    unsigned long long idx = element();
    if (idx >= (unsigned long long)d.rows * d.hidden) return;
    unsigned long long m = idx / d.hidden;
    unsigned c = (unsigned)(idx % d.hidden);
    int source = index[m];
    out[idx] = (source >= 0 && (unsigned)source < d.sources)
                   ? src[(unsigned long long)source * d.hidden + c]
                   : 0.0f;
}

template <bool WEIGHTED>
__device__ __forceinline__ void sum_rows_at(const float* __restrict__ values,
                                            const float* __restrict__ weights,
                                            const int* __restrict__ rows_of,
                                            float* __restrict__ out, const RowDims& d) {
    unsigned long long idx = element();
    if (idx >= (unsigned long long)d.rows * d.hidden) return;
    unsigned long long r = idx / d.hidden;
    unsigned c = (unsigned)(idx % d.hidden);
    float acc = 0.0f;
    for (unsigned s = 0; s < d.slots; ++s) {
        int m = rows_of[r * d.slots + s];
        if (m < 0 || (unsigned)m >= d.sources) continue;
        float term = values[(unsigned long long)m * d.hidden + c];
        if (WEIGHTED) term = weights[m] * term;
        acc += term;
    }
    out[idx] = acc;
}

extern "C" __global__ void __launch_bounds__(256)
    sum_rows(const float* __restrict__ values, const int* __restrict__ rows_of,
             float* __restrict__ out, const RowDims d) {
    sum_rows_at<false>(values, nullptr, rows_of, out, d);
}

extern "C" __global__ void __launch_bounds__(256)
    sum_rows_weighted(const float* __restrict__ values, const float* __restrict__ weights,
                      const int* __restrict__ rows_of, float* __restrict__ out,
                      const RowDims d) {
    sum_rows_at<true>(values, weights, rows_of, out, d);
}

extern "C" __global__ void __launch_bounds__(256)
    row_dots(const float* __restrict__ lhs, const float* __restrict__ rhs,
             float* __restrict__ out, const RowDims d) {
    unsigned long long m = (unsigned long long)blockIdx.x * WARPS + threadIdx.x / 32;
    unsigned lane = threadIdx.x % 32;
    if (m >= d.rows) return;
    const float* a = lhs + m * d.hidden;
    const float* b = rhs + m * d.hidden;
    float acc = 0.0f;
    for (unsigned c = lane; c < d.hidden; c += 32) acc += a[c] * b[c];
    acc = warp_sum(acc);
    if (lane == 0) out[m] = acc;
}
