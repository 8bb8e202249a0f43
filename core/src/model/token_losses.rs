//! The next-token losses `-log softmax(logits)[target]` of each row, as one op of burn's
//! backends with its own backward.
//!
//! Why an op: burn's `log_softmax` then `gather` is a max, a subtraction, an exponential,
//! a sum, a logarithm and a second subtraction over the whole `[N, V]` logits, and
//! autodiff differentiates each; the gather's gradient is a scatter into a zero-filled
//! `[N, V]` tensor. On burn ndarray the forward is one pass over the rows (a log-sum-exp
//! and a pick) and the backward another, `dLogits = dLoss (softmax - onehot)`
//! (`token_losses_ndarray.rs`). The GPU backends keep burn's ops under burn's autodiff
//! ([`TokenLossesBackend::OWN_TOKEN_LOSSES`] false), as before.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::routed_rows::float;

/// A backend with the per-token cross-entropy as one op.
pub trait TokenLossesBackend: Backend {
    /// Whether [`TokenLossesBackend::token_losses`] is the backend's own, so that
    /// autodiff tracks it as one op with [`TokenLossesBackend::token_losses_backward`];
    /// else burn differentiates the forward's tensor ops.
    const OWN_TOKEN_LOSSES: bool = false;

    /// `-log softmax(logits[i])[targets[i]]` for each row of `logits` `[N, V]`: `[N]`.
    /// The default is burn's `log_softmax` and `gather`.
    fn token_losses(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Tensor<Self, 1> {
        token_losses_ops(logits, targets)
    }

    /// The gradient of [`TokenLossesBackend::token_losses`] with respect to the logits,
    /// given the losses' gradient `grad` `[N]`. The default is burn's tensor ops.
    fn token_losses_backward(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        grad: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        token_losses_backward_ops(logits, targets, grad)
    }
}

/// [`TokenLossesBackend::token_losses`] in burn's tensor ops.
pub(super) fn token_losses_ops<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg()
}

/// [`TokenLossesBackend::token_losses_backward`] in burn's tensor ops.
pub(super) fn token_losses_backward_ops<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    grad: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [n, v] = logits.dims();
    let onehot = targets.one_hot::<2>(v).float();
    (softmax(logits, 1) - onehot) * grad.reshape([n, 1])
}

impl TokenLossesBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl TokenLossesBackend for burn::backend::Cuda {}

#[derive(Debug)]
struct TokenLosses;

impl<B: TokenLossesBackend> Backward<B, 1> for TokenLosses {
    /// The checkpointed logits and the targets (no gradient).
    type State = (NodeId, IntTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_logits] = ops.parents;
        let grad = float::<B, 1>(grads.consume::<B>(&ops.node));
        let (logits_id, targets) = ops.state;
        let logits = float::<B, 2>(checkpointer.retrieve_node_output(logits_id));
        let d_logits = B::token_losses_backward(logits, Tensor::from_primitive(targets), grad);
        if let Some(node) = node_logits {
            grads.register::<B>(node.id, d_logits.into_primitive().tensor());
        }
    }
}

impl<B: TokenLossesBackend, C: CheckpointStrategy> TokenLossesBackend for Autodiff<B, C> {
    const OWN_TOKEN_LOSSES: bool = B::OWN_TOKEN_LOSSES;

