// The dispatch plan: a stable counting sort of the selected (token, expert) pairs by
// expert, in three passes over chunks of CHUNK consecutive tokens.
//
//   plan_count:   one thread per chunk counts its tokens' routes per expert into its own
//                 row of chunk_offsets [num_chunks, E] (no atomics: rows are private).
//   plan_scan:    one workgroup; thread e scans column e over the chunks (exclusive),
//                 giving expert_counts[e]; thread 0 scans the counts into
//                 expert_offsets [E + 1]; then every column is shifted by its expert's
//                 offset, so chunk_offsets[c, e] is where chunk c's first route to e goes.
//   plan_scatter: one thread per chunk walks its tokens in ascending order and appends
//                 each route at its expert's cursor: routes come out ordered by expert,
//                 then by token id, exactly as the CPU reference orders them.
// Memory traffic: the [N, E] selection is read twice (count, scatter); the
// [num_chunks, E] table three times; the route arrays are written once.

struct PlanParams {
    tokens: u32,
    experts: u32,
    chunk: u32,
    num_chunks: u32,
}

override WG: u32 = 64u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: PlanParams;
@group(0) @binding(1) var<storage, read_write> sel_experts: array<i32>;
@group(0) @binding(2) var<storage, read_write> sel_weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> sel_counts: array<i32>;
@group(0) @binding(4) var<storage, read_write> chunk_offsets: array<u32>;
@group(0) @binding(5) var<storage, read_write> expert_counts: array<i32>;
@group(0) @binding(6) var<storage, read_write> expert_offsets: array<i32>;
@group(0) @binding(7) var<storage, read_write> route_tokens: array<i32>;
@group(0) @binding(8) var<storage, read_write> route_weights: array<f32>;
@group(0) @binding(9) var<storage, read_write> token_routes: array<i32>;

fn chunk_of(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Selected experts of token t (its count, clamped into 0..=E so a malformed selection
// cannot write out of bounds).
fn count_of(t: u32) -> u32 {
    return u32(clamp(sel_counts[t], 0, i32(params.experts)));
}

@compute @workgroup_size(WG)
fn plan_count(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = chunk_of(gid, nwg);
    if (c >= params.num_chunks) {
        return;
    }
    let e = params.experts;
    let row = c * e;
    for (var j = 0u; j < e; j++) {
        chunk_offsets[row + j] = 0u;
    }
    let end = min((c + 1u) * params.chunk, params.tokens);
    for (var t = c * params.chunk; t < end; t++) {
        for (var s = 0u; s < count_of(t); s++) {
            let x = u32(sel_experts[t * e + s]);
            if (x < e) {
                chunk_offsets[row + x] += 1u;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn plan_scan(@builtin(local_invocation_index) lid: u32) {
    let e = params.experts;
    for (var j = lid; j < e; j += WG) {
        var running = 0u;
        for (var c = 0u; c < params.num_chunks; c++) {
            let v = chunk_offsets[c * e + j];
            chunk_offsets[c * e + j] = running;
            running += v;
        }
        expert_counts[j] = i32(running);
    }
    storageBarrier();
    if (lid == 0u) {
        var acc = 0;
        expert_offsets[0] = 0;
        for (var j = 0u; j < e; j++) {
            acc += expert_counts[j];
            expert_offsets[j + 1u] = acc;
        }
    }
    storageBarrier();
    for (var j = lid; j < e; j += WG) {
        let start = u32(expert_offsets[j]);
        for (var c = 0u; c < params.num_chunks; c++) {
            chunk_offsets[c * e + j] += start;
        }
    }
}

@compute @workgroup_size(WG)
fn plan_scatter(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = chunk_of(gid, nwg);
    if (c >= params.num_chunks) {
        return;
    }
    let e = params.experts;
    let row = c * e;
    let end = min((c + 1u) * params.chunk, params.tokens);
    for (var t = c * params.chunk; t < end; t++) {
        let k = count_of(t);
        for (var s = 0u; s < e; s++) {
            let x = u32(sel_experts[t * e + s]);
            if (s < k && x < e) {
                let m = chunk_offsets[row + x];
                chunk_offsets[row + x] = m + 1u;
                route_tokens[m] = i32(t);
                route_weights[m] = sel_weights[t * e + s];
                token_routes[t * e + s] = i32(m);
            } else {
                token_routes[t * e + s] = -1;
            }
        }
    }
}
