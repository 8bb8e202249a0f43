//! One autodiff op of two float inputs, the pattern the model's own ops share (the
//! SwiGLU gate, RMSNorm, the dense products): `y = f(a, b)` `[R, C]` from `a` `[R, D]`
//! and `b` of rank `DB`, both checkpointed, the backward one call of the inner backend
//! that returns both gradients.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::routed_rows::float;

/// The backward of a pair op on backend `B`: `(dA, dB)` from the inputs and the output's
/// gradient. The value carries what else the backward needs (RMSNorm's epsilon).
pub(super) trait PairBackward<B: Backend, const DB: usize>:
    Clone + Send + core::fmt::Debug + 'static
{
    fn backward(
        &self,
        a: Tensor<B, 2>,
        b: Tensor<B, DB>,
        grad: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, DB>);
}

/// The op as burn's autodiff records it (the backward travels in its state).
#[derive(Debug)]
struct PairOp<K, const DB: usize>(K);

impl<B: Backend, K: PairBackward<B, DB>, const DB: usize> Backward<B, 2> for PairOp<K, DB> {
    /// The checkpointed inputs and the backward.
    type State = (NodeId, NodeId, K);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_a, node_b] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (a_id, b_id, kernel) = ops.state;
        let a = float::<B, 2>(checkpointer.retrieve_node_output(a_id));
        let b = float::<B, DB>(checkpointer.retrieve_node_output(b_id));
        let (d_a, d_b) = kernel.backward(a, b, grad);
        if let Some(node) = node_a {
            grads.register::<B>(node.id, d_a.into_primitive().tensor());
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, d_b.into_primitive().tensor());
        }
    }
}

/// `forward(a, b)` on the inner backend as one op of `Autodiff<B, C>` whose backward is
/// `kernel`'s.
pub(super) fn tracked_pair<B, C, K, const DB: usize>(
    a: Tensor<Autodiff<B, C>, 2>,
    b: Tensor<Autodiff<B, C>, DB>,
    kernel: K,
    forward: impl FnOnce(Tensor<B, 2>, Tensor<B, DB>) -> Tensor<B, 2>,
) -> Tensor<Autodiff<B, C>, 2>
where
    B: Backend,
    C: CheckpointStrategy,
    K: PairBackward<B, DB>,
{
    let a = a.into_primitive().tensor();
    let b = b.into_primitive().tensor();
    let run = |a, b| forward(float(a), float(b)).into_primitive().tensor();
    let op = PairOp::<K, DB>(kernel.clone());
    let out = match op
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let a_id = prep.checkpoint(&a);
            let b_id = prep.checkpoint(&b);
            prep.finish((a_id, b_id, kernel), run(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(a.primitive, b.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
