// Gather and combine around the experts' FFNs.
//
//   gather:  out[m, d] = x[route_tokens[m], d] for m < M = expert_offsets[E] (M read on
//            the device, so the host never waits for it); rows m >= M are zeroed.
//   combine: out[i, d] = sum over slots s of route_weights[m] * y[m, d],
//            m = token_routes[i, s], in slot order: a per-token gather-and-sum, so no
//            float atomics are needed.
//
// Thread mapping: one thread per output element (2-D grid of workgroups). Memory
// traffic: gather reads and writes C*D floats; combine reads k_i rows of y per token
// (the same M*D floats in total) and writes N*D.

struct MoveParams {
    rows: u32,
    hidden: u32,
    experts: u32,
    _pad0: u32,
}

override WG: u32 = 64u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: MoveParams;
@group(0) @binding(1) var<storage, read_write> route_tokens: array<i32>;
@group(0) @binding(2) var<storage, read_write> expert_offsets: array<i32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> gathered: array<f32>;
@group(0) @binding(5) var<storage, read_write> token_routes: array<i32>;
@group(0) @binding(6) var<storage, read_write> route_weights: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;
@group(0) @binding(8) var<storage, read_write> combined: array<f32>;

fn element_of(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

@compute @workgroup_size(WG)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_of(gid, nwg);
    let h = params.hidden;
    if (idx >= params.rows * h) {
        return;
    }
    let m = idx / h;
    let routes = u32(expert_offsets[params.experts]);
    if (m < routes) {
        gathered[idx] = x[u32(route_tokens[m]) * h + idx % h];
    } else {
        gathered[idx] = 0.0;
    }
}

@compute @workgroup_size(WG)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = element_of(gid, nwg);
    let h = params.hidden;
    if (idx >= params.rows * h) {
        return;
    }
    let i = idx / h;
    let d = idx % h;
    var acc = 0.0;
    for (var s = 0u; s < params.experts; s++) {
        let m = token_routes[i * params.experts + s];
        if (m < 0) {
            break;
        }
        acc += route_weights[u32(m)] * y[u32(m) * h + d];
    }
    combined[idx] = acc;
}
