//! The dropless MoE feed-forward block on burn tensors: router, DRN, selection, expert-major
//! dispatch, SwiGLU experts on contiguous slices, weighted combine. Gradients reach the
//! router weights, theta and every expert through the combine weights
//! `g_ij = P_ij / sum_{j in S_i} P_ij` (selection itself is not differentiable, as in the
//! spec).
//!
//! Selection and the plan run through the run's [`RouteEngine`]: a kernel engine (the CPU
//! reference, the WGSL or the CUDA kernels) on a host copy of P, or
//! [`RouteEngine::Device`] on P where it is ([`super::device_routing`]). Either way the
//! plan arrives as burn index tensors plus the experts' `E + 1` offsets on the host.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::device_routing::read_ints;
use super::drn::drn_probs;
use super::long_reductions::column_sums;
use super::padded_routing::{ExpertBounds, route_padded};
use super::precision::Precision;
use super::routed_rows::{RowMovesBackend, gather_rows, sum_rows};
use super::routing::{RouteEngine, Selector};
use super::routing_backend::{RoutingBackend, route_from_host};
use crate::cpu::rank_experts;
use crate::error::{Error, Result};
use crate::ops::RouteShape;

/// The weights of one MoE layer (`D` model width, `E` experts, `F` expert width).
#[derive(Clone, Debug)]
pub struct MoeWeights<B: Backend> {
    /// `[D, E]` router projection.
    pub router: Tensor<B, 2>,
    /// `[1]` the layer's DRN scale theta.
    pub theta: Tensor<B, 1>,
    /// `[E, D, F]` SwiGLU gate projections.
    pub gate: Tensor<B, 3>,
    /// `[E, D, F]` SwiGLU up projections.
    pub up: Tensor<B, 3>,
    /// `[E, F, D]` down projections.
    pub down: Tensor<B, 3>,
}

/// What one MoE forward pass produces.
#[derive(Clone, Debug)]
pub struct MoeForward<B: Backend> {
    /// `[N, D]` the combined expert outputs.
    pub output: Tensor<B, 2>,
    /// `[N, E]` raw router logits (for the z-loss).
    pub logits: Tensor<B, 2>,
    /// `[N, E]` routing probabilities (for the auxiliary losses).
    pub probs: Tensor<B, 2>,
    /// Which experts each token selected.
    pub routing: LayerRouting<B>,
}

/// A layer's selection: host arrays from a kernel engine, or a device mask.
#[derive(Clone, Debug)]
pub enum LayerRouting<B: Backend> {
    /// Read back from a kernel engine.
    Host {
        /// `[N, E]` selected experts of each token in rank order, padded with `-1`.
        experts: Vec<i32>,
        /// `[N]` experts activated per token.
        counts: Vec<i32>,
        /// `[E]` tokens routed to each expert.
        expert_load: Vec<i32>,
    },
    /// Kept on the model's device ([`RouteEngine::Device`], [`RouteEngine::DevicePadded`]).
    Device {
        /// `[N, E]` 1 where the token selected the expert.
        selected: Tensor<B, 2, Int>,
        /// Set where the layer ran in the padded layout, which leaves the check to the
        /// trainer: `[1]` the first non-finite router logit, row-major, `N E` when none.
        first_bad: Option<Tensor<B, 1, Int>>,
    },
}

/// One layer's routing counts: `[sum of k, histogram of k (k = 1..=E), load per expert]`.
pub type LayerCounts = Vec<u64>;

impl<B: Backend> LayerRouting<B> {
    /// `[N]` experts activated per token (a read-back for the device form).
    pub fn counts(&self) -> Result<Vec<i32>> {
        match self {
            LayerRouting::Host { counts, .. } => Ok(counts.clone()),
            LayerRouting::Device { selected, .. } => {
                let [n, _] = selected.dims();
                let k = read_ints(selected.clone().sum_dim(1).reshape([n]))?;
                Ok(k.into_iter().map(|v| v as i32).collect())
            }
        }
    }

    /// `[N, E]` selected experts of each token in rank order (probability descending,
    /// ties to the lower index), padded with `-1`, given the layer's probabilities.
    pub fn ranked_experts(&self, probs: &[f32]) -> Result<Vec<i32>> {
        match self {
            LayerRouting::Host { experts, .. } => Ok(experts.clone()),
            LayerRouting::Device { selected, .. } => {
                let [n, e] = selected.dims();
                let mask = read_ints(selected.clone())?;
                let mut experts = vec![-1i32; n * e];
                for i in 0..n {
                    let chosen = rank_experts(&probs[i * e..(i + 1) * e])
                        .into_iter()
                        .filter(|&j| mask[i * e + j] != 0);
                    for (slot, j) in chosen.enumerate() {
                        experts[i * e + slot] = j as i32;
                    }
                }
                Ok(experts)
            }
        }
    }

