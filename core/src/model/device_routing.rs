//! Top-p / Top-k selection and the expert-major dispatch plan in burn tensor ops, on the
//! device that holds the model: the default methods of the routing extension
//! ([`super::RoutingBackend`]), for the exact layout. The probabilities never leave that
//! device: per MoE layer the host reads `E + 3` integers (the plan's expert
//! offsets, the route count, the first non-finite logit and, where rows move by gathers,
//! the most experts a token took), because burn's matrix products take their shapes from
//! the host and each expert multiplies its own slice of rows. [`super::padded_routing`]
//! is the same selection with no read per layer.
//!
//! Rule (DESIGN.md section 1, the one the CPU reference implements): experts in rank
//! order (probability descending, ties to the lower index); Top-p keeps the expert at rank
//! r iff the mass of the r experts ahead of it is below p, which is the reference's
//! "smallest k whose prefix sum reaches p" stated per expert; Top-k keeps rank < k. The
//! rank and the mass ahead come from comparing every pair of a token's experts
//! (`[N, E, E]`, in chunks of tokens), so no sort runs (burn's sort reads back to the
//! host); the plan from a blocked prefix sum and a binary search, gathers only. The mass ahead is summed in another order than the reference's rank-ordered
//! prefix sum, so a token whose mass lands within f32 rounding of p can keep one expert
//! more or less; `tests/tests/device_routing.rs` counts those.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::long_reductions::{int_max, int_min};
use super::route::{ExpertRows, Route};
use super::routed_rows::{RowMovesBackend, gathers};
use super::routing::Selector;
use crate::error::{Error, Result};

/// Pairwise comparisons per chunk of tokens: 2^24 elements (64 MiB of f32 per temporary).
const PAIRS_PER_CHUNK: usize = 1 << 24;

/// Rows per block of the blocked prefix sum (burn's cumsum reads every earlier element of
/// its axis on GPU backends, so the axis is kept short).
const SCAN_BLOCK: usize = 32;

/// Selects experts from `probs` `[N, E]` (no gradient needed; detach it) and builds the
/// dispatch plan, on the device of `probs`. `logits` are the router's raw logits, checked
/// for NaN/Inf in the same read-back as the offsets. `threshold` (`[1]`, on the device)
/// replaces a Top-p selector's host threshold.
pub fn route_on_device<B: RowMovesBackend>(
    probs: Tensor<B, 2>,
    logits: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
) -> Result<Route<B>> {
    let [n, e] = probs.dims();
    let (selected, rank) = select_ranked(probs, selector, threshold)?;
    let device = selected.device();

    let ExpertMajor {
        inclusive,
        exclusive,
        starts: expert_starts,
    } = expert_major(&selected);
    let total = inclusive.clone().narrow(0, e * n - 1, 1);
    let first_bad = first_non_finite(logits.clone());
    // The slot table's width, where one is built.
    let most = if gathers::<B>() {
        int_max(selected.clone().sum_dim(1).reshape([n]))
    } else {
        Tensor::<B, 1, Int>::ones([1], &device)
    };
    let head = read_ints(Tensor::cat(vec![expert_starts, total, first_bad, most], 0))?;
    let (routes, first_bad) = (head[e] as usize, head[e + 1] as usize);
    let slots = (head[e + 2] as usize).max(1);
    if first_bad < n * e {
        return Err(non_finite_logit(&logits, first_bad));
    }
    let mut expert_offsets: Vec<usize> = head[..e].iter().map(|&o| o as usize).collect();
    expert_offsets.push(routes);

    // Route m is the selected (expert, token) whose inclusive count is m + 1: the first
    // flat index where the running count exceeds m.
    let targets = Tensor::<B, 1, Int>::arange(0..routes as i64, &device);
    let lo = first_above(&inclusive, targets);
    let route_tokens = lo.clone().remainder_scalar(n as i64);
    let route_sources = route_tokens.clone().mul_scalar(e as i64) + lo.div_scalar(n as i64);

    // The inverse maps, for the gradients of dispatch and combine (gathers too): route
    // (i, j) is the exclusive count at its expert-major position; a token's selected
    // experts are its ranks 0..k, so its slot s holds the route of the expert at rank s.
    let route_of = exclusive
        .reshape([e, n])
        .transpose()
        .mask_fill(selected.clone().equal_elem(0), routes as i64);
    let token_slots = gathers::<B>().then(|| slots_by_rank(route_of.clone(), rank, slots, routes));
    Ok(Route {
        selected,
        row_tokens: route_tokens,
        row_sources: route_sources,
        row_of: route_of,
        token_slots,
        rows: ExpertRows::Exact {
            offsets: expert_offsets,
        },
    })
}

