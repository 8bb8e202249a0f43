// Top-p and Top-k expert selection with the CPU reference's rules.
//
// Experts rank by probability, descending, ties to the lower expert index. Per token:
//   top_p: k = smallest k whose rank-ordered prefix sum, added one by one in f32 exactly
//          as the CPU does, reaches p (>= p); E if rounding keeps it below; capped at
//          k_max (0: no cap). p is the first value of a device buffer, so a
//          device-resident controller feeds it without a host round trip.
//   top_k: k = params.k.
// Weights: P / (sum of the k selected P, added in rank order); padding slots hold expert
// -1 and weight 0.
//
// Thread mapping: one thread per token, WG tokens per workgroup (2-D grid). The thread
// extracts experts in rank order: each round scans the row for the next four experts
// ranked after the previous pick, so no sort buffer and no workgroup barrier are needed,
// and the prefix sum is the reference's, term for term. Cost O(k E / 4) per token: on
// lavapipe (N = 65536, E = 256, k <= 16) a workgroup-per-token bitonic sort in workgroup
// memory took 14.9 s per call (barriers), this mapping a small fraction of it.
// Memory traffic per token: E probabilities read k + 1 times (cached), 2E + 1 written.

struct SelectParams {
    tokens: u32,
    experts: u32,
    k: u32,
    k_max: u32,
}

override WG: u32 = 64u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: SelectParams;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> threshold: array<f32>;
@group(0) @binding(3) var<storage, read_write> experts_out: array<i32>;
@group(0) @binding(4) var<storage, read_write> weights_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> counts_out: array<i32>;
@group(0) @binding(6) var<storage, read_write> status: array<atomic<u32>>;

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn token_of(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Flags the first non-finite probability of the row; false if there is one.
fn row_is_finite(base: u32) -> bool {
    for (var j = 0u; j < params.experts; j++) {
        if (!is_finite(probs[base + j])) {
            atomicMin(&status[0], base + j);
            return false;
        }
    }
    return true;
}

// An integer key with the order of the float (-0 and +0 equal). Comparing keys rather
// than floats keeps subnormal probabilities distinct where the device flushes them to
// zero (lavapipe does), so the ranking equals the reference's exactly.
fn order_key(v: f32) -> u32 {
    var b = bitcast<u32>(v);
    if (b == 0x80000000u) {
        b = 0u;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

// Whether (ka, ja) ranks before (kb, jb): larger key first, lower index among equals.
fn before(ka: u32, ja: u32, kb: u32, jb: u32) -> bool {
    return ka > kb || (ka == kb && ja < jb);
}

// The next (up to) four experts in rank order after (prev_key, prev_j) (all experts
// qualify when prev_j < 0), best first; missing ones have index 0xffffffff. Four per
// scan rather than one: lavapipe stops an outermost loop after 65535 iterations of its
// body and nested loops together, and k scans of E experts reached that at E = 256,
// k = E; four per scan keeps every E <= 512 under it.
fn next_four(base: u32, prev_key: u32, prev_j: u32, first: bool) -> array<vec2<u32>, 4> {
    var c0 = vec2<u32>(0u, 0xffffffffu);
    var c1 = c0;
    var c2 = c0;
    var c3 = c0;
    for (var j = 0u; j < params.experts; j++) {
        let key = order_key(probs[base + j]);
        if (!first && !before(prev_key, prev_j, key, j)) {
            continue;
        }
        if (!before(key, j, c3.x, c3.y)) {
            continue;
        }
        let c = vec2<u32>(key, j);
        if (before(key, j, c2.x, c2.y)) {
            c3 = c2;
            if (before(key, j, c1.x, c1.y)) {
                c2 = c1;
                if (before(key, j, c0.x, c0.y)) {
                    c1 = c0;
                    c0 = c;
                } else {
                    c1 = c;
                }
            } else {
                c2 = c;
            }
        } else {
            c3 = c;
        }
    }
    return array<vec2<u32>, 4>(c0, c1, c2, c3);
}

// Writes the k experts picked into experts_out (already holding them in slots 0..k),
// their weights, the padding and the count.
fn finish(t: u32, base: u32, k: u32) {
    var mass = 0.0;
    for (var s = 0u; s < k; s++) {
        mass += probs[base + u32(experts_out[base + s])];
    }
    for (var s = 0u; s < params.experts; s++) {
        if (s < k) {
            let p = probs[base + u32(experts_out[base + s])];
            weights_out[base + s] = select(1.0 / f32(k), p / mass, mass > 0.0);
        } else {
            experts_out[base + s] = -1;
            weights_out[base + s] = 0.0;
        }
    }
    counts_out[t] = i32(k);
}

// Picks experts in rank order until `limit` are taken or (top_p) the mass, summed in
// rank order, reaches p.
fn pick(base: u32, limit: u32, p: f32, use_p: bool) -> u32 {
    var prev = vec2<u32>(0u, 0u);
    var acc = 0.0;
    var k = 0u;
    var done = false;
    loop {
        if (done || k >= limit) {
            break;
        }
        let next = next_four(base, prev.x, prev.y, k == 0u);
        for (var i = 0u; i < 4u; i++) {
            let c = next[i];
            if (c.y == 0xffffffffu || k >= limit) {
                done = done || c.y == 0xffffffffu;
                break;
            }
            experts_out[base + k] = i32(c.y);
            k += 1u;
            prev = c;
            acc += probs[base + c.y];
            if (use_p && acc >= p) {
                done = true;
                break;
            }
        }
    }
    return k;
}

@compute @workgroup_size(WG)
fn top_p(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = token_of(gid, nwg);
    if (t >= params.tokens) {
        return;
    }
    let base = t * params.experts;
    var limit = params.experts;
    if (params.k_max > 0u) {
        limit = min(limit, params.k_max);
    }
    var k = 1u;
    experts_out[base] = 0;
    if (row_is_finite(base)) {
        k = pick(base, limit, threshold[0], true);
    }
    finish(t, base, k);
}

@compute @workgroup_size(WG)
fn top_k(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = token_of(gid, nwg);
    if (t >= params.tokens) {
        return;
    }
    let base = t * params.experts;
    var k = 1u;
    experts_out[base] = 0;
    if (row_is_finite(base)) {
        k = pick(base, params.k, 0.0, false);
    }
    finish(t, base, k);
}
