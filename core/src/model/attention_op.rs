//! Causal softmax attention, `softmax(Q K^T / sqrt(h) + mask) V`, as one op of burn's
//! backends with its own backward (what PyTorch's `scaled_dot_product_attention` is to
//! its eager model).
//!
//! Why an op: in burn's tensor ops the scores take a scale, a mask fill and a softmax of
//! four passes, each a new `[B, H, S, T]` tensor that autodiff records and differentiates
//! one by one, and burn ndarray copies every head's transposed view again before each
//! product. `perf` on the tiny preset (docs/benchmarks.md, "CPU speed") put about 10% of
//! a step in the softmax and 9% in `memmove`. On burn ndarray each (sequence, head) pair
//! is one task here: its products on views, the mask and softmax in one pass per row.
//!
//! Query `i` sits at position `start + i` and sees the keys `j <= start + i` (training:
//! `start = 0`, the square causal mask; a KV cache: `start` cached positions). With `P`
//! the probabilities, `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P))`,
//! `dQ = dS K / sqrt(h)`, `dK = dS^T Q / sqrt(h)`.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::routed_rows::float;

/// A backend with causal softmax attention as one op.
pub trait AttentionBackend: Backend {
    /// Queries `q` `[B, H, S, h]` against keys and values `k`, `v` `[B, H, T, h]`
    /// (`T = start + S`): the context with the heads side by side, `[B, S, H h]`, and the
    /// probabilities `[B, H, S, T]` (kept for the backward). The default is burn's
    /// tensor ops.
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        start: usize,
    ) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        attention_ops(q, k, v, start)
    }

    /// The gradients `(dQ, dK, dV)` of [`AttentionBackend::causal_attention`], given its
    /// probabilities and the context's gradient `grad` `[B, S, H h]`. The default is
    /// burn's tensor ops.
    fn causal_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        probs: Tensor<Self, 4>,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        attention_backward_ops(q, k, v, probs, grad)
    }
}

/// [`AttentionBackend::causal_attention`] in burn's tensor ops.
pub(super) fn attention_ops<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let [b, h, s, hd] = q.dims();
    let t = k.dims()[2];
    let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    let device = scores.device();
    let rows = Tensor::<B, 1, Int>::arange(start as i64..(start + s) as i64, &device)
        .reshape([s, 1])
        .expand([s, t]);
    let cols = Tensor::<B, 1, Int>::arange(0..t as i64, &device)
        .reshape([1, t])
        .expand([s, t]);
    let hidden = cols.greater(rows).unsqueeze::<4>().expand([b, h, s, t]);
    let probs = softmax(scores.mask_fill(hidden, -1e9), 3);
    let context = probs
        .clone()
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([b, s, h * hd]);
    (context, probs)
}

/// [`AttentionBackend::causal_attention_backward`] in burn's tensor ops.
pub(super) fn attention_backward_ops<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    probs: Tensor<B, 4>,
    grad: Tensor<B, 3>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, s, hd] = q.dims();
    let scale = 1.0 / (hd as f64).sqrt();
    let d_out = grad.reshape([b, s, h, hd]).swap_dims(1, 2);
    let d_v = probs.clone().swap_dims(2, 3).matmul(d_out.clone());
    let d_probs = d_out.matmul(v.swap_dims(2, 3));
    let inner = (d_probs.clone() * probs.clone()).sum_dim(3);
    let d_scores = probs * (d_probs - inner) * scale;
    let d_q = d_scores.clone().matmul(k);
    let d_k = d_scores.swap_dims(2, 3).matmul(q);
    (d_q, d_k, d_v)
}

impl AttentionBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl AttentionBackend for burn::backend::Cuda {}

/// [`AttentionBackend::causal_attention`]'s context alone.
pub fn causal_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    start: usize,
) -> Tensor<B, 3> {
    B::causal_attention(q, k, v, start).0
}