/// Running counts of a selection `[N, E]` in expert-major order: route order is
/// (expert, token) ascending.
pub(super) struct ExpertMajor<B: Backend> {
    /// `[E N]` routes up to and including each (expert, token).
    pub inclusive: Tensor<B, 1, Int>,
    /// `[E N]` routes before each (expert, token): the route of a selected one.
    pub exclusive: Tensor<B, 1, Int>,
    /// `[E]` each expert's first route.
    pub starts: Tensor<B, 1, Int>,
}

pub(super) fn expert_major<B: Backend>(selected: &Tensor<B, 2, Int>) -> ExpertMajor<B> {
    let [n, e] = selected.dims();
    let flat = selected.clone().transpose().reshape([e * n]);
    let inclusive = inclusive_scan(flat.clone());
    let exclusive = inclusive.clone() - flat;
    let starts = exclusive.clone().select(
        0,
        Tensor::arange_step(0..(e * n) as i64, n, &selected.device()),
    );
    ExpertMajor {
        inclusive,
        exclusive,
        starts,
    }
}

/// `[1]` the first non-finite entry of `logits` `[N, E]` in row-major order (`N E` when
/// there is none).
pub(super) fn first_non_finite<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1, Int> {
    let [n, e] = logits.dims();
    let bad = logits.clone().is_nan().int() + logits.is_inf().int();
    let flat = Tensor::<B, 1, Int>::arange(0..(n * e) as i64, &bad.device())
        .mask_fill(bad.reshape([n * e]).equal_elem(0), (n * e) as i64);
    int_min(flat)
}

/// The error for the non-finite router logit at row-major index `flat` (read back).
pub fn non_finite_logit<B: Backend>(logits: &Tensor<B, 2>, flat: usize) -> Error {
    let e = logits.dims()[1];
    let (token, column) = (flat / e, flat % e);
    let value = logits
        .clone()
        .slice([token..token + 1, column..column + 1])
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_or(f32::NAN, |v| v[0]);
    Error::NonFinite {
        op: "route_on_device",
        what: "router logit",
        token,
        column,
        value,
    }
}

