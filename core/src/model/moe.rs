//! The dropless MoE feed-forward block on burn tensors: router, DRN, selection, expert-major
//! dispatch, SwiGLU experts on contiguous slices, weighted combine. Gradients reach the
//! router weights, theta and every expert through the combine weights
//! `g_ij = P_ij / sum_{j in S_i} P_ij` (selection itself is not differentiable, as in the
//! spec).
//!
//! Selection and the plan run through the backend's routing ops
//! ([`super::RoutingBackend`]) on P where it is, in one of two layouts
//! ([`super::ExpertLayout`]): each expert on its exact slice of the routes (the experts'
//! `E + 1` offsets read by the host), or on padded buffers ([`super::padded_routing`]).

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::device_routing::read_ints;
use super::grouped_offsets::grouped_on_device;
use super::grouped_routing::route_grouped;
use super::layer_bounds::LayerBounds;
use super::long_reductions::column_sums;
use super::padded_routing::route_padded;
use super::precision::Precision;
use super::route::ExpertRows;
use super::routed_rows::{gather_rows, sum_rows};
use super::routing::Selector;
use super::routing_backend::RoutingBackend;
use super::swiglu::swiglu;
use crate::cpu::rank_experts;
use crate::error::Result;
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

/// A layer's selection, on the model's device.
#[derive(Clone, Debug)]
pub struct LayerRouting<B: Backend> {
    /// `[N, E]` 1 where the token selected the expert.
    pub selected: Tensor<B, 2, Int>,
    /// Set where the layer ran in the padded or grouped layout, which leaves the check to the
    /// trainer: `[1]` the first non-finite router logit, row-major, `N E` when none.
    pub first_bad: Option<Tensor<B, 1, Int>>,
}

/// One layer's routing counts: `[sum of k, histogram of k (k = 1..=E), load per expert]`.
pub type LayerCounts = Vec<u64>;

impl<B: Backend> LayerRouting<B> {
    /// `[N]` experts activated per token (a read-back).
    pub fn counts(&self) -> Result<Vec<i32>> {
        let [n, _] = self.selected.dims();
        let k = read_ints(self.selected.clone().sum_dim(1).reshape([n]))?;
        Ok(k.into_iter().map(|v| v as i32).collect())
    }

