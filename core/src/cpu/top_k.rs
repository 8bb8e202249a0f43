//! Top-k selection on the CPU: the `k` top-ranked experts of every token.

use super::drn::check_finite;
use super::rank::{rank_experts, write_selection_row};
use crate::error::Result;
use crate::ops::{HostSelection, RouteShape, check_k, check_len};

/// Top-k selection, `k` in `1..=E`.
pub fn top_k(probs: &[f32], shape: RouteShape, k: usize) -> Result<HostSelection> {
    const OP: &str = "top_k";
    check_len(OP, "probs", probs.len(), shape.len())?;
    check_k(k, shape.experts)?;
    check_finite(OP, "probability", probs, shape.experts)?;
    let e = shape.experts;
    let mut selection = HostSelection {
        shape,
        k_bound: k,
        experts: vec![-1; shape.len()],
        weights: vec![0.0; shape.len()],
        counts: vec![k as i32; shape.tokens],
    };
    for i in 0..shape.tokens {
        let row = &probs[i * e..(i + 1) * e];
        write_selection_row(
            row,
            &rank_experts(row),
            k,
            &mut selection.experts[i * e..(i + 1) * e],
            &mut selection.weights[i * e..(i + 1) * e],
        );
    }
    Ok(selection)
}