#[derive(Debug)]
struct CausalAttention;

impl<B: AttentionBackend> Backward<B, 3> for CausalAttention {
    /// The checkpointed queries, keys and values, and the forward's probabilities.
    type State = (NodeId, NodeId, NodeId, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = float::<B, 3>(grads.consume::<B>(&ops.node));
        let (q_id, k_id, v_id, probs) = ops.state;
        let q = float::<B, 4>(checkpointer.retrieve_node_output(q_id));
        let k = float::<B, 4>(checkpointer.retrieve_node_output(k_id));
        let v = float::<B, 4>(checkpointer.retrieve_node_output(v_id));
        let (d_q, d_k, d_v) = B::causal_attention_backward(q, k, v, float(probs), grad);
        for (node, d) in [(node_q, d_q), (node_k, d_k), (node_v, d_v)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, d.into_primitive().tensor());
            }
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        start: usize,
    ) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        let q = q.into_primitive().tensor();
        let k = k.into_primitive().tensor();
        let v = v.into_primitive().tensor();
        let forward = |q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>| {
            let (context, probs) = B::causal_attention(float(q), float(k), float(v), start);
            (context.into_primitive().tensor(), probs)
        };
        let (context, probs) = match CausalAttention
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let q_id = prep.checkpoint(&q);
                let k_id = prep.checkpoint(&k);
                let v_id = prep.checkpoint(&v);
                let (context, probs) = forward(q.primitive, k.primitive, v.primitive);
                let state = (q_id, k_id, v_id, probs.clone().into_primitive().tensor());
                (prep.finish(state, context), probs)
            }
            OpsKind::UnTracked(prep) => {
                let (context, probs) = forward(q.primitive, k.primitive, v.primitive);
                (prep.finish(context), probs)
            }
        };
        (
            Tensor::from_primitive(TensorPrimitive::Float(context)),
            Tensor::from_inner(probs),
        )
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tensor, TensorData};

    use super::{AttentionBackend, attention_backward_ops, attention_ops};

    type B = Autodiff<NdArray>;

    type Values = [Vec<f32>; 4];

    /// Context, dQ, dK and dV by the op on `Autodiff<NdArray>` (`fused`) or by burn's ops.
    fn run(inputs: &[Tensor<NdArray, 4>; 3], start: usize, fused: bool) -> Values {
        let [q, k, v] = inputs
            .clone()
            .map(|t| Tensor::<B, 4>::from_inner(t).require_grad());
        let out = if fused {
            B::causal_attention(q.clone(), k.clone(), v.clone(), start).0
        } else {
            // burn's own ops, recorded op by op by autodiff (the code the op replaced).
            attention_ops(q.clone(), k.clone(), v.clone(), start).0
        };
        let [b, s, w] = out.dims();
        let weights = Tensor::<B, 3>::from_data(
            TensorData::new(
                (0..b * s * w).map(|i| (i % 5) as f32 - 1.7).collect(),
                [b, s, w],
            ),
            &Default::default(),
        );
        let grads = (out.clone() * weights).sum().backward();
        let flat = |t: Tensor<NdArray, 4>| t.into_data().to_vec::<f32>().unwrap();
        [
            out.inner().into_data().to_vec::<f32>().unwrap(),
            flat(q.grad(&grads).unwrap()),
            flat(k.grad(&grads).unwrap()),
            flat(v.grad(&grads).unwrap()),
        ]
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs burn's ops {b}"
            );
        }
    }

    fn random(dims: [usize; 4], std: f64) -> Tensor<NdArray, 4> {
        Tensor::random(dims, Distribution::Normal(0.0, std), &Default::default())
    }

    #[test]
    fn forward_and_gradients_equal_burns_ops() {
        // [B, H, S, h] and the cached positions: one token and one head; odd sizes; a KV
        // cache's offset; large scores (std 3 after the scale) that saturate the softmax.
        for ([b, h, s, hd], start, std) in [
            ([1, 1, 1, 1], 0, 1.0),
            ([2, 3, 5, 7], 0, 1.0),
            ([2, 2, 3, 4], 4, 1.0),
            ([1, 2, 1, 8], 6, 1.0),
            ([3, 4, 16, 16], 0, 3.0),
        ] {
            let t = start + s;
            let inputs = [
                random([b, h, s, hd], std),
                random([b, h, t, hd], std),
                random([b, h, t, hd], 1.0),
            ];
            let (got, want) = (run(&inputs, start, true), run(&inputs, start, false));
            for (n, what) in ["context", "dQ", "dK", "dV"].iter().enumerate() {
                assert_close(
                    &got[n],
                    &want[n],
                    &format!("{what} of {:?}, start {start}", [b, h, s, hd]),
                );
            }
        }
    }

    #[test]
    fn the_default_methods_agree_with_the_cpu_override() {
        let [q, k, v] = [
            random([2, 3, 6, 5], 1.0),
            random([2, 3, 6, 5], 1.0),
            random([2, 3, 6, 5], 1.0),
        ];
        // Strided views, as the model's heads are (its q, k and v are `swap_dims` of the
        // projections): the override must read strides.
        let strided = |t: Tensor<NdArray, 4>| t.swap_dims(1, 2).into_data();
        let from =
            |d: TensorData| Tensor::<NdArray, 4>::from_data(d, &Default::default()).swap_dims(1, 2);
        let (qs, ks, vs) = (
            from(strided(q.clone())),
            from(strided(k.clone())),
            from(strided(v.clone())),
        );
        let grad = Tensor::<NdArray, 3>::random(
            [2, 6, 15],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        let (context, probs) = NdArray::causal_attention(qs.clone(), ks.clone(), vs.clone(), 0);
        let got = NdArray::causal_attention_backward(qs, ks, vs, probs.clone(), grad.clone());
        let (want_context, want_probs) = attention_ops(q.clone(), k.clone(), v.clone(), 0);
        let want = attention_backward_ops(q, k, v, want_probs.clone(), grad);
        let flat3 = |t: Tensor<NdArray, 3>| t.into_data().to_vec::<f32>().unwrap();
        let flat4 = |t: Tensor<NdArray, 4>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&flat3(context), &flat3(want_context), "context");
        assert_close(&flat4(probs.clone()), &flat4(want_probs), "probabilities");
        assert_close(&flat4(got.0), &flat4(want.0), "dQ");
        assert_close(&flat4(got.1), &flat4(want.1), "dK");
        assert_close(&flat4(got.2), &flat4(want.2), "dV");
        // Hidden keys get exactly zero probability.
        for (n, p) in flat4(probs).iter().enumerate() {
            let (i, j) = ((n / 6) % 6, n % 6);
            if j > i {
                assert_eq!(*p, 0.0, "query {i} sees key {j}");
            }
        }
    }

    #[test]
    fn a_nan_query_propagates_as_in_burns_ops() {
        let mut values: Vec<f32> = (0..2 * 4 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        values[5] = f32::NAN;
        let q = Tensor::<NdArray, 4>::from_data(
            TensorData::new(values, [1, 2, 4, 3]),
            &Default::default(),
        );
        let [k, v] = [random([1, 2, 4, 3], 1.0), random([1, 2, 4, 3], 1.0)];
        let got = NdArray::causal_attention(q.clone(), k.clone(), v.clone(), 0).0;
        let want = attention_ops(q, k, v, 0).0;
        let (got, want) = (
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap(),
        );
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.is_nan(),
                b.is_nan(),
                "context[{i}]: {a} vs burn's ops {b}"
            );
            if !b.is_nan() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "context[{i}]: {a} vs {b}"
                );
            }
        }
        assert!(
            got.iter().any(|x| x.is_nan()),
            "a NaN query must reach the context"
        );
    }
}
