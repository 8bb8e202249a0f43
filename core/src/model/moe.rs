//! The dropless MoE feed-forward block on burn tensors: router, DRN, selection through
//! the CPU reference's ops, expert-major dispatch, SwiGLU experts on contiguous slices,
//! weighted combine. Gradients reach the router weights, theta and every expert through
//! the combine weights `g_ij = P_ij / sum_{j in S_i} P_ij` (selection itself is not
//! differentiable, as in the spec).
//!
//! Selection and the plan run through the run's [`RouteEngine`] (the CPU reference or
//! the WGSL kernels) on a host copy of P: one read-back of P per layer.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::drn::drn_probs;
use super::precision::Precision;
use super::routing::{RouteEngine, Selector};
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
    /// `[N, E]` selected experts of each token in rank order, padded with `-1`.
    pub experts: Vec<i32>,
    /// `[N]` experts activated per token.
    pub counts: Vec<i32>,
    /// `[E]` tokens routed to each expert.
    pub expert_load: Vec<i32>,
}

fn ints<B: Backend>(values: &[i32], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = values.iter().map(|&x| i64::from(x)).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}

/// One dropless MoE layer on token rows `x` `[N, D]`.
pub fn moe_forward<B: Backend>(
    x: Tensor<B, 2>,
    w: &MoeWeights<B>,
    use_drn: bool,
    selector: Selector,
    engine: &RouteEngine,
    precision: Precision,
) -> Result<MoeForward<B>> {
    let device = x.device();
    let [n, d] = x.dims();
    let [e, _, f] = w.gate.dims();
    let shape = RouteShape::new(n, e)?;

    // Router and normalization (differentiable).
    let logits = x.clone().matmul(w.router.clone());
    let probs = if use_drn {
        drn_probs(logits.clone(), w.theta.clone())
    } else {
        softmax(logits.clone(), 1)
    };

    // Selection and plan through the run's routing ops (the spec's rules, exactly).
    let host: Vec<f32> = probs
        .clone()
        .into_data()
        .to_vec()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("{e:?}"),
        })?;
    let (selection, plan) = engine.route(&host, shape, selector)?;
    let routes = plan.route_tokens.len();

    // Combine weights from P (differentiable): P at each route, renormalised per token.
    let mut flat = vec![0i32; routes];
    for i in 0..n {
        for s in 0..selection.counts[i] as usize {
            let m = plan.token_routes[i * e + s] as usize;
            flat[m] = (i * e) as i32 + selection.experts[i * e + s];
        }
    }
    let route_tokens = ints::<B>(&plan.route_tokens, &device);
    let p_route = probs
        .clone()
        .reshape([n * e])
        .select(0, ints::<B>(&flat, &device));
    let mass = Tensor::<B, 1>::zeros([n], &device).select_assign(
        0,
        route_tokens.clone(),
        p_route.clone(),
        IndexingUpdateOp::Add,
    );
    let g = p_route / mass.select(0, route_tokens.clone());

    // Dispatch: token rows in expert-major order; each expert on its contiguous slice.
    let xs = x.select(0, route_tokens.clone());
    let mut outputs = Vec::new();
    for j in 0..e {
        let (start, end) = (
            plan.expert_offsets[j] as usize,
            plan.expert_offsets[j + 1] as usize,
        );
        if start == end {
            continue;
        }
        let rows = xs.clone().slice([start..end, 0..d]);
        let gate = w.gate.clone().slice([j..j + 1, 0..d, 0..f]).reshape([d, f]);
        let up = w.up.clone().slice([j..j + 1, 0..d, 0..f]).reshape([d, f]);
        let down = w.down.clone().slice([j..j + 1, 0..f, 0..d]).reshape([f, d]);
        let hidden = silu(precision.matmul(rows.clone(), gate)) * precision.matmul(rows, up);
        outputs.push(precision.matmul(hidden, down));
    }
    let ys = Tensor::cat(outputs, 0);

    // Combine: weighted rows added back to their tokens.
    let weighted = ys * g.unsqueeze_dim::<2>(1);
    let output = Tensor::<B, 2>::zeros([n, d], &device).select_assign(
        0,
        route_tokens,
        weighted,
        IndexingUpdateOp::Add,
    );
    Ok(MoeForward {
        output,
        logits,
        probs,
        experts: selection.experts,
        counts: selection.counts,
        expert_load: plan.expert_counts,
    })
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::{MoeWeights, Precision, RouteEngine, Selector, moe_forward};
    use crate::cpu::CpuReference;
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
    fn loss(t: &[Tensor<B, 3>], selector: Selector, out_w: &[f32]) -> (Tensor<B, 1>, Vec<i32>) {
        let w = MoeWeights {
            router: t[1].clone().reshape([4, 3]),
            theta: t[2].clone().reshape([1]),
            gate: t[3].clone(),
            up: t[4].clone(),
            down: t[5].clone(),
        };
        let engine = RouteEngine::Cpu(CpuReference);
        let fwd = moe_forward(
            t[0].clone().reshape([5, 4]),
            &w,
            true,
            selector,
            &engine,
            Precision::F32,
        )
        .unwrap();
        let weights =
            Tensor::<B, 2>::from_data(TensorData::new(out_w.to_vec(), [5, 4]), &Default::default());
        let routing = fwd.counts.into_iter().chain(fwd.expert_load).collect();
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
        for selector in [
            Selector::TopK(2),
            Selector::TopP {
                threshold: 0.7,
                k_max: None,
            },
        ] {
            let t = tensors(&values, true);
            let (l, counts) = loss(&t, selector, &out_w);
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
                        let (l, c) = loss(&tensors(&v, false), selector, &out_w);
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
                        "{selector:?} d/d{name}[{idx}]: autodiff {got}, finite difference {numeric}"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 80, "only {checked} gradient entries checked");
        }
    }
}
