// Row moves of a MoE layer in training, on burn's own buffers: dispatch (a gather of
// token rows into route order), combine (the weighted sum of each token's routes) and
// both their gradients, with gathers only.
//
//   gather_rows: out[m, d] = src[index[m], d], 0 where index[m] is outside 0..sources.
//                Dispatch forward, and the gradient of combine's rows (the output
//                gradient at each route's token).
//   sum_rows:    out[r, d] = sum over s of w[m] * values[m, d], m = rows[r, s], in slot
//                order, skipping m outside 0..sources (padding); w = 1 when unweighted.
//                Combine forward, and the gradient of dispatch: each token's rows sum the
//                gradients of its routes through the plan's inverse, so no atomics and a
//                fixed order (deterministic).
//   row_dots:    out[m] = sum over d of a[m, d] * b[m, d], in order. The gradient of
//                combine's weights.
//
// One thread per output element (per row for row_dots), over a 2-D grid of workgroups.
// No loop is longer than the slots per row or the width D, well inside lavapipe's
// 65,535 iterations.

struct RowParams {
    // Output rows.
    rows: u32,
    // Width D.
    hidden: u32,
    // Rows of the source (gather_rows) or of the values (sum_rows).
    sources: u32,
    // Slots per output row (sum_rows).
    slots: u32,
    // 1 when sum_rows multiplies by w.
    weighted: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override WG: u32 = 64u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: RowParams;
@group(0) @binding(1) var<storage, read_write> index: array<i32>;
@group(0) @binding(2) var<storage, read_write> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> gathered: array<f32>;
@group(0) @binding(4) var<storage, read_write> rows_of: array<i32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;
@group(0) @binding(6) var<storage, read_write> values: array<f32>;
@group(0) @binding(7) var<storage, read_write> summed: array<f32>;
@group(0) @binding(8) var<storage, read_write> lhs: array<f32>;
@group(0) @binding(9) var<storage, read_write> rhs: array<f32>;
@group(0) @binding(10) var<storage, read_write> dots: array<f32>;

fn thread_of(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

@compute @workgroup_size(WG)
fn gather_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = thread_of(gid, nwg);
    let h = params.hidden;
    if (idx >= params.rows * h) {
        return;
    }
    let source = index[idx / h];
    if (source >= 0 && u32(source) < params.sources) {
        gathered[idx] = src[u32(source) * h + idx % h];
    } else {
        gathered[idx] = 0.0;
    }
}

@compute @workgroup_size(WG)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = thread_of(gid, nwg);
    let h = params.hidden;
    if (idx >= params.rows * h) {
        return;
    }
    let r = idx / h;
    let d = idx % h;
    var acc = 0.0;
    for (var s = 0u; s < params.slots; s++) {
        let m = rows_of[r * params.slots + s];
        if (m < 0 || u32(m) >= params.sources) {
            continue;
        }
        var term = values[u32(m) * h + d];
        if (params.weighted == 1u) {
            term = weights[u32(m)] * term;
        }
        acc += term;
    }
    summed[idx] = acc;
}

@compute @workgroup_size(WG)
fn row_dots(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let m = thread_of(gid, nwg);
    if (m >= params.rows) {
        return;
    }
    let h = params.hidden;
    var acc = 0.0;
    for (var d = 0u; d < h; d++) {
        acc += lhs[m * h + d] * rhs[m * h + d];
    }
    dots[m] = acc;
}