    /// The layer's counts on the host ([`LayerCounts`]).
    pub fn host_counts(&self, experts: usize) -> Option<LayerCounts> {
        match self {
            LayerRouting::Host {
                counts,
                expert_load,
                ..
            } => {
                let mut out = vec![0u64; 1 + 2 * experts];
                for &k in counts {
                    out[0] += k as u64;
                    out[k as usize] += 1;
                }
                for (sum, &c) in out[1 + experts..].iter_mut().zip(expert_load) {
                    *sum += c as u64;
                }
                Some(out)
            }
            LayerRouting::Device { .. } => None,
        }
    }

    /// The layer's counts as a device tensor `[1 + 2E]` ([`LayerCounts`]), to be read
    /// together with the other layers'.
    pub fn device_counts(&self) -> Option<Tensor<B, 1, Int>> {
        let LayerRouting::Device { selected, .. } = self else {
            return None;
        };
        let [n, e] = selected.dims();
        let device = selected.device();
        let k = selected.clone().sum_dim(1);
        let ks = Tensor::<B, 1, Int>::arange(1..e as i64 + 1, &device)
            .reshape([1, e])
            .expand([n, e]);
        let histogram = column_sums(k.clone().expand([n, e]).equal(ks).int());
        let load = column_sums(selected.clone());
        Some(Tensor::cat(vec![k.sum(), histogram, load], 0))
    }
}

/// The dispatch plan as the model uses it: both directions of each map, so that moving
/// rows either way differentiates into a gather ([`super::routed_rows`]).
struct Plan<B: Backend> {
    /// `[M]` token of each route (expert-major).
    route_tokens: Tensor<B, 1, Int>,
    /// `[M]` flat index `i * E + j` into P of each route.
    route_sources: Tensor<B, 1, Int>,
    /// `[N, E]` route of each (token, expert), `M` where not selected.
    route_of: Tensor<B, 2, Int>,
    /// `[N, S]` each token's routes, padded with `M`; built only where rows move by
    /// gathers ([`super::routed_rows::gathers`]), the only users.
    token_slots: Option<Tensor<B, 2, Int>>,
    expert_offsets: Vec<usize>,
    routing: LayerRouting<B>,
}

/// Selection and plan through a kernel engine, on a host copy of P.
fn plan_on_host<B: RowMovesBackend>(
    probs: &Tensor<B, 2>,
    engine: &RouteEngine,
    selector: Selector,
) -> Result<Plan<B>> {
    let device = probs.device();
    let [n, e] = probs.dims();
    crate::host_reads::count(1);
    let host: Vec<f32> = probs
        .clone()
        .into_data()
        .to_vec()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("{e:?}"),
        })?;
    let (selection, plan) = engine.route(&host, RouteShape::new(n, e)?, selector)?;
    let route = route_from_host::<B>(&selection, &plan, &device);
    Ok(Plan {
        route_tokens: route.route_tokens,
        route_sources: route.route_sources,
        route_of: route.route_of,
        token_slots: route.token_slots,
        expert_offsets: route.expert_offsets,
        routing: LayerRouting::Host {
            experts: selection.experts,
            counts: selection.counts,
            expert_load: plan.expert_counts,
        },
    })
}

