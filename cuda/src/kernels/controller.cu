// The PI controller on the device (as controller.wgsl): a_t reduced from the per-token
// expert counts, then the update of DESIGN.md section 1 applied to the threshold held in
// `state`, which top_p reads directly (state[0] = p). A training step thus routes
// without a host read-back; the host reads `state` only when it logs.
//
//   state = [p, p_0, integral, last_error, step]
//   a_t = sum(counts) / len;  e = (T - a_t) / E
//   I = clamp(I + e, (p_min - p_0) / Ki, (p_max - p_0) / Ki)   (integrator clamping)
//   p = clamp(p_0 + Kp e + Ki I, p_min, p_max)
//
// Mapping: one block of 256 threads; counts summed in unsigned integers (exact), a tree
// reduction in shared memory, thread 0 updates the state. Memory traffic: the counts
// once, 20 bytes of state.

extern "C" __global__ void controller_update(const int* __restrict__ counts,
                                             float* __restrict__ state, unsigned len,
                                             unsigned experts, float target, float kp,
                                             float ki, float p_min, float p_max) {
    __shared__ unsigned partial[256];
    unsigned s = 0;
    for (unsigned i = threadIdx.x; i < len; i += blockDim.x) {
        int c = counts[i];
        s += (unsigned)(c > 0 ? c : 0);
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) partial[threadIdx.x] += partial[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float a = (float)partial[0] / (float)len;
        float e = (target - a) / (float)experts;
        float p0 = state[1];
        float integral = 0.0f;
        if (ki > 0.0f) {
            float low = fminf((p_min - p0) / ki, 0.0f);
            float high = fmaxf((p_max - p0) / ki, 0.0f);
            integral = fminf(fmaxf(state[2] + e, low), high);
        }
        state[0] = fminf(fmaxf(p0 + kp * e + ki * integral, p_min), p_max);
        state[2] = integral;
        state[3] = e;
        state[4] = state[4] + 1.0f;
    }
}
