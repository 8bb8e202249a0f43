// The experts' grouped matrix products with the row offsets read on the device (as
// grouped_matmul.wgsl): no host read, no padding computed.
//
//   grouped_forward_{f32,bf16,f16}: y[m, :] = x[m, :] . W_e for the rows m in
//       offsets[e]..offsets[e+1]; W is [E, inner, cols], or [E, cols, inner] read
//       transposed (transposed = 1: dX = dY . W_e^T). Rows from offsets[E] to `rows` are
//       written as zeros. Inputs and output are f32; the bf16/f16 kernels round the
//       operands to 16 bits as they stage them in shared memory and multiply on the tensor
//       cores (mma.sync m16n8k16, f32 accumulators), as a bf16 autocast would.
//   grouped_weight_grad_f32: dW_e = x_e^T . g_e, [E, inner, cols], zeros for an expert
//       without rows (f32 CUDA cores).
//
// Grid: blocks of 64 x 64 outputs. The host launches ceil(rows / 64) + E row tiles (a
// bound: each expert wastes less than one tile) times ceil(cols / 64) column tiles;
// blockIdx.y is the row tile. Thread 0 walks the offsets to find its (expert, tile); a
// block past the experts' tiles zeroes rows past the routes instead (the spare blocks
// cover them). Tiles never straddle two experts.
//
// No header is included (NVRTC compiles from memory): the bf16/f16 conversions and the
// MMA are inline PTX, sm_80 and newer. Accumulators are fixed-size arrays indexed only by
// unrolled constants, so they live in registers (tests/nvrtc.rs checks for `.local`).

#define TILE 64
#define SIMT_K 16
#define MMA_K 32

// The kernels' scalars in one struct passed by value: dtopp's cudarc launcher pushes it as
// one argument, and a launch through cubecl's client on burn-cuda's buffers passes it as
// the kernel's metadata block, which cubecl appends after the buffers (src/params.rs has
// the host's copy; `transposed` is not read by the weight gradient).
struct GroupedDims {
    unsigned rows, inner, cols, experts, transposed;
};

// offsets[e] within 0..rows (a bound smaller than the routes must not read or write past
// the buffers: the trainer redoes that micro-batch).
__device__ __forceinline__ unsigned offset_at(const int* offsets, unsigned e, unsigned rows) {
    int o = offsets[e];
    return o < 0 ? 0u : ((unsigned)o < rows ? (unsigned)o : rows);
}

// Finds the block's rows: expert (== experts when it zeroes), first row and end row.
__device__ __forceinline__ void find_job(const int* offsets, unsigned rows, unsigned experts,
                                         unsigned slot, unsigned* job) {
    if (threadIdx.x == 0) {
        unsigned first = 0, start = offset_at(offsets, 0, rows);
        job[0] = experts;
        job[1] = rows;
        job[2] = rows;
        bool found = false;
        for (unsigned e = 0; e < experts; e++) {
            unsigned end = offset_at(offsets, e + 1, rows);
            if (end < start) end = start;
            unsigned tiles = (end - start + TILE - 1) / TILE;
            if (slot < first + tiles) {
                job[0] = e;
                job[1] = start + (slot - first) * TILE;
                job[2] = end;
                found = true;
                break;
            }
            first += tiles;
            start = end;
        }
        if (!found) {
            unsigned long long zero_start =
                (unsigned long long)start + (unsigned long long)(slot - first) * TILE;
            job[1] = zero_start < rows ? (unsigned)zero_start : rows;
            job[2] = rows;
        }
    }
    __syncthreads();
}

// Zeroes rows start..end (at most one tile) of the block's column tile.
__device__ __forceinline__ void zero_rows(float* y, unsigned start, unsigned end, unsigned col0,
                                          unsigned cols) {
    for (unsigned i = threadIdx.x; i < TILE * TILE; i += blockDim.x) {
        unsigned row = start + i / TILE, col = col0 + i % TILE;
        if (row < end && col < cols) y[(unsigned long long)row * cols + col] = 0.0f;
    }
}

// ---- f32 on the CUDA cores: 256 threads, 4 x 4 outputs each -----------------------------

