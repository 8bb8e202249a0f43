//! The routing extension of burn's backends: the selection and the expert-major dispatch
//! plan of a MoE layer as backend ops, the way burn adds custom ops (an extension trait
//! on the backend with default methods; `examples/custom-wgpu-kernel` in burn 0.21).
//!
//! - **Default methods** are burn tensor ops ([`super::device_routing`]): any backend.
//! - **ndarray** ([`ndarray`]) runs the fast CPU ops ([`crate::cpu_fast`]) on the tensors'
//!   host memory.
//! - **wgpu** ([`wgpu`]) runs dtopp's own `.wgsl` kernels (`dtopp-shaders`, the text
//!   `dtopp route` and the browser run) on burn's own buffers, on burn's own device and
//!   queue: no second device, no host copy of the probabilities.
//! - **CUDA** ([`cuda`], [`cuda_grouped`], [`cuda_drn`], [`cuda_rows`], [`cuda_control`])
//!   runs dtopp's own `.cu` kernels (`dtopp-cuda`) through burn-cuda's own client, on its
//!   buffers and its stream ([`cuda_launch`]).
//! - **`Autodiff<B>`** routes on `B`: selection is not differentiable (the spec), so the
//!   results carry no graph; gradients reach the router through the combine weights.
//!
//! Every implementation follows the spec's rules (`crate::ops`): rank order with ties to
//! the lower index, Top-p's rank-ordered prefix sum, routes ordered by expert then token.
//!
//! DRN ([`super::drn::DrnBackend`]), the SwiGLU gate ([`super::SwigluBackend`]), causal attention
//! ([`super::AttentionBackend`]), RoPE ([`super::RopeBackend`]), RMSNorm ([`super::RmsNormBackend`]), the token losses ([`super::TokenLossesBackend`]), the dense products
//! ([`super::DenseMatmulBackend`]), the row moves ([`super::RowMovesBackend`]) and the
//! PI law ([`crate::train::ControllerBackend`]) are its supertraits, each with the same
//! pattern.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_control;
#[cfg(feature = "cuda")]
mod cuda_drn;
#[cfg(feature = "cuda")]
mod cuda_grouped;
#[cfg(feature = "cuda")]
mod cuda_launch;
#[cfg(feature = "cuda")]
mod cuda_rows;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod device_plan;
mod ndarray;
#[cfg(feature = "wgpu")]
pub mod wgpu;
#[cfg(feature = "wgpu")]
mod wgpu_control;
#[cfg(feature = "wgpu")]
mod wgpu_drn;
#[cfg(feature = "wgpu")]
mod wgpu_grouped;
#[cfg(feature = "wgpu")]
mod wgpu_rows;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::attention_op::AttentionBackend;
use super::dense_matmul::DenseMatmulBackend;
use super::device_memory::DeviceMemoryBackend;
use super::device_routing::{route_on_device, select_ranked};
use super::drn::DrnBackend;
use super::grouped_matmul::GroupedMatmulBackend;
use super::rms_norm::RmsNormBackend;
use super::rope::RopeBackend;
use super::route::{ExpertRows, Route};
use super::routed_rows::{RowMovesBackend, gathers};
use super::routing::Selector;
use super::swiglu::SwigluBackend;
use super::token_losses::TokenLossesBackend;
use crate::error::Result;
use crate::ops::{HostDispatchPlan, HostSelection};
use crate::train::{AdamWUpdateBackend, ControllerBackend};

/// A new `[1]` status word for the selection and DRN kernels, which lower it to the
/// first non-finite input's index: all bits set (-1), nothing found yet. The DRN kernels'
/// is not read back: the layer's routing already checked the same logits.
fn clean_status<B: Backend>(device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::full([1], -1, device)
}

/// A burn backend that routes MoE layers: every backend the model trains on.
pub trait RoutingBackend:
    GroupedMatmulBackend
    + SwigluBackend
    + AttentionBackend
    + RopeBackend
    + RowMovesBackend
    + RmsNormBackend
    + TokenLossesBackend
    + DenseMatmulBackend
    + DrnBackend
    + ControllerBackend
    + DeviceMemoryBackend
    + AdamWUpdateBackend
{
    /// Whether the tensors live in host memory, so that reading them costs no wait for
    /// a device ([`super::ExpertLayout::preferred_on`]).
    const HOST_MEMORY: bool = false;

    /// What selects and plans on `device`, for the training log.
    fn routing_name(_device: &Self::Device) -> String {
        "burn tensor ops on the model's device (pairwise ranks, blocked scan)".to_string()
    }

    /// Selects experts from `probs` `[N, E]` and builds the exact dispatch plan, on the
    /// device of `probs`. `logits` are the router's raw logits: a NaN or Inf among them
    /// is [`crate::Error::NonFinite`] naming token and expert. `threshold` (`[1]`, on the
    /// device) replaces a Top-p selector's host threshold. The host reads `E + 3`
    /// integers (offsets, route count, first bad logit, most experts of a token), which
    /// burn's matrix products need as shapes.
    fn route(
        probs: Tensor<Self, 2>,
        logits: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<Route<Self>> {
        route_on_device(probs, logits, selector, threshold)
    }

    /// Which experts each token selects from `probs` `[N, E]`, reading nothing back:
    /// `[N, E]` 1 where token i selected expert j, and `[N, E]` each selected expert's
    /// rank within its token (0 = most probable; an unselected expert's rank is only
    /// known to be past the selected ones'). `threshold` as in [`RoutingBackend::route`].
    /// The padded layout ([`super::padded_routing`]) builds its plan from it.
    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        select_ranked(probs, selector, threshold)
    }
}

