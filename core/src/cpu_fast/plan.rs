//! The dispatch plan, gather and combine on both cores. The plan is the reference's
//! counting sort split by token blocks: each block counts its routes per expert, a scan
//! over (expert, block) gives every block its own slice of each expert's routes, and the
//! blocks fill their slices in parallel. The result is [`crate::cpu::dispatch_plan`]'s
//! exactly (expert-major, token ascending).

use super::lanes;
use super::parallel::{block_tokens, map_blocks};
use crate::error::Result;
use crate::ops::{HostDispatchPlan, HostSelection, check_len};

/// Blocks of a plan: fewer and larger than the elementwise ops' (every block costs E
/// slices of bookkeeping).
fn plan_block_tokens(tokens: usize, experts: usize) -> usize {
    (4 * block_tokens(tokens, experts)).min(tokens.max(1))
}

/// Whether a block's selection rows are well formed (`k` in `1..=E`, distinct ids in
/// range, `-1` padding), counting its routes per expert into `counts`.
fn count_block(experts: &[i32], ks: &[i32], e: usize, counts: &mut [u32]) -> bool {
    let mut seen = vec![0u64; e.div_ceil(64)];
    for (row, &k) in experts.chunks_exact(e).zip(ks) {
        if k < 1 || k as usize > e {
            return false;
        }
        let k = k as usize;
        for &id in &row[..k] {
            if id < 0 || id as usize >= e {
                return false;
            }
            let (word, bit) = (id as usize / 64, 1u64 << (id % 64));
            if seen[word] & bit != 0 {
                return false;
            }
            seen[word] |= bit;
            counts[id as usize] += 1;
        }
        if row[k..].iter().any(|&id| id != -1) {
            return false;
        }
        for &id in &row[..k] {
            seen[id as usize / 64] = 0;
        }
    }
    true
}

