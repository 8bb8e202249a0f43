//! Routing for the grouped layout (`dtopp train --layout grouped`): every route gets
//! exactly one expert row, expert-major, and the experts' `E + 1` offsets stay on the
//! device, where the grouped products read them ([`super::grouped_on_device`]). Nothing
//! is read back per layer, and no row is computed that holds no route.
//!
//! burn's tensors take their shapes from the host, so the host fixes a bound `R` on the
//! routes before the pass ([`RowBound`]): rows from the routes' end to `R` read the zero
//! row appended to the tokens, the products write zeros there without computing, and
//! nothing combines them. The bound comes from the last micro-batch's routes with a
//! margin; a micro-batch whose routes outgrow it is run again, as in the padded layout,
//! so nothing is dropped. Unlike the padded layout's per-expert buffers (sized by the
//! busiest expert), the total moves little from step to step: the controller holds the
//! mean experts per token at its target.

use burn::tensor::{Int, Tensor};

use super::device_routing::{
    ExpertMajor, expert_major, first_above, first_non_finite, slots_by_rank,
};
use super::route::{ExpertRows, Route};
use super::routed_rows::gathers;
use super::routing::Selector;
use super::routing_backend::RoutingBackend;
use crate::error::{Error, Result};

/// Row bounds are rounded up to a multiple of this (the kernels' 32-row tiles).
const ROW_ROUNDING: usize = 32;

/// The host-side bounds of one MoE layer's grouped layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBound {
    /// `R`: expert rows, at least the layer's routes (selected token-expert pairs).
    pub rows: usize,
    /// `S`: combine slots per token (the most experts a token may take).
    pub slots: usize,
}

impl RowBound {
    /// Bounds for the next micro-batch of `tokens` tokens after one that made `routes`
    /// routes and whose busiest token took `max_k` experts: a quarter more routes than
    /// seen (rounded up to [`ROW_ROUNDING`] rows) and half as many slots again, within
    /// what `tokens` tokens can make when each takes at most `k_bound` experts (Top-k's
    /// `k`, or Top-p's cap, else E): a Top-k layer's bound is its exact route count.
    pub fn after(routes: usize, max_k: usize, tokens: usize, k_bound: usize) -> Self {
        let most = tokens.max(1) * k_bound.max(1);
        let rows = (routes + routes.div_ceil(4))
            .next_multiple_of(ROW_ROUNDING)
            .clamp(tokens.max(1), most);
        let slots = (max_k + max_k.div_ceil(2)).clamp(1, k_bound.max(1));
        Self { rows, slots }
    }

    /// Whether a micro-batch with these counts fits.
    pub fn hold(&self, routes: usize, max_k: usize) -> bool {
        routes <= self.rows && max_k <= self.slots
    }
}

/// Selects experts from `probs` `[N, E]` (detached) and lays the routes out expert-major
/// in `bound.rows` rows with the offsets on the device, reading nothing back.
/// `threshold` (`[1]`, on the device) replaces a Top-p selector's host threshold.
pub fn route_grouped<B: RoutingBackend>(
    probs: Tensor<B, 2>,
    logits: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
    bound: RowBound,
) -> Result<Route<B>> {
    let [n, e] = probs.dims();
    let rows = bound.rows;
    if rows == 0 || bound.slots == 0 {
        return Err(Error::param(
            "grouped row bound",
            format!("{bound:?}"),
            "at least one row and one slot per token",
        ));
    }
    let (selected, rank) = B::select(probs, selector, threshold)?;
    let device = selected.device();
    let ExpertMajor {
        inclusive,
        exclusive,
        starts,
    } = expert_major(&selected);
    let total = inclusive.clone().narrow(0, e * n - 1, 1);

    // Row r holds the expert-major route r: the first (expert, token) whose inclusive
    // count passes r. Rows past the routes read the zero row N (source N E).
    let row = Tensor::<B, 1, Int>::arange(0..rows as i64, &device);
    let empty = row.clone().greater_equal(total.clone().expand([rows]));
    let flat_index = first_above(&inclusive, row).clamp_max((e * n) as i64 - 1);
    let expert = flat_index.clone().div_scalar(n as i64);
    let row_tokens = flat_index
        .remainder_scalar(n as i64)
        .mask_fill(empty.clone(), n as i64);
    let row_sources =
        (row_tokens.clone().mul_scalar(e as i64) + expert).mask_fill(empty, (n * e) as i64);

    // The inverse: route (i, j) sits at row `exclusive[j N + i]`, when it fits the bound.
    let route = exclusive.reshape([e, n]).transpose();
    let unused = selected
        .clone()
        .equal_elem(0)
        .bool_or(route.clone().greater_equal_elem(rows as i64));
    let row_of = route.mask_fill(unused, rows as i64);
    let token_slots =
        gathers::<B>().then(|| slots_by_rank(row_of.clone(), rank, bound.slots, rows));
    Ok(Route {
        selected,
        row_tokens,
        row_sources,
        row_of,
        token_slots,
        rows: ExpertRows::Grouped {
            offsets: Tensor::cat(vec![starts, total], 0),
            first_bad: first_non_finite(logits),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::RowBound;

    #[test]
    fn bounds_leave_a_margin_within_what_a_batch_can_make() {
        let b = RowBound::after(1000, 6, 512, 16);
        assert_eq!(
            b,
            RowBound {
                rows: 1280,
                slots: 9
            }
        );
        assert!(b.hold(1280, 9));
        assert!(!b.hold(1281, 9));
        assert!(!b.hold(10, 10));
        // Top-k: the bound is the exact route count, k slots.
        assert_eq!(
            RowBound::after(512 * 2, 2, 512, 2),
            RowBound {
                rows: 1024,
                slots: 2
            }
        );
        // Never fewer rows than tokens, never fewer than one slot.
        assert_eq!(RowBound::after(0, 0, 7, 3), RowBound { rows: 7, slots: 1 });
    }
}
