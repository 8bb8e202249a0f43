//! Routing on the model's device with nothing read back per layer
//! (`dtopp train --layout padded`).
//!
//! burn's matrix products take their shapes from the host, so the exact layout (each
//! expert on its own slice of rows, [`super::device_routing`]) needs every layer's expert
//! offsets on the host before its experts run: one synchronisation per MoE layer. Here
//! each expert instead owns a buffer of `C` rows (`[E, C, D]`, one batched product for
//! all experts) and each token `S` combine slots, both bounds fixed on the host before
//! the pass. Rows past an expert's routes read a zero row and are never combined.
//!
//! Nothing is dropped: the bounds come from earlier counts with a margin
//! ([`ExpertBounds::after`]), the trainer reads every layer's counts with the step's
//! losses after its micro-batches have run, and a step in which some micro-batch outgrew
//! its bounds ([`ExpertBounds::hold`]) is run again, micro-batch by micro-batch, before
//! the optimizer sees its gradients.

use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use super::device_routing::{
    ExpertMajor, expert_major, first_above, first_non_finite, slots_by_rank,
};
use super::layer_bounds::LayerBounds;
use super::route::{ExpertRows, Route};
use super::routed_rows::gathers;
use super::routing::Selector;
use super::routing_backend::RoutingBackend;
use crate::error::{Error, Result};

/// Rows per expert buffer are rounded up to a multiple of this (matrix-product tiles).
const CAPACITY_ROUNDING: usize = 8;

/// The host-side bounds of one MoE layer's padded layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertBounds {
    /// `C`: rows per expert buffer.
    pub capacity: usize,
    /// `S`: combine slots per token (the most experts a token may take).
    pub slots: usize,
}

impl ExpertBounds {
    /// Bounds for the next micro-batch of `tokens` tokens after one whose busiest expert
    /// took `max_load` tokens and whose busiest token took `max_k` experts: a quarter
    /// more than seen (rounded up to [`CAPACITY_ROUNDING`] rows), within what `tokens`
    /// tokens and `experts` experts can ever need.
    pub fn after(max_load: usize, max_k: usize, tokens: usize, experts: usize) -> Self {
        let capacity = (max_load + max_load.div_ceil(4))
            .max(1)
            .next_multiple_of(CAPACITY_ROUNDING)
            .min(tokens.max(1));
        let slots = (max_k + max_k.div_ceil(4)).clamp(1, experts.max(1));
        Self { capacity, slots }
    }

    /// Whether a micro-batch with these counts fits: no expert took more than `C` tokens
    /// and no token more than `S` experts.
    pub fn hold(&self, max_load: usize, max_k: usize) -> bool {
        max_load <= self.capacity && max_k <= self.slots
    }
}

/// How a session's padded or grouped layout went: reported by the trainer and
/// `bench train`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaddedUsage {
    /// Micro-batches whose gradients were used (the first step of a process in the exact
    /// layout, to measure).
    pub micro_batches: u64,
    /// Micro-batches run once more because they (or another micro-batch of their step)
    /// outgrew their bounds.
    pub redone: u64,
    /// Expert rows the experts' products computed (`E C` per layer padded, the routes
    /// grouped; summed over the MoE layers) in the micro-batches that fit.
    pub buffer_rows: u64,
    /// Expert rows allocated (`E C` padded, the bound `R` grouped) in the same
    /// micro-batches.
    #[serde(default)]
    pub allocated_rows: u64,
    /// Routes (selected token-expert pairs) of the same micro-batches.
    pub routes: u64,
}

impl PaddedUsage {
    /// Counts a micro-batch that fit `bounds`: its computed and allocated rows and its
    /// routes (`k_sum`: each layer's experts summed over its tokens).
    pub fn count_fitting(&mut self, bounds: &[LayerBounds], experts: usize, k_sum: &[u64]) {
        for (b, &routes) in bounds.iter().zip(k_sum) {
            self.buffer_rows += b.computed_rows(experts, routes as usize) as u64;
            self.allocated_rows += b.allocated_rows(experts) as u64;
        }
        self.routes += k_sum.iter().sum::<u64>();
    }

    /// Expert rows computed per route (1 would be no padding).
    pub fn rows_per_route(&self) -> Option<f64> {
        (self.routes > 0).then(|| self.buffer_rows as f64 / self.routes as f64)
    }