/// One dropless MoE layer on token rows `x` `[N, D]`. `threshold` (`[1]`, on the model's
/// device) replaces a Top-p selector's host threshold; only the device engines take one.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward<B: RoutingBackend>(
    x: Tensor<B, 2>,
    w: &MoeWeights<B>,
    use_drn: bool,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
    engine: &RouteEngine,
    bounds: Option<ExpertBounds>,
    precision: Precision,
) -> Result<MoeForward<B>> {
    let [n, _] = x.dims();
    let [e, _, _] = w.gate.dims();
    RouteShape::new(n, e)?;

    // Router and normalization (differentiable).
    let logits = x.clone().matmul(w.router.clone());
    let probs = if use_drn {
        drn_probs(logits.clone(), w.theta.clone())
    } else {
        softmax(logits.clone(), 1)
    };
    if let (RouteEngine::DevicePadded, Some(bounds)) = (engine, bounds) {
        return moe_padded(x, w, logits, probs, selector, threshold, bounds, precision);
    }

    // Selection and plan (the spec's rules), through the run's engine.
    let plan = match engine {
        RouteEngine::Device | RouteEngine::DevicePadded => {
            let route = B::route(
                probs.clone().detach(),
                logits.clone().detach(),
                selector,
                threshold,
            )?;
            Plan {
                route_tokens: route.route_tokens,
                route_sources: route.route_sources,
                route_of: route.route_of,
                token_slots: route.token_slots,
                expert_offsets: route.expert_offsets,
                routing: LayerRouting::Device {
                    selected: route.selected,
                    first_bad: None,
                },
            }
        }
        _ if threshold.is_some() => {
            return Err(Error::param(
                "route engine",
                engine.describe(),
                "a device engine (--route-on device or device-padded) for a threshold held on the device",
            ));
        }
        _ => plan_on_host(&probs, engine, selector)?,
    };
    let route_tokens = plan.route_tokens;
    let routes = route_tokens.dims()[0];

    // Combine weights from P (differentiable), read at each route.
    let renormalised = selected_share(probs.clone(), &plan.route_of, routes);
    let g = gather_rows(
        renormalised.reshape([n * e, 1]),
        &plan.route_sources,
        Some(&plan.route_of.reshape([n * e, 1])),
    )
    .reshape([routes]);

    // Dispatch: token rows in expert-major order; each expert on its contiguous slice.
    let xs = gather_rows(x, &route_tokens, plan.token_slots.as_ref());
    let offsets = &plan.expert_offsets;
    let gate = B::grouped_matmul(xs.clone(), w.gate.clone(), offsets, precision);
    let up = B::grouped_matmul(xs, w.up.clone(), offsets, precision);
    let ys = B::grouped_matmul(silu(gate) * up, w.down.clone(), offsets, precision);

    // Combine: weighted rows added back to their tokens.
    let output = sum_rows(ys, g, plan.token_slots.as_ref(), &route_tokens, n);
    Ok(MoeForward {
        output,
        logits,
        probs,
        routing: plan.routing,
    })
}

/// `P` `[N, E]` renormalised over each token's selected experts: those whose route in
/// `route_of` is not `unrouted` (differentiable).
fn selected_share<B: Backend>(
    probs: Tensor<B, 2>,
    route_of: &Tensor<B, 2, Int>,
    unrouted: usize,
) -> Tensor<B, 2> {
    let kept = probs * route_of.clone().lower_elem(unrouted as i64).float();
    kept.clone() / kept.sum_dim(1)
}