// acc += a[k][ty*4 + i] * b[k][tx*4 + j] over one SIMT_K slice.
__device__ __forceinline__ void simt_tile(const float (*a)[TILE + 4], const float (*b)[TILE + 4],
                                          unsigned tx, unsigned ty, float acc[4][4]) {
#pragma unroll
    for (unsigned k = 0; k < SIMT_K; k++) {
        float av[4], bv[4];
#pragma unroll
        for (unsigned i = 0; i < 4; i++) {
            av[i] = a[k][ty * 4 + i];
            bv[i] = b[k][tx * 4 + i];
        }
#pragma unroll
        for (unsigned i = 0; i < 4; i++)
#pragma unroll
            for (unsigned j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// A thread's 4 x 4 block into out[row0 + i, col0 + j] (row width `cols`), rows below
// `row_end` and columns below `cols` only.
__device__ __forceinline__ void store_block(float* out, unsigned row0, unsigned row_end,
                                            unsigned col0, unsigned cols, const float acc[4][4]) {
#pragma unroll
    for (unsigned i = 0; i < 4; i++) {
        unsigned row = row0 + i;
#pragma unroll
        for (unsigned j = 0; j < 4; j++) {
            unsigned col = col0 + j;
            if (row < row_end && col < cols) out[(unsigned long long)row * cols + col] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
grouped_forward_f32(const int* __restrict__ offsets, const float* __restrict__ x,
                    const float* __restrict__ w, float* __restrict__ y, const GroupedDims d) {
    unsigned rows = d.rows, inner = d.inner, cols = d.cols, experts = d.experts;
    unsigned transposed = d.transposed;
    __shared__ unsigned job[3];
    __shared__ float a[SIMT_K][TILE + 4];
    __shared__ float b[SIMT_K][TILE + 4];
    find_job(offsets, rows, experts, blockIdx.y, job);
    unsigned expert = job[0], start = job[1];
    unsigned end = job[2] < start + TILE ? job[2] : start + TILE;
    unsigned col0 = blockIdx.x * TILE;
    if (start >= end) return;
    if (expert >= experts) {
        zero_rows(y, start, end, col0, cols);
        return;
    }
    unsigned tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float* we = w + (unsigned long long)expert * inner * cols;
    float acc[4][4] = {};
    for (unsigned k0 = 0; k0 < inner; k0 += SIMT_K) {
        for (unsigned i = threadIdx.x; i < TILE * SIMT_K; i += blockDim.x) {
            // a[k][m] = x[start + m, k0 + k]: consecutive threads on consecutive k.
            unsigned m = i / SIMT_K, k = i % SIMT_K;
            unsigned row = start + m;
            a[k][m] = (row < end && k0 + k < inner) ? x[(unsigned long long)row * inner + k0 + k]
                                                     : 0.0f;
        }
        for (unsigned i = threadIdx.x; i < TILE * SIMT_K; i += blockDim.x) {
            float v = 0.0f;
            if (transposed) {
                unsigned k = i % SIMT_K, n = i / SIMT_K;
                if (k0 + k < inner && col0 + n < cols)
                    v = we[(unsigned long long)(col0 + n) * inner + k0 + k];
                b[k][n] = v;
            } else {
                unsigned k = i / TILE, n = i % TILE;
                if (k0 + k < inner && col0 + n < cols)
                    v = we[(unsigned long long)(k0 + k) * cols + col0 + n];
                b[k][n] = v;
            }
        }
        __syncthreads();
        simt_tile(a, b, tx, ty, acc);
        __syncthreads();
    }
    store_block(y, start + ty * 4, end, col0 + tx * 4, cols, acc);
}

extern "C" __global__ void __launch_bounds__(256)
grouped_weight_grad_f32(const int* __restrict__ offsets, const float* __restrict__ x,
                        const float* __restrict__ g, float* __restrict__ dw,
                        const GroupedDims d) {
    unsigned rows = d.rows, inner = d.inner, cols = d.cols;
    __shared__ float a[SIMT_K][TILE + 4];
    __shared__ float b[SIMT_K][TILE + 4];
    unsigned expert = blockIdx.z;
    unsigned k0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    unsigned start = offset_at(offsets, expert, rows);
    unsigned end = offset_at(offsets, expert + 1, rows);
    if (end < start) end = start;
    unsigned tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (unsigned r0 = start; r0 < end; r0 += SIMT_K) {
        for (unsigned i = threadIdx.x; i < TILE * SIMT_K; i += blockDim.x) {
            // a[r][m] = x[r0 + r, k0 + m], b[r][n] = g[r0 + r, col0 + n]: coalesced in m, n.
            unsigned r = i / TILE, m = i % TILE;
            bool live = r0 + r < end;
            a[r][m] = (live && k0 + m < inner) ? x[(unsigned long long)(r0 + r) * inner + k0 + m]
                                               : 0.0f;
            b[r][m] = (live && col0 + m < cols) ? g[(unsigned long long)(r0 + r) * cols + col0 + m]
                                                : 0.0f;
        }
        __syncthreads();
        simt_tile(a, b, tx, ty, acc);
        __syncthreads();
    }
    float* out = dw + (unsigned long long)expert * inner * cols;
    store_block(out, k0 + ty * 4, inner, col0 + tx * 4, cols, acc);
}

// ---- bf16 / f16 on the tensor cores: 4 warps of 32 x 32 outputs ------------------------

// Two f32 rounded to 16 bits and packed (lo in the low half), as the MMA operands want.
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned out;
    if (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
    }
    return out;
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2]) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// Shared tiles hold 16-bit pairs along k: a[m][k/2] (row-major A) and b[n][k/2] (B by
// columns, the `.col` operand), 16 pairs per row padded to 20 words so that the
// fragment loads of a warp (rows g = lane / 4, words t = lane % 4) hit 32 distinct banks.
#define PAIRS (MMA_K / 2)
#define PAIR_STRIDE (PAIRS + 4)

template <bool BF16>
__device__ __forceinline__ void grouped_forward_mma(const int* __restrict__ offsets,
                                                    const float* __restrict__ x,
                                                    const float* __restrict__ w,
                                                    float* __restrict__ y, unsigned rows,
                                                    unsigned inner, unsigned cols,
                                                    unsigned experts, unsigned transposed) {
    __shared__ unsigned job[3];
    __shared__ unsigned a[TILE][PAIR_STRIDE];
    __shared__ unsigned b[TILE][PAIR_STRIDE];
    find_job(offsets, rows, experts, blockIdx.y, job);
    unsigned expert = job[0], start = job[1];
    unsigned end = job[2] < start + TILE ? job[2] : start + TILE;
    unsigned col0 = blockIdx.x * TILE;
    if (start >= end) return;
    if (expert >= experts) {
        zero_rows(y, start, end, col0, cols);
        return;
    }
    const float* we = w + (unsigned long long)expert * inner * cols;
    unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    unsigned wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    unsigned gq = lane / 4, tq = lane % 4;
    float acc[2][4][4] = {};
    for (unsigned k0 = 0; k0 < inner; k0 += MMA_K) {
        for (unsigned i = threadIdx.x; i < TILE * PAIRS; i += blockDim.x) {
            unsigned m = i / PAIRS, p = i % PAIRS;
            unsigned row = start + m, k = k0 + 2 * p;
            float lo = 0.0f, hi = 0.0f;
            if (row < end) {
                const float* xr = x + (unsigned long long)row * inner;
                if (k < inner) lo = xr[k];
                if (k + 1 < inner) hi = xr[k + 1];
            }
            a[m][p] = pack2<BF16>(lo, hi);
        }
        for (unsigned i = threadIdx.x; i < TILE * PAIRS; i += blockDim.x) {
            float lo = 0.0f, hi = 0.0f;
            unsigned n, p;
            if (transposed) {
                // W_e^T: w[n][k], k contiguous.
                p = i % PAIRS;
                n = i / PAIRS;
                unsigned k = k0 + 2 * p;
                if (col0 + n < cols) {
                    const float* wr = we + (unsigned long long)(col0 + n) * inner;
                    if (k < inner) lo = wr[k];
                    if (k + 1 < inner) hi = wr[k + 1];
                }
            } else {
                // W_e: w[k][n], n contiguous.
                n = i % TILE;
                p = i / TILE;
                unsigned k = k0 + 2 * p;
                if (col0 + n < cols) {
                    if (k < inner) lo = we[(unsigned long long)k * cols + col0 + n];
                    if (k + 1 < inner) hi = we[(unsigned long long)(k + 1) * cols + col0 + n];
                }
            }
            b[n][p] = pack2<BF16>(lo, hi);
        }
        __syncthreads();
#pragma unroll
        for (unsigned ks = 0; ks < PAIRS; ks += 8) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (unsigned mi = 0; mi < 2; mi++) {
                unsigned r = wm + mi * 16 + gq;
                af[mi][0] = a[r][ks + tq];
                af[mi][1] = a[r + 8][ks + tq];
                af[mi][2] = a[r][ks + 4 + tq];
                af[mi][3] = a[r + 8][ks + 4 + tq];
            }
#pragma unroll
            for (unsigned ni = 0; ni < 4; ni++) {
                unsigned n = wn + ni * 8 + gq;
                bf[ni][0] = b[n][ks + tq];
                bf[ni][1] = b[n][ks + 4 + tq];
            }
#pragma unroll
            for (unsigned mi = 0; mi < 2; mi++)
#pragma unroll
                for (unsigned ni = 0; ni < 4; ni++) mma16816<BF16>(acc[mi][ni], af[mi], bf[ni]);
        }
        __syncthreads();
    }
#pragma unroll
    for (unsigned mi = 0; mi < 2; mi++) {
#pragma unroll
        for (unsigned half = 0; half < 2; half++) {
            unsigned row = start + wm + mi * 16 + gq + half * 8;
            if (row >= end) continue;
#pragma unroll
            for (unsigned ni = 0; ni < 4; ni++) {
#pragma unroll
                for (unsigned j = 0; j < 2; j++) {
                    unsigned col = col0 + wn + ni * 8 + tq * 2 + j;
                    if (col < cols)
                        y[(unsigned long long)row * cols + col] = acc[mi][ni][half * 2 + j];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
grouped_forward_bf16(const int* __restrict__ offsets, const float* __restrict__ x,
                     const float* __restrict__ w, float* __restrict__ y, const GroupedDims d) {
    grouped_forward_mma<true>(offsets, x, w, y, d.rows, d.inner, d.cols, d.experts, d.transposed);
}

extern "C" __global__ void __launch_bounds__(128)
grouped_forward_f16(const int* __restrict__ offsets, const float* __restrict__ x,
                    const float* __restrict__ w, float* __restrict__ y, const GroupedDims d) {
    grouped_forward_mma<false>(offsets, x, w, y, d.rows, d.inner, d.cols, d.experts, d.transposed);
}
