//! The routing-ops contract: one trait every backend implements (the CPU reference, the
//! WGSL kernels, the CUDA kernels), and the plain data types that flow between its ops.
//!
//! # Shape legend
//! - `N`: tokens in the batch, `E`: experts in the layer, `D`: hidden size of a token row,
//! - `C`: route capacity of a dispatch plan (`C >= M`, where `M = sum_i k_i` is the number
//!   of routes actually taken).
//!
//! All arrays are dense, row-major, `f32` or `i32`. A backend keeps them in its own buffer
//! types (`RoutingOps::Floats`, `RoutingOps::Ints`); the host sees them only through
//! `upload_*` / `read_*`, so a GPU backend can chain ops without host round trips.
//!
//! # The rules every backend follows
//! - **Order and ties.** Experts of a token are ranked by probability, descending; equal
//!   probabilities rank the lower expert index first.
//! - **Top-p.** `k_i` is the smallest `k` whose `k` top-ranked probabilities, summed in rank
//!   order in `f32`, reach `p` (`>= p`). So at least one expert is selected and the expert
//!   that crosses `p` is included. If rounding keeps the sum below `p` (possible for
//!   `p = 1`), all `E` experts are selected. An optional `k_max` caps `k_i`.
//! - **Combine weights.** `g_ij = P_ij / sum_{j in S_i} P_ij` over the selected set,
//!   aligned with the selected experts; padding slots hold expert `-1` and weight `0`.
//! - **Non-finite input.** Logits and probabilities must be finite. An op that meets a
//!   NaN or infinity fails with [`Error::NonFinite`] naming the first offending element in
//!   row-major order; it never produces a routing from it. The CPU fails in the op
//!   itself; a device backend, which must not wait for the device inside a routing step,
//!   fails when the result, or anything computed from it, is read back.
//! - **Dispatch plan.** Routes are ordered by expert, then by token id ascending (stable,
//!   deterministic); dropless: every selected (token, expert) pair gets a route.

use serde::{Deserialize, Serialize};

use crate::controller::ControllerConfig;
use crate::error::{Error, Result};

/// `eps` inside DRN's standard deviation: `sigma = sqrt(var + eps)`.
pub const DRN_EPS: f32 = 1e-6;

/// The size of a routing problem: `N` tokens routed over `E` experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteShape {
    /// `N`, tokens in the batch (at least 1).
    pub tokens: usize,
    /// `E`, experts in the layer (at least 1).
    pub experts: usize,
}

impl RouteShape {
    /// A shape with `tokens >= 1` and `experts >= 1`.
    pub fn new(tokens: usize, experts: usize) -> Result<Self> {
        if tokens == 0 || experts == 0 {
            return Err(Error::shape(
                "RouteShape",
                format!("need at least one token and one expert, got N={tokens}, E={experts}"),
            ));
        }
        Ok(Self { tokens, experts })
    }

    /// `N * E`, the length of a `[N, E]` array.
    pub fn len(&self) -> usize {
        self.tokens * self.experts
    }

    /// Always false: a `RouteShape` holds at least one element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How router logits become probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Normalization {
    /// Dynamic Routing Normalization: per token, standardize over experts, multiply by the
    /// layer's learnable scale `theta`, then softmax.
    Drn {
        /// The layer's scale `theta_l` (finite).
        theta: f32,
    },
    /// Plain softmax of the raw logits (the `dtopp-no-drn` ablation and the baselines).
    Softmax,
}

impl Normalization {
    /// The DRN scale, checked finite; `None` for plain softmax.
    pub fn theta(self) -> Result<Option<f32>> {
        match self {
            Self::Drn { theta } if !theta.is_finite() => {
                Err(Error::param("theta", theta, "a finite DRN scale"))
            }
            Self::Drn { theta } => Ok(Some(theta)),
            Self::Softmax => Ok(None),
        }
    }
}

/// Which experts each token uses. Arrays are `[N, E]` with the `k_i` selected experts of
/// token `i` first, in rank order, then padding.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection<F, I> {
    /// The routing problem's size.
    pub shape: RouteShape,
    /// An upper bound on every `k_i` known without reading the counts (`k` for Top-k,
    /// `k_max` or `E` for Top-p): device backends size the dispatch plan by `N * k_bound`.
    pub k_bound: usize,
    /// `[N, E]` i32: selected expert ids in descending probability, padded with `-1`.
    pub experts: I,
    /// `[N, E]` f32: combine weights aligned with `experts`, `0` in padding slots.
    pub weights: F,
    /// `[N]` i32: `k_i`, the number of selected experts of each token (`1..=E`).
    pub counts: I,
}