    fn token_losses(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Tensor<Self, 1> {
        if !B::OWN_TOKEN_LOSSES {
            return token_losses_ops(logits, targets);
        }
        let logits = logits.into_primitive().tensor();
        let targets: IntTensor<B> = targets.into_primitive();
        let forward = |logits: FloatTensor<B>, targets: IntTensor<B>| {
            B::token_losses(float(logits), Tensor::from_primitive(targets))
                .into_primitive()
                .tensor()
        };
        let out = match TokenLosses
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let logits_id = prep.checkpoint(&logits);
                let state = (logits_id, targets.clone());
                prep.finish(state, forward(logits.primitive, targets))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(logits.primitive, targets)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{TokenLossesBackend, token_losses_backward_ops, token_losses_ops};
    use crate::model::test_support::assert_close_to_burn;

    use crate::model::init::drawn;

    type B = Autodiff<NdArray>;

    fn targets<Be: burn::tensor::backend::Backend>(t: &[i64]) -> Tensor<Be, 1, Int> {
        Tensor::from_data(TensorData::new(t.to_vec(), [t.len()]), &Default::default())
    }

    /// The losses and dLogits of the op (`own`) or of burn's ops under autodiff.
    fn run(logits: &Tensor<NdArray, 2>, t: &[i64], own: bool) -> [Vec<f32>; 2] {
        let z = Tensor::<B, 2>::from_inner(logits.clone()).require_grad();
        let losses = if own {
            B::token_losses(z.clone(), targets(t))
        } else {
            token_losses_ops(z.clone(), targets(t))
        };
        let n = t.len();
        // A weighted sum, so that every row's gradient differs.
        let weights = Tensor::<B, 1>::from_data(
            TensorData::new((0..n).map(|i| (i % 5) as f32 - 1.5).collect(), [n]),
            &Default::default(),
        );
        let grads = (losses.clone() * weights).sum().backward();
        [
            losses.inner().into_data().to_vec::<f32>().unwrap(),
            z.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        ]
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_close_to_burn(got, want, 2e-6, what);
    }

    #[test]
    fn losses_and_gradients_equal_burns_ops() {
        let device = Default::default();
        // One class; an odd vocabulary; rows past one block, split over the cores.
        for [n, v] in [[1, 1], [5, 7], [300, 257]] {
            let logits = drawn::<NdArray, 2>([n, v], (0.0, 4.0), 1, &device);
            let t: Vec<i64> = (0..n).map(|i| ((i * 31 + 7) % v) as i64).collect();
            let (got, want) = (run(&logits, &t, true), run(&logits, &t, false));
            assert_close(&got[0], &want[0], &format!("losses at [{n}, {v}]"));
            assert_close(&got[1], &want[1], &format!("dLogits at [{n}, {v}]"));
        }
    }

    #[test]
    fn large_spreads_and_non_finite_logits() {
        let device = Default::default();
        // Rows whose exponentials would overflow or vanish without the max, a strided
        // view, and a row holding a NaN.
        let values = vec![
            1e4,
            -1e4,
            0.0,
            80.0, //
            -100.0,
            -100.5,
            -99.0,
            -300.0, //
            3.0,
            f32::NAN,
            1.0,
            2.0,
        ];
        let logits = Tensor::<NdArray, 2>::from_data(TensorData::new(values, [3, 4]), &device);
        let t = [1, 2, 0];
        let (got, want) = (run(&logits, &t, true), run(&logits, &t, false));
        assert_close(&got[0], &want[0], "losses");
        assert_close(&got[1][..8], &want[1][..8], "dLogits of the finite rows");
        assert!(got[0][2].is_nan(), "a NaN logit gives a NaN loss");
        let strided = drawn::<NdArray, 2>([6, 4], (0.0, 2.0), 2, &device).transpose();
        let t = [0, 5, 2, 3];
        let (got, want) = (run(&strided, &t, true), run(&strided, &t, false));
        assert_close(&got[0], &want[0], "losses of a transposed view");
        assert_close(&got[1], &want[1], "dLogits of a transposed view");
    }

    #[test]
    fn the_default_backward_agrees_with_the_cpu_override() {
        let device = Default::default();
        let logits = drawn::<NdArray, 2>([33, 19], (0.0, 2.0), 3, &device);
        let grad = drawn::<NdArray, 1>([33], (0.0, 1.0), 4, &device);
        let t: Vec<i64> = (0..33).map(|i| (i * 7 % 19) as i64).collect();
        // The trait's default body, burn's ops on the same backend.
        let want = token_losses_backward_ops(logits.clone(), targets(&t), grad.clone());
        let got = NdArray::token_losses_backward(logits, targets(&t), grad);
        let flat = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&flat(got), &flat(want), "dLogits");
    }

    #[test]
    #[should_panic(expected = "target token 9 outside the vocabulary of 4")]
    fn a_target_outside_the_vocabulary_is_named() {
        let logits = Tensor::<NdArray, 2>::zeros([2, 4], &Default::default());
        NdArray::token_losses(logits, targets(&[1, 9]));
    }
}