    /// Expert rows allocated per route.
    pub fn allocated_per_route(&self) -> Option<f64> {
        (self.routes > 0 && self.allocated_rows > 0)
            .then(|| self.allocated_rows as f64 / self.routes as f64)
    }

    /// One line for the log, for a run in `layout`.
    pub fn describe(&self, layout: &str) -> String {
        let rows = self.rows_per_route().map_or_else(String::new, |r| {
            format!("; {r:.2} expert rows computed per route")
        });
        let allocated = self
            .allocated_per_route()
            .map_or_else(String::new, |r| format!(", {r:.2} allocated"));
        format!(
            "{layout} expert rows: {} micro-batches run again (their step outgrew the bounds), {} used{rows}{allocated}",
            self.redone, self.micro_batches
        )
    }
}

/// Selects experts from `probs` `[N, E]` (detached) and lays the routes out in buffers
/// of `bounds.capacity` rows per expert, on the device of `probs`, reading nothing back.
/// `threshold` (`[1]`, on the device) replaces a Top-p selector's host threshold.
pub fn route_padded<B: RoutingBackend>(
    probs: Tensor<B, 2>,
    logits: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
    bounds: ExpertBounds,
) -> Result<Route<B>> {
    let [n, e] = probs.dims();
    let c = bounds.capacity;
    if c == 0 || bounds.slots == 0 {
        return Err(Error::param(
            "padded expert bounds",
            format!("{bounds:?}"),
            "at least one row per expert and one slot per token",
        ));
    }
    let rows = e * c;
    let (selected, rank) = B::select(probs, selector, threshold)?;
    let device = selected.device();

    let ExpertMajor {
        inclusive,
        exclusive,
        starts,
    } = expert_major(&selected);
    let ends = inclusive.clone().select(
        0,
        Tensor::arange_step(n as i64 - 1..(e * n) as i64, n, &device),
    );
    let counts = ends - starts.clone();

    // Row (j, r) holds expert j's route r, the expert-major route starts[j] + r, when
    // r < counts[j].
    let row = Tensor::<B, 1, Int>::arange(0..rows as i64, &device);
    let expert = row.clone().div_scalar(c as i64);
    let within = row.remainder_scalar(c as i64);
    let empty = within
        .clone()
        .greater_equal(counts.select(0, expert.clone()));
    let flat_index = first_above(
        &inclusive,
        starts.clone().select(0, expert.clone()) + within,
    );
    let row_tokens = flat_index
        .remainder_scalar(n as i64)
        .mask_fill(empty.clone(), n as i64);
    let row_sources =
        (row_tokens.clone().mul_scalar(e as i64) + expert).mask_fill(empty, (n * e) as i64);

    // The inverse: route (i, j) sits at row j C + (its rank among expert j's tokens).
    let position = exclusive.reshape([e, n]).transpose() - starts.reshape([1, e]).expand([n, e]);
    let unused = selected
        .clone()
        .equal_elem(0)
        .bool_or(position.clone().greater_equal_elem(c as i64));
    let buffer_start = Tensor::<B, 1, Int>::arange_step(0..rows as i64, c, &device)
        .reshape([1, e])
        .expand([n, e]);
    let row_of = (buffer_start + position).mask_fill(unused, rows as i64);
    let token_slots =
        gathers::<B>().then(|| slots_by_rank(row_of.clone(), rank, bounds.slots, rows));
    Ok(Route {
        selected,
        row_tokens,
        row_sources,
        row_of,
        token_slots,
        rows: ExpertRows::Padded {
            capacity: c,
            first_bad: first_non_finite(logits),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::ExpertBounds;

    #[test]
    fn bounds_leave_a_margin_and_never_exceed_what_a_batch_can_need() {
        let b = ExpertBounds::after(100, 5, 4096, 64);
        assert_eq!(
            b,
            ExpertBounds {
                capacity: 128,
                slots: 7
            }
        );
        assert!(b.hold(128, 7));
        assert!(!b.hold(129, 7));
        assert!(!b.hold(10, 8));
        // Never more rows than tokens, nor more slots than experts.
        assert_eq!(ExpertBounds::after(40, 3, 45, 3).capacity, 45);
        assert_eq!(ExpertBounds::after(40, 3, 45, 3).slots, 3);
        assert_eq!(
            ExpertBounds::after(0, 0, 1, 1),
            ExpertBounds {
                capacity: 1,
                slots: 1
            }
        );
    }
}