/// The expert-major execution plan of a selection (dropless).
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchPlan<F, I> {
    /// The routing problem's size.
    pub shape: RouteShape,
    /// `C`, the length of the route arrays. `C >= M`; entries past `M` are unspecified.
    /// Device backends may size buffers by a bound (`N * k_max`) to avoid reading `M`.
    pub route_capacity: usize,
    /// `[E]` i32: `c_e`, the number of tokens routed to expert `e`.
    pub expert_counts: I,
    /// `[E + 1]` i32: exclusive prefix sum of `expert_counts`; expert `e` owns routes
    /// `offsets[e]..offsets[e + 1]`, and `offsets[E] = M`.
    pub expert_offsets: I,
    /// `[C]` i32: the token of each route, ascending within each expert's slice.
    pub route_tokens: I,
    /// `[C]` f32: the combine weight `g_ij` of each route.
    pub route_weights: F,
    /// `[N, E]` i32: for token `i` and its selection slot `s`, the route index `m`; `-1`
    /// in padding slots. Lets combine gather per token (no float atomics needed).
    pub token_routes: I,
}

/// Routing probabilities and the selection made from them ([`RoutingOps::drn_top_p`],
/// [`RoutingOps::drn_top_k`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Routed<F, I> {
    /// `[N, E]` f32: what [`RoutingOps::drn_forward`] returns.
    pub probs: F,
    /// What the selection op returns on those probabilities.
    pub selection: Selection<F, I>,
}

/// Gradients of a DRN (or softmax) forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct DrnGrads<F> {
    /// `[N, E]` f32: dL/dz for the router logits.
    pub logits: F,
    /// `[1]` f32: dL/dtheta summed over all tokens (`0` for [`Normalization::Softmax`]).
    pub theta: F,
}

/// A selection held in host memory.
pub type HostSelection = Selection<Vec<f32>, Vec<i32>>;
/// A dispatch plan held in host memory, its route arrays cut to `M`.
pub type HostDispatchPlan = DispatchPlan<Vec<f32>, Vec<i32>>;

/// Every routing op, on one backend's buffers. The documentation of each method is the
/// contract; `crate::cpu::CpuReference` is its executable specification.
pub trait RoutingOps {
    /// The backend's buffer of `f32` values.
    type Floats;
    /// The backend's buffer of `i32` values.
    type Ints;

    /// A short name for messages and benchmarks (`"cpu"`, `"wgpu"`, `"cuda"`).
    fn backend_name(&self) -> &'static str;

    /// Copies host values into a new buffer.
    fn upload_floats(&self, data: &[f32]) -> Result<Self::Floats>;
    /// Copies host values into a new buffer.
    fn upload_ints(&self, data: &[i32]) -> Result<Self::Ints>;
    /// Copies a buffer back to the host (waits for pending work).
    fn read_floats(&self, buffer: &Self::Floats) -> Result<Vec<f32>>;
    /// Copies a buffer back to the host (waits for pending work).
    fn read_ints(&self, buffer: &Self::Ints) -> Result<Vec<i32>>;