/// [`moe_forward`] in the padded layout ([`super::padded_routing`]): every expert on a
/// buffer of `bounds.capacity` rows in one batched product, nothing read back.
#[allow(clippy::too_many_arguments)]
fn moe_padded<B: RoutingBackend>(
    x: Tensor<B, 2>,
    w: &MoeWeights<B>,
    logits: Tensor<B, 2>,
    probs: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
    bounds: ExpertBounds,
    precision: Precision,
) -> Result<MoeForward<B>> {
    let [n, d] = x.dims();
    let [e, _, _] = w.gate.dims();
    let (c, s) = (bounds.capacity, bounds.slots);
    let rows = e * c;
    let device = x.device();
    let route = route_padded(
        probs.clone().detach(),
        logits.clone().detach(),
        selector,
        threshold,
        bounds,
    )?;

    // Combine weights, as in the exact layout; an empty row reads the appended zero.
    let renormalised = selected_share(probs.clone(), &route.row_of, rows).reshape([n * e, 1]);
    let renormalised = Tensor::cat(vec![renormalised, Tensor::zeros([1, 1], &device)], 0);
    let readers = Tensor::cat(
        vec![
            route.row_of.clone().reshape([n * e, 1]),
            Tensor::full([1, 1], rows as i64, &device),
        ],
        0,
    );
    let g = gather_rows(renormalised, &route.row_sources, Some(&readers)).reshape([rows]);

    // Dispatch into the buffers: empty rows read the appended zero row of x, so their
    // expert outputs are exactly zero.
    let x = Tensor::cat(vec![x, Tensor::zeros([1, d], &device)], 0);
    let x_readers = route
        .token_slots
        .clone()
        .map(|slots| Tensor::cat(vec![slots, Tensor::full([1, s], rows as i64, &device)], 0));
    let xs = gather_rows(x, &route.row_tokens, x_readers.as_ref()).reshape([e, c, d]);
    let hidden =
        silu(precision.matmul(xs.clone(), w.gate.clone())) * precision.matmul(xs, w.up.clone());
    let ys = precision.matmul(hidden, w.down.clone()).reshape([rows, d]);

    // Combine: an empty row adds its zero output, with weight zero, to token N - 1.
    let to_token = route.row_tokens.clamp_max(n as i64 - 1);
    let output = sum_rows(ys, g, route.token_slots.as_ref(), &to_token, n);
    Ok(MoeForward {
        output,
        logits,
        probs,
        routing: LayerRouting::Device {
            selected: route.selected,
            first_bad: Some(route.first_bad),
        },
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::{
        LayerRouting, MoeWeights, Precision, RouteEngine, Selector, moe_forward, read_ints,
    };
    use crate::cpu_fast::CpuFast;
    use crate::rng::SplitMix64;

    type B = Autodiff<NdArray>;

    const SHAPES: [[usize; 3]; 6] = [
        [5, 4, 1],
        [4, 3, 1],
        [1, 1, 1],
        [3, 4, 3],
        [3, 4, 3],
        [3, 3, 4],
    ];

    /// x [N, D], router [D, E], theta [1], gate [E, D, F], up [E, D, F], down [E, F, D].
    fn tensors(values: &[Vec<f32>], grad: bool) -> Vec<Tensor<B, 3>> {
        let device = Default::default();
        values
            .iter()
            .zip(SHAPES)
            .map(|(v, s)| {
                let t = Tensor::<B, 3>::from_data(TensorData::new(v.clone(), s), &device);
                if grad { t.require_grad() } else { t }
            })
            .collect()
    }

    /// The loss and the routing it took (counts per token, then load per expert).
    fn loss(
        t: &[Tensor<B, 3>],
        selector: Selector,
        engine: &RouteEngine,
        out_w: &[f32],
    ) -> (Tensor<B, 1>, Vec<i32>) {
        let w = MoeWeights {
            router: t[1].clone().reshape([4, 3]),
            theta: t[2].clone().reshape([1]),
            gate: t[3].clone(),
            up: t[4].clone(),
            down: t[5].clone(),
        };
        let fwd = moe_forward(
            t[0].clone().reshape([5, 4]),
            &w,
            true,
            selector,
            None,
            engine,
            None,
            Precision::F32,
        )
        .unwrap();
        let weights =
            Tensor::<B, 2>::from_data(TensorData::new(out_w.to_vec(), [5, 4]), &Default::default());
        // Experts per token, then routes per expert.
        let mut routing = fwd.routing.counts().unwrap();
        let load = match &fwd.routing {
            LayerRouting::Host { expert_load, .. } => expert_load.clone(),
            LayerRouting::Device { selected, .. } => read_ints(selected.clone().sum_dim(0))
                .unwrap()
                .into_iter()
                .map(|c| c as i32)
                .collect(),
        };
        routing.extend(load);
        ((fwd.output * weights).sum(), routing)
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = SplitMix64::new(11);
        let mut values: Vec<Vec<f32>> = SHAPES
            .iter()
            .map(|s| {
                (0..s.iter().product::<usize>())
                    .map(|_| rng.normal() as f32)
                    .collect()
            })
            .collect();
        values[2] = vec![1.3]; // theta
        let out_w: Vec<f32> = (0..20).map(|_| rng.normal() as f32).collect();
        let selectors = [
            Selector::TopK(2),
            Selector::TopP {
                threshold: 0.7,
                k_max: None,
            },
        ];
        let engines = [RouteEngine::Cpu(CpuFast), RouteEngine::Device];
        for (engine, selector) in engines
            .iter()
            .flat_map(|e| selectors.iter().map(move |s| (e, *s)))
        {
            let t = tensors(&values, true);
            let (l, counts) = loss(&t, selector, engine, &out_w);
            assert!(counts[..5].iter().all(|&k| k >= 1));
            let grads = l.backward();
            let names = ["x", "router", "theta", "gate", "up", "down"];
            let mut checked = 0;
            for (which, name) in names.iter().enumerate() {
                let analytic: Vec<f32> = t[which]
                    .grad(&grads)
                    .expect("gradient reaches it")
                    .into_data()
                    .to_vec()
                    .unwrap();
                for idx in 0..values[which].len() {
                    let h = 1e-2f32;
                    let eval = |delta: f32| {
                        let mut v = values.clone();
                        v[which][idx] += delta;
                        let (l, c) = loss(&tensors(&v, false), selector, engine, &out_w);
                        (f64::from(l.into_data().to_vec::<f32>().unwrap()[0]), c)
                    };
                    let ((lp, cp), (lm, cm)) = (eval(h), eval(-h));
                    if cp != counts || cm != counts {
                        continue; // the step changed the selection: not differentiable there
                    }
                    let numeric = (lp - lm) / (2.0 * f64::from(h));
                    let got = f64::from(analytic[idx]);
                    assert!(
                        (numeric - got).abs() <= 5e-3 + 3e-2 * numeric.abs(),
                        "{engine:?} {selector:?} d/d{name}[{idx}]: autodiff {got}, finite difference {numeric}"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 80, "only {checked} gradient entries checked");
        }
    }
}
