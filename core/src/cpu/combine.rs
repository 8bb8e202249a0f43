//! Combine on the CPU: each token gathers its routes' expert outputs and sums them,
//! weighted, in selection-slot order (a per-token gather, so no float atomics are needed
//! on devices either).

use super::drn::check_finite;
use crate::error::Result;
use crate::ops::{HostDispatchPlan, check_len};

/// `out[i] = sum_s route_weights[m] * y[m]`, `m = token_routes[i, s]`, `[N, D]`.
pub fn combine(y: &[f32], hidden: usize, plan: &HostDispatchPlan) -> Result<Vec<f32>> {
    const OP: &str = "combine";
    let shape = plan.shape;
    check_len(OP, "y", y.len(), plan.route_capacity * hidden)?;
    check_finite(OP, "expert output", y, hidden.max(1))?;
    let mut out = vec![0.0f32; shape.tokens * hidden];
    for i in 0..shape.tokens {
        let acc = &mut out[i * hidden..(i + 1) * hidden];
        for slot in 0..shape.experts {
            let m = plan.token_routes[i * shape.experts + slot];
            if m < 0 {
                break;
            }
            let m = m as usize;
            let w = plan.route_weights[m];
            for (a, &v) in acc.iter_mut().zip(&y[m * hidden..(m + 1) * hidden]) {
                *a += w * v;
            }
        }
    }
    Ok(out)
}
