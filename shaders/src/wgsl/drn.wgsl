// Dynamic Routing Normalization (DRN), forward and backward.
//
// drn_forward: per token t over its E experts
//   mu = mean z, sigma = sqrt(mean (z - mu)^2 + eps), zhat = theta (z - mu) / sigma
//   (or zhat = z when use_drn == 0), P = softmax(zhat).
// theta is read from a storage buffer, not the uniform: in training it is a parameter
// that lives on the device, and a uniform would need the host to read it every layer.
// drn_backward: given dL/dP, writes dL/dz and one partial dL/dtheta per token;
// drn_theta_sum then adds the partials (WGSL has no float atomics).
//
// Thread mapping: one thread per token, WG tokens per workgroup (2-D grid of workgroups,
// so N may exceed 65535 * WG). A row is E <= a few hundred floats, so one thread walks it
// with no workgroup barriers: measured on lavapipe (N = 65536, E = 256), a workgroup per
// token with tree reductions took 1.2 s per call, mostly barriers; this mapping avoids
// them. Memory traffic per token: forward reads its E logits four times (sum, variance,
// max, exp; the row stays in cache) and writes E probabilities; backward reads logits,
// probs and grads twice and writes E gradients.
// A non-finite logit or gradient is reported by atomicMin of its row-major index into
// `status` (initialised to 0xffffffff by the host); the bit test does not depend on NaN
// comparisons, which WGSL lets compilers fold away.

struct DrnParams {
    tokens: u32,
    experts: u32,
    use_drn: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

// Threads per workgroup: a power of two, at most 256.
override WG: u32 = 64u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: DrnParams;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> status: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> probs_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad_probs: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_logits: array<f32>;
@group(0) @binding(7) var<storage, read_write> theta_partials: array<f32>;
@group(0) @binding(8) var<storage, read_write> grad_theta: array<f32>;
@group(0) @binding(9) var<storage, read_write> theta: array<f32>;

var<workgroup> red: array<f32, 256>;

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn token_of(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.y * nwg.x * WG + gid.x;
}

// Mean and sigma of token t's logits (sigma = 1 without DRN); flags non-finite values.
fn row_stats(base: u32) -> vec2<f32> {
    let e = params.experts;
    var s = 0.0;
    for (var j = 0u; j < e; j++) {
        let z = logits[base + j];
        if (!is_finite(z)) {
            atomicMin(&status[0], base + j);
        }
        s += z;
    }
    if (params.use_drn == 0u) {
        return vec2<f32>(0.0, 1.0);
    }
    let mu = s / f32(e);
    var q = 0.0;
    for (var j = 0u; j < e; j++) {
        let d = logits[base + j] - mu;
        q += d * d;
    }
    return vec2<f32>(mu, sqrt(q / f32(e) + params.eps));
}

// The standardized score u (the raw logit without DRN: mu = 0, sigma = 1).
fn unit_score(base: u32, j: u32, st: vec2<f32>) -> f32 {
    if (params.use_drn != 0u) {
        return (logits[base + j] - st.x) / st.y;
    }
    return logits[base + j];
}

fn scale() -> f32 {
    if (params.use_drn != 0u) {
        return theta[0];
    }
    return 1.0;
}

@compute @workgroup_size(WG)
fn drn_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = token_of(gid, nwg);
    if (t >= params.tokens) {
        return;
    }
    let e = params.experts;
    let base = t * e;
    let st = row_stats(base);
    let th = scale();
    var zmax = -3.4e38;
    for (var j = 0u; j < e; j++) {
        zmax = max(zmax, th * unit_score(base, j, st));
    }
    var total = 0.0;
    for (var j = 0u; j < e; j++) {
        let x = exp(th * unit_score(base, j, st) - zmax);
        probs[base + j] = x;
        total += x;
    }
    for (var j = 0u; j < e; j++) {
        probs[base + j] = probs[base + j] / total;
    }
}

@compute @workgroup_size(WG)
fn drn_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = token_of(gid, nwg);
    if (t >= params.tokens) {
        return;
    }
    let e = params.experts;
    let base = t * e;
    let st = row_stats(base);
    let th = scale();
    // dzhat_j = P_j (dP_j - sum_k P_k dP_k)
    var dot = 0.0;
    for (var j = 0u; j < e; j++) {
        let g = grad_probs[base + j];
        if (!is_finite(g)) {
            atomicMin(&status[0], base + j);
        }
        dot += probs_in[base + j] * g;
    }
    if (params.use_drn == 0u) {
        for (var j = 0u; j < e; j++) {
            grad_logits[base + j] = probs_in[base + j] * (grad_probs[base + j] - dot);
        }
        theta_partials[t] = 0.0;
        return;
    }
    var sum_dzhat = 0.0;
    var sum_dzhat_u = 0.0;
    for (var j = 0u; j < e; j++) {
        let dzhat = probs_in[base + j] * (grad_probs[base + j] - dot);
        sum_dzhat += dzhat;
        sum_dzhat_u += dzhat * unit_score(base, j, st);
    }
    let du_mean = th * sum_dzhat / f32(e);
    let du_u_mean = th * sum_dzhat_u / f32(e);
    for (var j = 0u; j < e; j++) {
        let dzhat = probs_in[base + j] * (grad_probs[base + j] - dot);
        let u = unit_score(base, j, st);
        grad_logits[base + j] = (th * dzhat - du_mean - u * du_u_mean) / st.y;
    }
    theta_partials[t] = sum_dzhat_u;
}

// One workgroup: grad_theta[0] = sum over tokens of theta_partials (tree reduction).
@compute @workgroup_size(WG)
fn drn_theta_sum(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var t = lid; t < params.tokens; t += WG) {
        s += theta_partials[t];
    }
    red[lid] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if (lid < h) {
            red[lid] = red[lid] + red[lid + h];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        grad_theta[0] = red[0];
    }
}