    /// `[N, E]` selected experts of each token in rank order (probability descending,
    /// ties to the lower index), padded with `-1`, given the layer's probabilities.
    pub fn ranked_experts(&self, probs: &[f32]) -> Result<Vec<i32>> {
        let [n, e] = self.selected.dims();
        let mask = read_ints(self.selected.clone())?;
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

    /// The layer's counts as a device tensor `[1 + 2E]` ([`LayerCounts`]), to be read
    /// together with the other layers'.
    pub fn device_counts(&self) -> Tensor<B, 1, Int> {
        let selected = &self.selected;
        let [n, e] = selected.dims();
        let device = selected.device();
        let k = selected.clone().sum_dim(1);
        let ks = Tensor::<B, 1, Int>::arange(1..e as i64 + 1, &device)
            .reshape([1, e])
            .expand([n, e]);
        let histogram = column_sums(k.clone().expand([n, e]).equal(ks).int());
        let load = column_sums(selected.clone());
        Tensor::cat(vec![k.sum(), histogram, load], 0)
    }
}

/// One dropless MoE layer on token rows `x` `[N, D]`. `threshold` (`[1]`, on the model's
/// device) replaces a Top-p selector's host threshold. With `bounds` the experts run in
/// the padded or grouped layout ([`super::ExpertLayout`]) `bounds` belong to, otherwise
/// on exact slices.
pub fn moe_forward<B: RoutingBackend>(
    x: Tensor<B, 2>,
    w: &MoeWeights<B>,
    use_drn: bool,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
    bounds: Option<LayerBounds>,
    precision: Precision,
) -> Result<MoeForward<B>> {
    let [n, d] = x.dims();
    let [e, _, _] = w.gate.dims();
    RouteShape::new(n, e)?;

    // Router and normalization (differentiable).
    let logits = B::dense_matmul(x.clone(), w.router.clone());
    let probs = if use_drn {
        B::drn(logits.clone(), w.theta.clone())
    } else {
        softmax(logits.clone(), 1)
    };

    // Selection and the rows' layout (the spec's rules), on the backend.
    let (p, z) = (probs.clone().detach(), logits.clone().detach());
    let route = match bounds {
        Some(LayerBounds::Padded(bounds)) => route_padded(p, z, selector, threshold, bounds)?,
        Some(LayerBounds::Grouped(bound)) => route_grouped(p, z, selector, threshold, bound)?,
        None => B::route(p, z, selector, threshold)?,
    };
    let rows = route.row_count();
    let device = x.device();

    // Combine weights from P (differentiable), read at each row. A padded or grouped
    // layout's empty rows read an appended zero, and take the zero row appended to x, so
    // that their expert outputs are exactly zero.
    let padded = !matches!(route.rows, ExpertRows::Exact { .. });
    // Only the padded layout appends (and allocates) its extra row.
    let append = |t: Tensor<B, 2>| {
        if padded {
            let width = t.dims()[1];
            Tensor::cat(vec![t, Tensor::zeros([1, width], &device)], 0)
        } else {
            t
        }
    };
    let append_unrouted = |t: Tensor<B, 2, Int>| {
        if padded {
            let width = t.dims()[1];
            Tensor::cat(vec![t, Tensor::full([1, width], rows as i64, &device)], 0)
        } else {
            t
        }
    };
    let renormalised = selected_share(probs.clone(), &route.row_of, rows).reshape([n * e, 1]);
    let g = gather_rows(
        append(renormalised),
        &route.row_sources,
        Some(&append_unrouted(route.row_of.clone().reshape([n * e, 1]))),
    )
    .reshape([rows]);

    // Dispatch: token rows in expert-major order, then the experts' SwiGLU products.
    let x_readers = route.token_slots.clone().map(append_unrouted);
    let xs = gather_rows(append(x), &route.row_tokens, x_readers.as_ref());
    let ys = match &route.rows {
        // Each expert on its contiguous slice.
        ExpertRows::Exact { offsets } => {
            let gate = B::grouped_matmul(xs.clone(), w.gate.clone(), offsets, precision);
            let up = B::grouped_matmul(xs, w.up.clone(), offsets, precision);
            B::grouped_matmul(swiglu(gate, up), w.down.clone(), offsets, precision)
        }
        // Each expert on its rows, the offsets read on the device.
        ExpertRows::Grouped { offsets, .. } => {
            let gate = grouped_on_device(xs.clone(), w.gate.clone(), offsets, precision);
            let up = grouped_on_device(xs, w.up.clone(), offsets, precision);
            grouped_on_device(swiglu(gate, up), w.down.clone(), offsets, precision)
        }
        // Every expert on its buffer of C rows, in one batched product.
        ExpertRows::Padded { capacity, .. } => {
            let xs = xs.reshape([e, *capacity, d]);
            let hidden = swiglu(
                precision.matmul(xs.clone(), w.gate.clone()),
                precision.matmul(xs, w.up.clone()),
            );
            precision.matmul(hidden, w.down.clone()).reshape([rows, d])
        }
    };

    // Combine: weighted rows added back to their tokens (an empty padded or grouped row adds its
    // zero output, with weight zero, to token N - 1).
    let to_token = if padded {
        route.row_tokens.clone().clamp_max(n as i64 - 1)
    } else {
        route.row_tokens.clone()
    };
    let output = sum_rows(ys, g, route.token_slots.as_ref(), &to_token, n);
    let first_bad = match route.rows {
        ExpertRows::Exact { .. } => None,
        ExpertRows::Padded { first_bad, .. } | ExpertRows::Grouped { first_bad, .. } => {
            Some(first_bad)
        }
    };
    Ok(MoeForward {
        output,
        logits,
        probs,
        routing: LayerRouting {
            selected: route.selected,
            first_bad,
        },
    })
}

/// `P` `[N, E]` renormalised over each token's selected experts: those whose row in
/// `row_of` is not `unrouted` (differentiable).
fn selected_share<B: Backend>(
    probs: Tensor<B, 2>,
    row_of: &Tensor<B, 2, Int>,
    unrouted: usize,
) -> Tensor<B, 2> {
    let kept = probs * row_of.clone().lower_elem(unrouted as i64).float();
    kept.clone() / kept.sum_dim(1)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::{LayerBounds, MoeWeights, Precision, Selector, moe_forward, read_ints};
    use crate::model::{ExpertBounds, RowBound};
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
        bounds: Option<LayerBounds>,
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
            bounds,
            Precision::F32,
        )
        .unwrap();
        let weights =
            Tensor::<B, 2>::from_data(TensorData::new(out_w.to_vec(), [5, 4]), &Default::default());
        // Experts per token, then routes per expert.
        let mut routing = fwd.routing.counts().unwrap();
        let load = read_ints(fwd.routing.selected.clone().sum_dim(0)).unwrap();
        routing.extend(load.into_iter().map(|c| c as i32));
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
        // The exact layout, padded buffers that hold every route (5 tokens, 4 experts)
        // and a grouped bound past the routes.
        let layouts = [
            None,
            Some(LayerBounds::Padded(ExpertBounds {
                capacity: 5,
                slots: 4,
            })),
            Some(LayerBounds::Grouped(RowBound { rows: 20, slots: 4 })),
        ];
        for (bounds, selector) in layouts
            .iter()
            .flat_map(|b| selectors.iter().map(move |s| (*b, *s)))
        {
            let t = tensors(&values, true);
            let (l, counts) = loss(&t, selector, bounds, &out_w);
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
                        let (l, c) = loss(&tensors(&v, false), selector, bounds, &out_w);
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
                        "{bounds:?} {selector:?} d/d{name}[{idx}]: autodiff {got}, finite difference {numeric}"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 80, "only {checked} gradient entries checked");
        }
    }
}