    /// Routing probabilities `P` `[N, E]` from logits `z` `[N, E]`:
    /// DRN: `P_i = softmax(theta * (z_i - mu_i) / sqrt(var_i + DRN_EPS))`; or plain softmax.
    /// Fails on a non-finite logit or a non-finite `theta`.
    fn drn_forward(
        &self,
        logits: &Self::Floats,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<Self::Floats>;

    /// Backward of [`RoutingOps::drn_forward`]: given the logits, the probabilities it
    /// returned and dL/dP `[N, E]`, returns dL/dz `[N, E]` and dL/dtheta.
    fn drn_backward(
        &self,
        logits: &Self::Floats,
        probs: &Self::Floats,
        grad_probs: &Self::Floats,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<Self::Floats>>;

    /// Top-p selection on probabilities `[N, E]` with the threshold `p` read from the
    /// first element of a device buffer (so the state of a device-resident controller,
    /// whose first element is `p`, feeds it without a host round trip). `p` must be in
    /// `(0, 1]`; `k_max`, if given, in `1..=E`.
    fn top_p(
        &self,
        probs: &Self::Floats,
        shape: RouteShape,
        threshold: &Self::Floats,
        k_max: Option<usize>,
    ) -> Result<Selection<Self::Floats, Self::Ints>>;

    /// Top-k selection: the `k` top-ranked experts of every token, `k` in `1..=E`.
    fn top_k(
        &self,
        probs: &Self::Floats,
        shape: RouteShape,
        k: usize,
    ) -> Result<Selection<Self::Floats, Self::Ints>>;

    /// [`RoutingOps::drn_forward`] then [`RoutingOps::top_p`] in one call: the same
    /// results and errors as the two calls, which a device backend may fuse into one
    /// kernel (CUDA: one pass per token for `E <= 256`).
    fn drn_top_p(
        &self,
        logits: &Self::Floats,
        shape: RouteShape,
        norm: Normalization,
        threshold: &Self::Floats,
        k_max: Option<usize>,
    ) -> Result<Routed<Self::Floats, Self::Ints>> {
        let probs = self.drn_forward(logits, shape, norm)?;
        let selection = self.top_p(&probs, shape, threshold, k_max)?;
        Ok(Routed { probs, selection })
    }

    /// [`RoutingOps::drn_forward`] then [`RoutingOps::top_k`] in one call (fused like
    /// [`RoutingOps::drn_top_p`]).
    fn drn_top_k(
        &self,
        logits: &Self::Floats,
        shape: RouteShape,
        norm: Normalization,
        k: usize,
    ) -> Result<Routed<Self::Floats, Self::Ints>> {
        let probs = self.drn_forward(logits, shape, norm)?;
        let selection = self.top_k(&probs, shape, k)?;
        Ok(Routed { probs, selection })
    }

    /// The expert-major dispatch plan of a selection.
    fn dispatch_plan(
        &self,
        selection: &Selection<Self::Floats, Self::Ints>,
    ) -> Result<DispatchPlan<Self::Floats, Self::Ints>>;

    /// Gathers token rows `x` `[N, D]` into route order: `out[m] = x[route_tokens[m]]`,
    /// `[C, D]` (rows past `M` unspecified).
    fn gather(
        &self,
        x: &Self::Floats,
        hidden: usize,
        plan: &DispatchPlan<Self::Floats, Self::Ints>,
    ) -> Result<Self::Floats>;

    /// Combines expert outputs `y` `[C, D]` back per token:
    /// `out[i] = sum over slots s of route_weights[m] * y[m]`, `m = token_routes[i, s]`,
    /// summed in slot order. Returns `[N, D]`.
    fn combine(
        &self,
        y: &Self::Floats,
        hidden: usize,
        plan: &DispatchPlan<Self::Floats, Self::Ints>,
    ) -> Result<Self::Floats>;

    /// One update of a device-resident PI controller (the math of
    /// [`crate::controller::PiController::update`] in `f32`): `state` is
    /// `[p, p_0, integral, last_error, step]` (see [`crate::controller::device_state`]);
    /// `counts` are the per-token expert counts of every layer of the step, whose mean
    /// is `a_t`. The next [`RoutingOps::top_p`] can read `state` as its threshold.
    fn controller_update(
        &self,
        state: &mut Self::Floats,
        counts: &Self::Ints,
        config: &ControllerConfig,
    ) -> Result<()>;

    /// Waits until all submitted work has finished (benchmarks time ops with it). The CPU
    /// has nothing to wait for.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Reads a selection back to the host.
    fn read_selection(
        &self,
        selection: &Selection<Self::Floats, Self::Ints>,
    ) -> Result<HostSelection> {
        Ok(Selection {
            shape: selection.shape,
            k_bound: selection.k_bound,
            experts: self.read_ints(&selection.experts)?,
            weights: self.read_floats(&selection.weights)?,
            counts: self.read_ints(&selection.counts)?,
        })
    }

    /// Reads a dispatch plan back to the host, its route arrays cut to `M = offsets[E]`.
    fn read_plan(&self, plan: &DispatchPlan<Self::Floats, Self::Ints>) -> Result<HostDispatchPlan> {
        let expert_offsets = self.read_ints(&plan.expert_offsets)?;
        let routes = expert_offsets
            .last()
            .map(|&m| usize::try_from(m).unwrap_or(0))
            .unwrap_or(0);
        let mut route_tokens = self.read_ints(&plan.route_tokens)?;
        let mut route_weights = self.read_floats(&plan.route_weights)?;
        if routes > route_tokens.len() || routes > route_weights.len() {
            return Err(Error::shape(
                "read_plan",
                format!(
                    "offsets[E] = {routes} routes but the route arrays hold {} and {}",
                    route_tokens.len(),
                    route_weights.len()
                ),
            ));
        }
        route_tokens.truncate(routes);
        route_weights.truncate(routes);
        Ok(DispatchPlan {
            shape: plan.shape,
            route_capacity: routes,
            expert_counts: self.read_ints(&plan.expert_counts)?,
            expert_offsets,
            route_tokens,
            route_weights,
            token_routes: self.read_ints(&plan.token_routes)?,
        })
    }
}

/// Checks that a host array has the length its shape implies.
pub(crate) fn check_len(op: &'static str, name: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{name} has {len} elements, expected {expected}"),
        ))
    }
}

/// Checks a Top-k count `k` in `1..=E`.
pub fn check_k(k: usize, experts: usize) -> Result<()> {
    if k == 0 || k > experts {
        return Err(Error::param(
            "k",
            k,
            format!("a count in 1..={experts} (the number of experts)"),
        ));
    }
    Ok(())
}

/// Checks `p` in `(0, 1]`.
pub fn check_threshold(p: f32) -> Result<()> {
    if p.is_finite() && p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(Error::param("threshold p", p, "a value in (0, 1]"))
    }
}

/// Checks an optional cap `k_max` in `1..=E`.
pub fn check_k_max(k_max: Option<usize>, experts: usize) -> Result<()> {
    match k_max {
        Some(k) if k == 0 || k > experts => Err(Error::param(
            "k_max",
            k,
            format!("a cap in 1..={experts} (the number of experts)"),
        )),
        _ => Ok(()),
    }
}
