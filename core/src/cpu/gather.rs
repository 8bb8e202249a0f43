//! Gather on the CPU: token rows copied into route (expert-major) order.

use super::drn::check_finite;
use crate::error::Result;
use crate::ops::{HostDispatchPlan, check_len};

/// `out[m] = x[route_tokens[m]]`, `[C, D]`.
pub fn gather(x: &[f32], hidden: usize, plan: &HostDispatchPlan) -> Result<Vec<f32>> {
    const OP: &str = "gather";
    check_len(OP, "x", x.len(), plan.shape.tokens * hidden)?;
    check_finite(OP, "activation", x, hidden.max(1))?;
    let mut out = vec![0.0f32; plan.route_capacity * hidden];
    for (m, &token) in plan.route_tokens.iter().enumerate() {
        let t = token as usize;
        out[m * hidden..(m + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
    Ok(out)
}
