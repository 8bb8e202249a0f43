// The experts' grouped matrix products of a dropless MoE layer, with the experts'
// row offsets read on the device: no host read, no padding computed, no redo.
//
//   grouped_forward:     y[m, :] = x[m, :] · W_e for the rows m in offsets[e]..offsets[e+1]
//                        of every expert e; W is [E, inner, cols], or [E, cols, inner]
//                        read transposed (`transposed` = 1: dX = dY · W_eᵀ). Rows from
//                        offsets[E] to `rows` are written as zeros: the caller sizes the
//                        buffers from a bound on the routes, and the rows past the routes
//                        must read as empty downstream.
//   grouped_weight_grad: dW_e = x_eᵀ · g_e, [E, inner, cols]; zeros for an expert
//                        without rows.
//
// Grid: the routes are only known on the device, so the host launches for a bound. With
// `TILE_M` rows per tile, the experts need sum_e ceil(count_e / TILE_M) row tiles, at most
// ceil(rows / TILE_M) + E; each workgroup finds its (expert, tile) by walking the offsets,
// and a workgroup past the last expert's tiles zeroes the rows past the routes instead
// (the spare ones cover them: see `grouped_forward`). Tiles never straddle two experts,
// so every tile is one plain tiled product over shared memory.
//
// Each thread keeps a 4 x 4 block of outputs in registers (four vec4s); each output is summed
// in one thread in a fixed order, so results are deterministic. The K loops run
// inner / TILE_K (forward) or rows_e / TILE_K (weight gradient) times: within lavapipe's
// 65,535 iterations up to a million rows per expert.

struct GroupedParams {
    // Rows of x and y: the bound the host sized them by (offsets are clamped to it).
    rows: u32,
    // The reduced dimension of the forward product (D for gate/up, F for down).
    inner: u32,
    // Output columns.
    cols: u32,
    experts: u32,
    // 1 when w is [E, cols, inner] and read transposed.
    transposed: u32,
    // Workgroup tiles across the columns.
    col_tiles: u32,
    // Workgroup tiles across `inner` (weight gradient).
    inner_tiles: u32,
    _pad: u32,
}

override TILE_M: u32 = 32u;
override TILE_N: u32 = 32u;
override TILE_K: u32 = 16u;
// Threads per workgroup: the host sets it to (TILE_M / MICRO) * (TILE_N / MICRO).
override WG: u32 = 64u;
const MICRO: u32 = 4u;

@group(0) @binding(0) var<uniform> params: GroupedParams;
// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(1) var<storage, read_write> offsets: array<i32>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> g: array<f32>;
@group(0) @binding(6) var<storage, read_write> dw: array<f32>;

// Tiles of vec4s along the output's rows (a) and columns (b): element (m, k) of a at
// a_tile[k * TILE_M / 4 + m / 4][m % 4], element (k, n) of b at b_tile[k * TILE_N / 4 + n / 4][n % 4],
// so a thread's 4 x 4 block takes one vec4 of each per k (a quarter of the scalar loads;
// lavapipe turns each per-lane shared load into a gather).
var<workgroup> a_tile: array<vec4<f32>, TILE_M * TILE_K / 4u>;
var<workgroup> b_tile: array<vec4<f32>, TILE_K * TILE_N / 4u>;
// The workgroup's job, found by one thread and shared: uniform control flow needs it
// loaded through workgroupUniformLoad.
var<workgroup> job_expert: u32;
var<workgroup> job_start: u32;
var<workgroup> job_end: u32;

// offsets[e] within 0..rows: a bound smaller than the routes (a micro-batch the trainer
// will redo) must not read or write past the buffers.
fn offset_at(e: u32) -> u32 {
    return min(u32(max(offsets[e], 0)), params.rows);
}

fn set_a(m: u32, k: u32, v: f32) {
    a_tile[k * (TILE_M / MICRO) + m / MICRO][m % MICRO] = v;
}

fn set_b(k: u32, n: u32, v: f32) {
    b_tile[k * (TILE_N / MICRO) + n / MICRO][n % MICRO] = v;
}

// acc[i] += a[row ty * 4 + i] * b[cols tx * 4 ..], over one K tile.
fn multiply_tile(tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 4>>) {
    for (var k = 0u; k < TILE_K; k++) {
        let a = a_tile[k * (TILE_M / MICRO) + ty];
        let b = b_tile[k * (TILE_N / MICRO) + tx];
        (*acc)[0] = fma(vec4<f32>(a.x), b, (*acc)[0]);
        (*acc)[1] = fma(vec4<f32>(a.y), b, (*acc)[1]);
        (*acc)[2] = fma(vec4<f32>(a.z), b, (*acc)[2]);
        (*acc)[3] = fma(vec4<f32>(a.w), b, (*acc)[3]);
    }
}