impl<B: RoutingBackend, C: CheckpointStrategy> RoutingBackend for Autodiff<B, C> {
    const HOST_MEMORY: bool = B::HOST_MEMORY;

    fn routing_name(device: &Self::Device) -> String {
        B::routing_name(device)
    }

    fn route(
        probs: Tensor<Self, 2>,
        logits: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<Route<Self>> {
        let route = B::route(
            probs.inner(),
            logits.inner(),
            selector,
            threshold.map(Tensor::inner),
        )?;
        Ok(route.map(Tensor::from_inner, Tensor::from_inner))
    }

    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        let (selected, rank) = B::select(probs.inner(), selector, threshold.map(Tensor::inner))?;
        Ok((Tensor::from_inner(selected), Tensor::from_inner(rank)))
    }
}

/// Without dtopp's WGSL kernels in the build, burn-wgpu routes with the default methods.
#[cfg(not(feature = "wgpu"))]
impl RoutingBackend for burn::backend::Wgpu {}

/// `selector` with its counts capped at `experts` (a cap past E caps nothing; the kernels'
/// contract wants `k`, `k_max` in `1..=E`).
pub(crate) fn within(selector: Selector, experts: usize) -> Selector {
    match selector {
        Selector::TopK(k) => Selector::TopK(k.clamp(1, experts)),
        Selector::TopP { threshold, k_max } => Selector::TopP {
            threshold,
            k_max: k_max.map(|k| k.clamp(1, experts)),
        },
    }
}

/// The selected mask and ranks ([`RoutingBackend::select`]) of a selection in the ops
/// contract's form, `experts` `[N, E]` (rank order, padded with -1) and `counts` `[N]`,
/// on the device: unselected experts get rank `E`.
pub(crate) fn mask_and_rank<B: Backend>(
    experts: Tensor<B, 2, Int>,
    counts: Tensor<B, 1, Int>,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let [n, e] = experts.dims();
    let device = experts.device();
    let slot = Tensor::<B, 1, Int>::arange(0..e as i64, &device)
        .reshape([1, e])
        .expand([n, e]);
    // Slot s of token i moves rank E - (E - s) = s onto its expert; padding adds 0.
    let taken = slot.clone().lower(counts.reshape([n, 1]).expand([n, e]));
    let shift = slot
        .sub_scalar(e as i64)
        .mask_fill(taken.clone().bool_not(), 0);
    let rank = Tensor::<B, 2, Int>::full([n, e], e as i64, &device).scatter(
        1,
        experts.clamp_min(0),
        shift,
        burn::tensor::IndexingUpdateOp::Add,
    );
    (rank.clone().lower_elem(e as i64).int(), rank)
}

/// A selection and plan made on the host, as the model's index tensors on `device`.
pub(crate) fn route_from_host<B: RowMovesBackend>(
    selection: &HostSelection,
    plan: &HostDispatchPlan,
    device: &B::Device,
) -> Route<B> {
    let (n, e) = (selection.shape.tokens, selection.shape.experts);
    let routes = plan.route_tokens.len();
    // Slots for the most experts any token of this batch took (the plan is on the host).
    let slots = selection.counts.iter().copied().max().unwrap_or(1).max(1) as usize;
    let with_slots = gathers::<B>();
    let mut sources = vec![0i64; routes];
    let mut route_of = vec![routes as i64; n * e];
    let mut token_slots = vec![routes as i64; if with_slots { n * slots } else { 0 }];
    for i in 0..n {
        for s in 0..selection.counts[i] as usize {
            let m = i64::from(plan.token_routes[i * e + s]);
            let j = selection.experts[i * e + s] as usize;
            sources[m as usize] = (i * e + j) as i64;
            route_of[i * e + j] = m;
            if with_slots {
                token_slots[i * slots + s] = m;
            }
        }
    }
    let tokens: Vec<i64> = plan.route_tokens.iter().map(|&t| i64::from(t)).collect();
    let rows = |v: Vec<i64>| Tensor::<B, 1, Int>::from_data(TensorData::new(v, [routes]), device);
    let table = |v: Vec<i64>, cols: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [n, cols]), device)
    };
    let route_of = table(route_of, e);
    Route {
        selected: route_of.clone().lower_elem(routes as i64).int(),
        row_tokens: rows(tokens),
        row_sources: rows(sources),
        row_of: route_of,
        token_slots: with_slots.then(|| table(token_slots, slots)),
        rows: ExpertRows::Exact {
            offsets: plan.expert_offsets.iter().map(|&o| o as usize).collect(),
        },
    }
}

/// A backend the trainer runs on: autodiff over a routing backend (training routes on
/// it; evaluation, on the model without autodiff, on the inner one).
pub trait TrainingBackend: AutodiffBackend<InnerBackend: RoutingBackend> + RoutingBackend {}

impl<B> TrainingBackend for B where B: AutodiffBackend<InnerBackend: RoutingBackend> + RoutingBackend
{}
