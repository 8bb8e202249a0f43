//! The model's index tensors from a selection and dispatch plan that a backend's own
//! kernels wrote on the device (wgpu's `dispatch.wgsl`, CUDA's `dispatch.cu`): one read
//! of `E + 4` integers, which burn's sliced products need as shapes, and gathers and a
//! scatter within rows for the rest.

use burn::tensor::{Int, Tensor};

use super::RoutingBackend;
use crate::error::{Error, Result};
use crate::model::device_routing::{first_above, first_non_finite, non_finite_logit};
use crate::model::long_reductions::int_max;
use crate::model::route::{ExpertRows, Route};
use crate::model::routing::Selector;

/// A selection and its plan in the ops contract's layout, on the device.
#[derive(Debug)]
pub(super) struct DevicePlan<B: RoutingBackend> {
    /// `[N, E]` the selected experts in rank order, padded with -1.
    pub experts: Tensor<B, 2, Int>,
    /// `[N]` experts per token.
    pub counts: Tensor<B, 1, Int>,
    /// `[1]` the first non-finite probability, row-major, or -1 (`u32::MAX`).
    pub status: Tensor<B, 1, Int>,
    /// `[E + 1]` the experts' first routes, then the route count.
    pub offsets: Tensor<B, 1, Int>,
    /// `[capacity]` each route's token, expert-major (the first `offsets[E]` hold).
    pub route_tokens: Tensor<B, 1, Int>,
    /// `[N, E]` each token's routes in rank order, -1 past its count.
    pub token_routes: Tensor<B, 2, Int>,
}

impl<B: RoutingBackend> DevicePlan<B> {
    /// The route of `selector` over `logits` (whose first NaN or Inf is
    /// [`crate::Error::NonFinite`]), after one read.
    pub fn into_route(self, logits: Tensor<B, 2>, selector: Selector) -> Result<Route<B>> {
        let [n, e] = self.experts.dims();
        let device = self.experts.device();
        // One read: the offsets, the route count, the first bad logit, the selection's
        // status (first non-finite probability) and the most experts a token took.
        let head = crate::model::read_ints(Tensor::cat(
            vec![
                self.offsets.clone(),
                first_non_finite(logits.clone()),
                self.status,
                int_max(self.counts),
            ],
            0,
        ))?;
        let routes = head[e] as usize;
        let (bad_logit, bad_prob) = (head[e + 1] as usize, head[e + 2]);
        let slots = (head[e + 3] as usize).max(1);
        if bad_logit < n * e {
            return Err(non_finite_logit(&logits, bad_logit));
        }
        if bad_prob >= 0 {
            let flat = bad_prob as usize;
            return Err(Error::NonFinite {
                op: match selector {
                    Selector::TopK(_) => "top_k",
                    Selector::TopP { .. } => "top_p",
                },
                what: "routing probability",
                token: flat / e,
                column: flat % e,
                value: f32::NAN,
            });
        }

        // The model's index tensors from the plan (gathers, and a scatter within rows).
        let route_tokens = self.route_tokens.narrow(0, 0, routes);
        let expert_ends = self.offsets.narrow(0, 1, e);
        let route_expert = first_above(&expert_ends, Tensor::arange(0..routes as i64, &device));
        let route_sources = route_tokens.clone().mul_scalar(e as i64) + route_expert;
        let raw_slots = self.token_routes.narrow(1, 0, slots);
        let token_slots = raw_slots
            .clone()
            .mask_fill(raw_slots.lower_elem(0), routes as i64);
        let slot_experts = self.experts.narrow(1, 0, slots).clamp_min(0);
        let route_of = Tensor::<B, 2, Int>::zeros([n, e], &device)
            .scatter(
                1,
                slot_experts,
                token_slots.clone().sub_scalar(routes as i64),
                burn::tensor::IndexingUpdateOp::Add,
            )
            .add_scalar(routes as i64);
        let selected = route_of.clone().lower_elem(routes as i64).int();
        let mut expert_offsets: Vec<usize> = head[..e].iter().map(|&o| o as usize).collect();
        expert_offsets.push(routes);
        Ok(Route {
            selected,
            row_tokens: route_tokens,
            row_sources: route_sources,
            row_of: route_of,
            token_slots: Some(token_slots),
            rows: ExpertRows::Exact {
                offsets: expert_offsets,
            },
        })
    }
}