/// The expert-major plan of a host selection.
pub(super) fn dispatch_plan(selection: &HostSelection) -> Result<HostDispatchPlan> {
    const OP: &str = "dispatch_plan";
    let shape = selection.shape;
    let (n, e) = (shape.tokens, shape.experts);
    check_len(
        OP,
        "selection experts",
        selection.experts.len(),
        shape.len(),
    )?;
    check_len(
        OP,
        "selection weights",
        selection.weights.len(),
        shape.len(),
    )?;
    check_len(OP, "selection counts", selection.counts.len(), n)?;
    if shape.is_empty() {
        return crate::cpu::dispatch_plan(selection);
    }
    let bt = plan_block_tokens(n, e);

    // 1. Per block: validity and route counts per expert.
    let blocks: Vec<_> = selection
        .experts
        .chunks(bt * e)
        .zip(selection.counts.chunks(bt))
        .collect();
    let counted = map_blocks(blocks, |(x, ks)| {
        let mut counts = vec![0u32; e];
        count_block(x, ks, e, &mut counts).then_some(counts)
    });
    let Some(block_counts) = counted.into_iter().collect::<Option<Vec<_>>>() else {
        // The reference names the first malformed token.
        crate::cpu::check_selection(OP, selection)?;
        return Err(crate::Error::shape(
            OP,
            "a malformed selection row that the reference's check accepts (a dtopp bug)",
        ));
    };

    // 2. Offsets per expert, and where each block's part of each expert's slice starts.
    let mut expert_counts = vec![0i32; e];
    for counts in &block_counts {
        for (total, &c) in expert_counts.iter_mut().zip(counts) {
            *total += c as i32;
        }
    }
    let mut expert_offsets = vec![0i32; e + 1];
    for j in 0..e {
        expert_offsets[j + 1] = expert_offsets[j] + expert_counts[j];
    }
    let routes = expert_offsets[e] as usize;
    let mut route_tokens = vec![0i32; routes];
    let mut route_weights = vec![0.0f32; routes];
    let mut token_routes = vec![0i32; shape.len()];

    // 3. Each block's slices of the route arrays, carved expert by expert in block order.
    let blocks_n = block_counts.len();
    let mut starts = vec![vec![0i32; e]; blocks_n];
    let mut token_parts: Vec<Vec<&mut [i32]>> =
        (0..blocks_n).map(|_| Vec::with_capacity(e)).collect();
    let mut weight_parts: Vec<Vec<&mut [f32]>> =
        (0..blocks_n).map(|_| Vec::with_capacity(e)).collect();
    {
        let (mut tokens_rest, mut weights_rest) = (&mut route_tokens[..], &mut route_weights[..]);
        for j in 0..e {
            let mut at = expert_offsets[j];
            for b in 0..blocks_n {
                let c = block_counts[b][j] as usize;
                let (t, rest_t) = std::mem::take(&mut tokens_rest).split_at_mut(c);
                let (w, rest_w) = std::mem::take(&mut weights_rest).split_at_mut(c);
                tokens_rest = rest_t;
                weights_rest = rest_w;
                token_parts[b].push(t);
                weight_parts[b].push(w);
                starts[b][j] = at;
                at += c as i32;
            }
        }
    }

    // 4. Fill: visiting a block's tokens in order keeps each slice sorted by token.
    let blocks: Vec<_> = selection
        .experts
        .chunks(bt * e)
        .zip(selection.weights.chunks(bt * e))
        .zip(selection.counts.chunks(bt))
        .zip(token_routes.chunks_mut(bt * e))
        .zip(token_parts.into_iter().zip(weight_parts))
        .zip(starts)
        .enumerate()
        .collect();
    map_blocks(
        blocks,
        |(b, (((((x, w), ks), tr), (mut tp, mut wp)), start))| {
            let mut cursor = vec![0usize; e];
            let first = (b * bt) as i32;
            for (i, (((row_x, row_w), &k), row_r)) in x
                .chunks_exact(e)
                .zip(w.chunks_exact(e))
                .zip(ks)
                .zip(tr.chunks_exact_mut(e))
                .enumerate()
            {
                let k = k as usize;
                for slot in 0..e {
                    if slot < k {
                        let j = row_x[slot] as usize;
                        let pos = cursor[j];
                        cursor[j] += 1;
                        tp[j][pos] = first + i as i32;
                        wp[j][pos] = row_w[slot];
                        row_r[slot] = start[j] + pos as i32;
                    } else {
                        row_r[slot] = -1;
                    }
                }
            }
        },
    );

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

/// Fails like the reference if `values` holds a NaN or infinity, checking in parallel.
fn check_finite_fast(
    op: &'static str,
    what: &'static str,
    values: &[f32],
    width: usize,
) -> Result<()> {
    let blocks: Vec<_> = values.chunks(1 << 16).collect();
    if map_blocks(blocks, lanes::all_finite)
        .into_iter()
        .all(|ok| ok)
    {
        Ok(())
    } else {
        crate::cpu::check_finite(op, what, values, width)
    }
}

/// `out[m] = x[route_tokens[m]]`, `[C, D]`.
pub(super) fn gather(x: &[f32], hidden: usize, plan: &HostDispatchPlan) -> Result<Vec<f32>> {
    const OP: &str = "gather";
    if hidden == 0 {
        return crate::cpu::gather(x, hidden, plan);
    }
    check_len(OP, "x", x.len(), plan.shape.tokens * hidden)?;
    check_finite_fast(OP, "activation", x, hidden)?;
    let mut out = vec![0.0f32; plan.route_capacity * hidden];
    let rb = block_tokens(plan.route_tokens.len(), hidden);
    let blocks: Vec<_> = out
        .chunks_mut(rb * hidden)
        .zip(plan.route_tokens.chunks(rb))
        .collect();
    map_blocks(blocks, |(rows, tokens)| {
        for (row, &t) in rows.chunks_exact_mut(hidden).zip(tokens) {
            let t = t as usize;
            row.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
    });
    Ok(out)
}

/// `out[i] = sum_s route_weights[m] * y[m]` in slot order, `[N, D]`.
pub(super) fn combine(y: &[f32], hidden: usize, plan: &HostDispatchPlan) -> Result<Vec<f32>> {
    const OP: &str = "combine";
    let (n, e) = (plan.shape.tokens, plan.shape.experts);
    if hidden == 0 || e == 0 {
        return crate::cpu::combine(y, hidden, plan);
    }
    check_len(OP, "y", y.len(), plan.route_capacity * hidden)?;
    check_finite_fast(OP, "expert output", y, hidden)?;
    let mut out = vec![0.0f32; n * hidden];
    let bt = block_tokens(n, hidden.max(e));
    let blocks: Vec<_> = out
        .chunks_mut(bt * hidden)
        .zip(plan.token_routes.chunks(bt * e))
        .collect();
    map_blocks(blocks, |(rows, routes)| {
        for (acc, slots) in rows.chunks_exact_mut(hidden).zip(routes.chunks_exact(e)) {
            for &m in slots {
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
    });
    Ok(out)
}
