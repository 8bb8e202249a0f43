// The PI controller on the device: a_t reduced from the per-token expert counts, then
// the update of DESIGN.md section 1 applied to the threshold held in `state`, which the
// Top-p kernel reads directly (state[0] = p). A training step thus routes without a
// host read-back; the host reads `state` only when it logs.
//
//   state = [p, p_0, integral, last_error, step]
//   a_t = sum(counts) / per;  e = (T - a_t) / E   (T = params.target_experts; per = the
//   tokens the counts cover: len for per-token counts, or L N for L per-layer sums)
//   I = clamp(I + e, (p_min - p_0) / Ki, (p_max - p_0) / Ki)   (integrator clamping)
//   p = clamp(p_0 + Kp e + Ki I, p_min, p_max)
//
// Several controllers at once (one per MoE layer in training's per-layer scope): workgroup
// c updates state[5 c ..] from counts[c len ..]. Thread mapping within it: threads sum
// counts with stride WG in u32 (exact: counts are integers), a tree reduction in
// workgroup memory, thread 0 updates the state.
// Memory traffic: the counts once (4 bytes per token and layer), 20 bytes of state.

struct ControllerParams {
    len: u32,
    experts: u32,
    target_experts: f32,
    kp: f32,
    ki: f32,
    p_min: f32,
    p_max: f32,
    per: f32,
}

override WG: u32 = 256u;

// Inputs are bound read_write too: burn-wgpu pools many tensors in one buffer, and wgpu
// refuses a buffer bound read-only and read-write in the same dispatch.
@group(0) @binding(0) var<uniform> params: ControllerParams;
@group(0) @binding(1) var<storage, read_write> counts: array<i32>;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;

var<workgroup> partial: array<u32, 256>;

@compute @workgroup_size(WG)
fn controller_update(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let first = wid.x * params.len;
    let at = wid.x * 5u;
    var s = 0u;
    for (var i = lid; i < params.len; i += WG) {
        s += u32(max(counts[first + i], 0));
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if (lid < h) {
            partial[lid] += partial[lid + h];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let a = f32(partial[0]) / params.per;
        let e = (params.target_experts - a) / f32(params.experts);
        let p0 = state[at + 1u];
        var integral = 0.0;
        if (params.ki > 0.0) {
            let low = min((params.p_min - p0) / params.ki, 0.0);
            let high = max((params.p_max - p0) / params.ki, 0.0);
            integral = clamp(state[at + 2u] + e, low, high);
        }
        state[at] = clamp(p0 + params.kp * e + params.ki * integral, params.p_min, params.p_max);
        state[at + 2u] = integral;
        state[at + 3u] = e;
        state[at + 4u] = state[at + 4u] + 1.0;
    }
}