/// For each target `t`, the first index `f` of the non-decreasing `inclusive` with
/// `inclusive[f] > t` (the last index where there is none): a binary search of every
/// target at once, gathers only. Burn's scatter ops loop over the scattered axis in one
/// thread per column (slow on a GPU, and cut off after 65535 iterations on lavapipe).
pub(super) fn first_above<B: Backend>(
    inclusive: &Tensor<B, 1, Int>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1, Int> {
    let len = inclusive.dims()[0];
    let count = targets.dims()[0];
    let device = targets.device();
    let mut lo = Tensor::<B, 1, Int>::zeros([count], &device);
    let mut hi = Tensor::<B, 1, Int>::full([count], (len - 1) as i64, &device);
    for _ in 0..usize::BITS - (len - 1).leading_zeros() {
        let mid = (lo.clone() + hi.clone()).div_scalar(2);
        let left = inclusive
            .clone()
            .select(0, mid.clone())
            .greater(targets.clone());
        hi = hi.mask_where(left.clone(), mid.clone());
        lo = mid.add_scalar(1).mask_where(left, lo);
    }
    lo
}

/// `[N, S]`: slot s of token i holds `route_of[i, j]` for the expert j at rank s (`M`
/// where that expert is not selected), from one-hot ranks `[N, E, S]` in chunks of tokens.
pub(super) fn slots_by_rank<B: Backend>(
    route_of: Tensor<B, 2, Int>,
    rank: Tensor<B, 2, Int>,
    slots: usize,
    routes: usize,
) -> Tensor<B, 2, Int> {
    let [n, e] = route_of.dims();
    let device = route_of.device();
    let wanted = Tensor::<B, 1, Int>::arange(0..slots as i64, &device).reshape([1, 1, slots]);
    let rows = (PAIRS_PER_CHUNK / (e * slots)).max(1);
    let chunks: Vec<Tensor<B, 2, Int>> = (0..n)
        .step_by(rows)
        .map(|start| {
            let r = rows.min(n - start);
            let at_rank = rank
                .clone()
                .narrow(0, start, r)
                .reshape([r, e, 1])
                .expand([r, e, slots])
                .equal(wanted.clone().expand([r, e, slots]))
                .int();
            let offset = route_of
                .clone()
                .narrow(0, start, r)
                .sub_scalar(routes as i64)
                .reshape([r, e, 1])
                .expand([r, e, slots]);
            (at_rank * offset)
                .sum_dim(1)
                .reshape([r, slots])
                .add_scalar(routes as i64)
        })
        .collect();
    Tensor::cat(chunks, 0)
}

/// `[N, E]` 0/1: the experts each token selects under `selector`.
pub fn select<B: Backend>(probs: Tensor<B, 2>, selector: Selector) -> Result<Tensor<B, 2, Int>> {
    Ok(select_ranked(probs, selector, None)?.0)
}

/// [`select`] and `[N, E]` each expert's rank within its token (0 = most probable);
/// `threshold` (`[1]`, on the device) replaces a Top-p selector's host threshold.
pub(super) fn select_ranked<B: Backend>(
    probs: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Int>)> {
    let [n, e] = probs.dims();
    if n == 0 || e == 0 {
        return Err(Error::param(
            "routing probabilities",
            format!("[{n}, {e}]"),
            "at least one token and one expert",
        ));
    }
    let device = probs.device();
    // ahead[j, k] = 1 where expert k ranks ahead of expert j on an equal probability
    // (ties go to the lower index).
    let lower: Vec<f32> = (0..e * e)
        .map(|jk| f32::from(u8::from(jk % e < jk / e)))
        .collect();
    let tie_ahead = Tensor::<B, 3>::from_data(TensorData::new(lower, [1, e, e]), &device);
    let rows = (PAIRS_PER_CHUNK / (e * e)).max(1);
    let (selected, ranks): (Vec<_>, Vec<_>) = (0..n)
        .step_by(rows)
        .map(|start| {
            let end = (start + rows).min(n);
            let p = probs.clone().slice([start..end, 0..e]);
            select_chunk(p, tie_ahead.clone(), selector, threshold.clone())
        })
        .unzip();
    Ok((Tensor::cat(selected, 0), Tensor::cat(ranks, 0)))
}

fn select_chunk<B: Backend>(
    probs: Tensor<B, 2>,
    tie_ahead: Tensor<B, 3>,
    selector: Selector,
    on_device: Option<Tensor<B, 1>>,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let [n, e] = probs.dims();
    // [i, j, k]: P_ij (the expert ranked) against P_ik (a competitor).
    let own = probs.clone().reshape([n, e, 1]).expand([n, e, e]);
    let other = probs.reshape([n, 1, e]).expand([n, e, e]);
    let ahead = other.clone().greater(own.clone()).float()
        + other.clone().equal(own).float() * tie_ahead.expand([n, e, e]);
    let rank = ahead.clone().sum_dim(2).reshape([n, e]);
    let selected = match selector {
        Selector::TopK(k) => rank.clone().lower_elem(k as f32).int(),
        Selector::TopP { threshold, k_max } => {
            let mass_ahead = (ahead * other).sum_dim(2).reshape([n, e]);
            let kept = match on_device {
                Some(p) => mass_ahead.lower(p.reshape([1, 1]).expand([n, e])),
                None => mass_ahead.lower_elem(threshold),
            }
            .int();
            match k_max {
                Some(k) => kept * rank.clone().lower_elem(k as f32).int(),
                None => kept,
            }
        }
    };
    (selected, rank.int())
}

/// Inclusive prefix sum of a 1-D integer tensor, in blocks of [`SCAN_BLOCK`].
pub(super) fn inclusive_scan<B: Backend>(values: Tensor<B, 1, Int>) -> Tensor<B, 1, Int> {
    let n = values.dims()[0];
    if n <= SCAN_BLOCK {
        return values.cumsum(0);
    }
    let device = values.device();
    let rows = n.div_ceil(SCAN_BLOCK);
    let padded = if rows * SCAN_BLOCK > n {
        Tensor::cat(
            vec![
                values,
                Tensor::<B, 1, Int>::zeros([rows * SCAN_BLOCK - n], &device),
            ],
            0,
        )
    } else {
        values
    };
    let within = padded.reshape([rows, SCAN_BLOCK]).cumsum(1);
    let block_sums = within
        .clone()
        .slice([0..rows, SCAN_BLOCK - 1..SCAN_BLOCK])
        .reshape([rows]);
    let before = inclusive_scan(block_sums.clone()) - block_sums;
    (within + before.reshape([rows, 1]).expand([rows, SCAN_BLOCK]))
        .reshape([rows * SCAN_BLOCK])
        .narrow(0, 0, n)
}

/// A small integer tensor on the host (the one read-back per layer).
pub(crate) fn read_ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Result<Vec<i64>> {
    crate::host_reads::count(1);
    t.into_data()
        .convert::<i64>()
        .to_vec()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("reading routing results back: {e:?}"),
        })
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{inclusive_scan, read_ints};

    type B = NdArray;

    #[test]
    fn blocked_scan_equals_a_running_sum() {
        let device = Default::default();
        for n in [1, 31, 32, 33, 64, 1000, 1025, 40_000] {
            let values: Vec<i64> = (0..n).map(|i| (i * 7 % 5) as i64).collect();
            let t = Tensor::<B, 1, Int>::from_data(TensorData::new(values.clone(), [n]), &device);
            let got = read_ints(inclusive_scan(t)).unwrap();
            let want: Vec<i64> = values
                .iter()
                .scan(0, |s, v| {
                    *s += v;
                    Some(*s)
                })
                .collect();
            assert_eq!(got, want, "n = {n}");
        }
    }
}
