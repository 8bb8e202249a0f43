//! Top-p selection on the CPU: per token, the smallest set of top-ranked experts whose
//! probability mass reaches `p`.

use super::drn::check_finite;
use super::rank::{rank_experts, write_selection_row};
use crate::error::Result;
use crate::ops::{HostSelection, RouteShape, check_k_max, check_len, check_threshold};

/// `k` for one token: the smallest `k` with the `k` top-ranked probabilities, summed in
/// rank order, `>= p`; `E` if rounding keeps the sum below `p`.
pub fn top_p_count(probs: &[f32], order: &[usize], p: f32) -> usize {
    let mut mass = 0.0f32;
    for (rank, &j) in order.iter().enumerate() {
        mass += probs[j];
        if mass >= p {
            return rank + 1;
        }
    }
    probs.len()
}

/// Top-p selection of every token, `k_i` capped at `k_max` if given.
pub fn top_p(
    probs: &[f32],
    shape: RouteShape,
    p: f32,
    k_max: Option<usize>,
) -> Result<HostSelection> {
    const OP: &str = "top_p";
    check_len(OP, "probs", probs.len(), shape.len())?;
    check_threshold(p)?;
    check_k_max(k_max, shape.experts)?;
    check_finite(OP, "probability", probs, shape.experts)?;
    let e = shape.experts;
    let mut selection = HostSelection {
        shape,
        k_bound: k_max.unwrap_or(shape.experts),
        experts: vec![-1; shape.len()],
        weights: vec![0.0; shape.len()],
        counts: vec![0; shape.tokens],
    };
    for i in 0..shape.tokens {
        let row = &probs[i * e..(i + 1) * e];
        let order = rank_experts(row);
        let k = top_p_count(row, &order, p).min(k_max.unwrap_or(e));
        write_selection_row(
            row,
            &order,
            k,
            &mut selection.experts[i * e..(i + 1) * e],
            &mut selection.weights[i * e..(i + 1) * e],
        );
        selection.counts[i] = k as i32;
    }
    Ok(selection)
}