@compute @workgroup_size(WG)
fn grouped_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.y * nwg.x + wid.x;
    let col_tile = linear % params.col_tiles;
    let slot = linear / params.col_tiles;
    if (lid == 0u) {
        // Walk the experts' tiles to the one numbered `slot`.
        var first = 0u;
        var start = offset_at(0u);
        var found = false;
        for (var e = 0u; e < params.experts; e++) {
            let end = max(offset_at(e + 1u), start);
            let tiles = (end - start + TILE_M - 1u) / TILE_M;
            if (slot < first + tiles) {
                job_expert = e;
                job_start = start + (slot - first) * TILE_M;
                job_end = end;
                found = true;
                break;
            }
            first += tiles;
            start = end;
        }
        if (!found) {
            // Past the experts' tiles: zero rows from the routes' end. With at most
            // T <= routes / TILE_M + E (TILE_M - 1) / TILE_M tiles used of
            // ceil(rows / TILE_M) + E launched, the spare ones reach `rows`.
            job_expert = params.experts;
            job_start = min(start + (slot - first) * TILE_M, params.rows);
            job_end = params.rows;
        }
    }
    let expert = workgroupUniformLoad(&job_expert);
    let start = workgroupUniformLoad(&job_start);
    let end = min(workgroupUniformLoad(&job_end), start + TILE_M);
    if (start >= end) {
        return;
    }
    let col0 = col_tile * TILE_N;
    let tx = lid % (TILE_N / MICRO);
    let ty = lid / (TILE_N / MICRO);
    var acc: array<vec4<f32>, 4>;
    if (expert < params.experts) {
        let inner = params.inner;
        let cols = params.cols;
        let w_base = expert * inner * cols;
        for (var k0 = 0u; k0 < inner; k0 += TILE_K) {
            for (var i = lid; i < TILE_M * TILE_K; i += WG) {
                let row = start + i / TILE_K;
                let k = k0 + i % TILE_K;
                var v = 0.0;
                if (row < end && k < inner) {
                    v = x[row * inner + k];
                }
                set_a(i / TILE_K, i % TILE_K, v);
            }
            for (var i = lid; i < TILE_K * TILE_N; i += WG) {
                var v = 0.0;
                if (params.transposed == 1u) {
                    // Consecutive threads walk w's contiguous dimension (inner).
                    let k = i % TILE_K;
                    let c = i / TILE_K;
                    if (k0 + k < inner && col0 + c < cols) {
                        v = w[w_base + (col0 + c) * inner + k0 + k];
                    }
                    set_b(k, c, v);
                } else {
                    let k = i / TILE_N;
                    let c = i % TILE_N;
                    if (k0 + k < inner && col0 + c < cols) {
                        v = w[w_base + (k0 + k) * cols + col0 + c];
                    }
                    set_b(k, c, v);
                }
            }
            workgroupBarrier();
            multiply_tile(tx, ty, &acc);
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < MICRO; i++) {
        let row = start + ty * MICRO + i;
        for (var j = 0u; j < MICRO; j++) {
            let col = col0 + tx * MICRO + j;
            if (row < end && col < params.cols) {
                y[row * params.cols + col] = acc[i][j];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn grouped_weight_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let linear = wid.y * nwg.x + wid.x;
    let per_expert = params.inner_tiles * params.col_tiles;
    let expert = linear / per_expert;
    if (expert >= params.experts) {
        return;
    }
    let k0 = (linear % per_expert) / params.col_tiles * TILE_M;
    let col0 = linear % params.col_tiles * TILE_N;
    if (lid == 0u) {
        job_start = offset_at(expert);
        job_end = max(offset_at(expert + 1u), job_start);
    }
    let start = workgroupUniformLoad(&job_start);
    let end = workgroupUniformLoad(&job_end);
    let tx = lid % (TILE_N / MICRO);
    let ty = lid / (TILE_N / MICRO);
    let inner = params.inner;
    let cols = params.cols;
    var acc: array<vec4<f32>, 4>;
    for (var r0 = start; r0 < end; r0 += TILE_K) {
        // a_tile[m, r] = x[r0 + r, k0 + m]: consecutive threads read consecutive m.
        for (var i = lid; i < TILE_M * TILE_K; i += WG) {
            let m = i % TILE_M;
            let r = i / TILE_M;
            var v = 0.0;
            if (r0 + r < end && k0 + m < inner) {
                v = x[(r0 + r) * inner + k0 + m];
            }
            set_a(m, r, v);
        }
        for (var i = lid; i < TILE_K * TILE_N; i += WG) {
            let r = i / TILE_N;
            let c = i % TILE_N;
            var v = 0.0;
            if (r0 + r < end && col0 + c < cols) {
                v = g[(r0 + r) * cols + col0 + c];
            }
            set_b(r, c, v);
        }
        workgroupBarrier();
        multiply_tile(tx, ty, &acc);
        workgroupBarrier();
    }
    let base = expert * inner * cols;
    for (var i = 0u; i < MICRO; i++) {
        let k = k0 + ty * MICRO + i;
        for (var j = 0u; j < MICRO; j++) {
            let col = col0 + tx * MICRO + j;
            if (k < inner && col < cols) {
                dw[base + k * cols + col] = acc[i][j];
            }
        }
    }
}
