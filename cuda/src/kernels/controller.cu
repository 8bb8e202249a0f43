// The PI controller on the device (as controller.wgsl): a_t reduced from the per-token
// expert counts, then the update of DESIGN.md section 1 applied to the threshold held in
// `state`, which top_p reads directly (state[0] = p). A step thus routes without a host
// read-back; the host reads `state` only when it logs.
//
//   state = [p, p_0, integral, last_error, step]
//   a_t = sum(counts) / per;  e = (T - a_t) / E   (per = the tokens the counts cover:
//   len for per-token counts, or L N for L per-layer sums)
//   I = clamp(I + e, (p_min - p_0) / Ki, (p_max - p_0) / Ki)   (integrator clamping)
//   p = clamp(p_0 + Kp e + Ki I, p_min, p_max)
//
// Several controllers at once (one per MoE layer in training's per-layer scope): block c
// updates state[5 c ..] from counts[c len ..]. Within a block: counts summed in unsigned
// integers (exact), a tree reduction in shared memory, thread 0 updates the state.
// Memory traffic: the counts once, 20 bytes of state per controller.

struct ControllerParams {
    // Counts per controller.
    unsigned len;
    unsigned experts;
    float target;
    float kp;
    float ki;
    float p_min;
    float p_max;
    // Tokens the counts of one controller cover.
    float per;
};

extern "C" __global__ void __launch_bounds__(256)
    controller_update(const int* __restrict__ counts, float* __restrict__ state,
                      const ControllerParams law) {
    __shared__ unsigned partial[256];
    const int* mine = counts + (unsigned long long)blockIdx.x * law.len;
    float* st = state + 5ull * blockIdx.x;
    unsigned s = 0;
    for (unsigned i = threadIdx.x; i < law.len; i += blockDim.x) {
        int c = mine[i];
        s += (unsigned)(c > 0 ? c : 0);
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) partial[threadIdx.x] += partial[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float a = (float)partial[0] / law.per;
        float e = (law.target - a) / (float)law.experts;
        float p0 = st[1];
        float integral = 0.0f;
        if (law.ki > 0.0f) {
            float low = fminf((law.p_min - p0) / law.ki, 0.0f);
            float high = fmaxf((law.p_max - p0) / law.ki, 0.0f);
            integral = fminf(fmaxf(st[2] + e, low), high);
        }
        st[0] = fminf(fmaxf(p0 + law.kp * e + law.ki * integral, law.p_min), law.p_max);
        st[2] = integral;
        st[3] = e;
        st[4] = st[4] + 1.0f;
    }
}
