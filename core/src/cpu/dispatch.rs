//! The dispatch plan on the CPU: a counting sort of the selected (token, expert) pairs by
//! expert, stable in token id, as DESIGN.md section 1 "Dispatch / combine" specifies.

use crate::error::{Error, Result};
use crate::ops::{HostDispatchPlan, HostSelection, check_len};

/// Checks that a selection is well formed: `k_i` in `1..=E`, ids in range, no expert twice
/// in one token, padding (`-1`) only after the selected slots.
pub fn check_selection(op: &'static str, selection: &HostSelection) -> Result<()> {
    let shape = selection.shape;
    let e = shape.experts;
    check_len(
        op,
        "selection experts",
        selection.experts.len(),
        shape.len(),
    )?;
    check_len(
        op,
        "selection weights",
        selection.weights.len(),
        shape.len(),
    )?;
    check_len(op, "selection counts", selection.counts.len(), shape.tokens)?;
    for (i, &k) in selection.counts.iter().enumerate() {
        if k < 1 || k as usize > e {
            return Err(Error::shape(
                op,
                format!("token {i} selects {k} experts, expected 1..={e}"),
            ));
        }
        let row = &selection.experts[i * e..(i + 1) * e];
        let mut seen = vec![false; e];
        for (slot, &id) in row.iter().enumerate() {
            let selected = slot < k as usize;
            let valid = if selected {
                id >= 0 && (id as usize) < e && !std::mem::replace(&mut seen[id as usize], true)
            } else {
                id == -1
            };
            if !valid {
                return Err(Error::shape(
                    op,
                    format!(
                        "token {i} slot {slot} holds expert {id}: expected {}",
                        if selected {
                            format!("a distinct expert id in 0..{e}")
                        } else {
                            "-1 (padding)".to_string()
                        }
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Builds the expert-major plan: counts, exclusive offsets, and routes ordered by expert
/// then token id.
pub fn dispatch_plan(selection: &HostSelection) -> Result<HostDispatchPlan> {
    check_selection("dispatch_plan", selection)?;
    let shape = selection.shape;
    let e = shape.experts;

    // 1. Histogram: how many tokens chose each expert.
    let mut expert_counts = vec![0i32; e];
    for i in 0..shape.tokens {
        for slot in 0..selection.counts[i] as usize {
            expert_counts[selection.experts[i * e + slot] as usize] += 1;
        }
    }

    // 2. Exclusive scan: where each expert's slice starts; offsets[E] = M.
    let mut expert_offsets = vec![0i32; e + 1];
    for j in 0..e {
        expert_offsets[j + 1] = expert_offsets[j] + expert_counts[j];
    }
    let routes = expert_offsets[e] as usize;

    // 3. Scatter: visiting tokens in ascending order makes each slice sorted by token.
    let mut cursor = expert_offsets[..e].to_vec();
    let mut route_tokens = vec![0i32; routes];
    let mut route_weights = vec![0.0f32; routes];
    let mut token_routes = vec![-1i32; shape.len()];
    for i in 0..shape.tokens {
        for slot in 0..selection.counts[i] as usize {
            let j = selection.experts[i * e + slot] as usize;
            let m = cursor[j] as usize;
            cursor[j] += 1;
            route_tokens[m] = i as i32;
            route_weights[m] = selection.weights[i * e + slot];
            token_routes[i * e + slot] = m as i32;
        }
    }

    Ok(HostDispatchPlan {
        shape,
        route_capacity: routes,
        expert_counts,
        expert_offsets,
        route_tokens,
        route_weights,
        token_routes,
    })
}
