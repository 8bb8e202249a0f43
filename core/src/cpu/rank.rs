//! The rank order of a token's experts, shared by Top-p and Top-k, and the writing of a
//! selection row from it.

/// Expert indices of one token by probability, descending; ties keep the lower index
/// first (a stable sort of `0..E` on a descending key does exactly that).
pub fn rank_experts(probs: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // partial_cmp, not total_cmp: -0.0 and 0.0 are a tie. Inputs are checked finite.
    order.sort_by(|&a, &b| {
        probs[b]
            .partial_cmp(&probs[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    order
}

/// Writes the first `k` ranked experts of a token and their renormalised weights into
/// its `[E]` rows of the selection arrays; the rest is padding (`-1`, `0`).
pub(crate) fn write_selection_row(
    probs: &[f32],
    order: &[usize],
    k: usize,
    experts: &mut [i32],
    weights: &mut [f32],
) {
    let mut mass = 0.0f32;
    for &j in &order[..k] {
        mass += probs[j];
    }
    for slot in 0..probs.len() {
        if slot < k {
            let j = order[slot];
            experts[slot] = j as i32;
            // Softmax output never has zero mass on its top expert, but a user-supplied
            // probability row can; uniform weights keep the combine well defined there.
            weights[slot] = if mass > 0.0 {
                probs[j] / mass
            } else {
                1.0 / k as f32
            };
        } else {
            experts[slot] = -1;
            weights[slot] = 0.0;
        }
    }
}
