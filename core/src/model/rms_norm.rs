//! RMSNorm, `y = x / sqrt(mean(x^2) + eps) * gamma` over each row, as one op of burn's
//! backends with its own backward.
//!
//! Why an op: burn 0.21's `RmsNorm::forward` is a cast, a square, a mean, an add, a
//! square root, a division and a broadcast multiply, and autodiff differentiates through
//! every one of them (the mean's backward fills a zero tensor; the broadcast multiply's
//! gradient of gamma is a sum over the rows). A pre-norm block runs two norms, and the
//! model one more. On burn ndarray the forward is one pass over the rows and the backward
//! another (`rms_norm_ndarray.rs`). The GPU backends keep burn's module forward under
//! burn's autodiff ([`RmsNormBackend::OWN_RMS_NORM`] false), as before.
//!
//! With `r = 1 / sqrt(mean(x^2) + eps)`, `n = x r` and `g = dY gamma` per row of `D`:
//! `dGamma = sum over rows of dY n`, `dX = r (g - n mean(g n))`.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::RmsNorm;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::routed_rows::float;

/// A backend with RMSNorm as one op on rows `[R, D]`.
pub trait RmsNormBackend: Backend {
    /// Whether [`RmsNormBackend::rms_norm`] is the backend's own, so that autodiff tracks
    /// it as one op with [`RmsNormBackend::rms_norm_backward`]; else burn differentiates
    /// the forward's tensor ops.
    const OWN_RMS_NORM: bool = false;

    /// `x / sqrt(mean(x^2) + eps) * gamma` over each row of `x` `[R, D]`, `gamma` `[D]`.
    /// The default is burn's `RmsNorm::forward`'s ops.
    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        rms_norm_ops(x, gamma, eps)
    }

    /// The gradients `(dX, dGamma)` of [`RmsNormBackend::rms_norm`] given the output's.
    /// The default is burn's tensor ops.
    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        rms_norm_backward_ops(x, gamma, grad, eps)
    }
}

/// [`RmsNormBackend::rms_norm`] in burn's tensor ops (`RmsNorm::forward`'s, for f32).
pub(super) fn rms_norm_ops<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, 2> {
    let rms = (x.clone().square().mean_dim(1) + eps).sqrt();
    (x / rms) * gamma.unsqueeze()
}

/// [`RmsNormBackend::rms_norm_backward`] in burn's tensor ops.
pub(super) fn rms_norm_backward_ops<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    grad: Tensor<B, 2>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let d = x.dims()[1];
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    let n = x * r.clone();
    let d_gamma = (grad.clone() * n.clone()).sum_dim(0).reshape([d]);
    let g = grad * gamma.unsqueeze();
    let mean_gn = (g.clone() * n.clone()).mean_dim(1);
    ((g - n * mean_gn) * r, d_gamma)
}

impl RmsNormBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl RmsNormBackend for burn::backend::Cuda {}

/// `norm` applied to the last axis of `x` (any rank), by way of
/// [`RmsNormBackend::rms_norm`] on its rows where the backend has its own, else
/// burn's `RmsNorm::forward`.
pub fn rms_norm<B: RmsNormBackend, const D: usize>(
    norm: &RmsNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    if !B::OWN_RMS_NORM {
        return norm.forward(x);
    }
    let dims = x.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    B::rms_norm(x.reshape([rows, width]), norm.gamma.val(), norm.epsilon).reshape(dims)
}

#[derive(Debug)]
struct RmsNormOp;

impl<B: RmsNormBackend> Backward<B, 2> for RmsNormOp {
    /// The checkpointed x and gamma, and epsilon.
    type State = (NodeId, NodeId, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (x_id, gamma_id, eps) = ops.state;
        let x = float::<B, 2>(checkpointer.retrieve_node_output(x_id));
        let gamma = float::<B, 1>(checkpointer.retrieve_node_output(gamma_id));
        let (d_x, d_gamma) = B::rms_norm_backward(x, gamma, grad, eps);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, d_x.into_primitive().tensor());
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, d_gamma.into_primitive().tensor());
        }
    }
}

impl<B: RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    const OWN_RMS_NORM: bool = B::OWN_RMS_NORM;

    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        if !B::OWN_RMS_NORM {
            return rms_norm_ops(x, gamma, eps);
        }
        let x = x.into_primitive().tensor();
        let gamma = gamma.into_primitive().tensor();
        let forward = |x: FloatTensor<B>, gamma: FloatTensor<B>| {
            B::rms_norm(float(x), float(gamma), eps)
                .into_primitive()
                .tensor()
        };
        let out = match RmsNormOp
            .prepare::<C>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_id = prep.checkpoint(&x);
                let gamma_id = prep.checkpoint(&gamma);
                prep.finish((x_id, gamma_id, eps), forward(x.primitive, gamma.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, gamma.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{RmsNorm, RmsNormConfig};
    use burn::tensor::{Distribution, Tensor, TensorData};

    use super::{RmsNormBackend, rms_norm, rms_norm_backward_ops};

    type B = Autodiff<NdArray>;

    /// A norm of width `d` with gamma drawn around 1 (so every column differs).
    fn norm(d: usize) -> RmsNorm<B> {
        let mut norm = RmsNormConfig::new(d).init::<B>(&Default::default());
        let gamma =
            Tensor::<B, 1>::random([d], Distribution::Normal(1.0, 0.5), &Default::default());
        norm.gamma = burn::module::Param::from_tensor(gamma);
        norm
    }

    /// Output, dX and dGamma of the op (`own`) or of burn's `RmsNorm::forward` under
    /// autodiff, for `x` of any rank.
    fn run<const D: usize>(norm: &RmsNorm<B>, x: &Tensor<NdArray, D>, own: bool) -> [Vec<f32>; 3] {
        let x = Tensor::<B, D>::from_inner(x.clone()).require_grad();
        let y = if own {
            rms_norm(norm, x.clone())
        } else {
            norm.forward(x.clone())
        };
        let shape = y.dims();
        let count = shape.iter().product::<usize>();
        // A weighted sum, so that every output's gradient differs.
        let weights = Tensor::<B, 1>::from_data(
            TensorData::new((0..count).map(|i| (i % 7) as f32 - 2.5).collect(), [count]),
            &Default::default(),
        )
        .reshape(shape);
        let grads = (y.clone() * weights).sum().backward();
        let flat = |t: Tensor<NdArray, D>| t.into_data().to_vec::<f32>().unwrap();
        [
            flat(y.inner()),
            flat(x.grad(&grads).unwrap()),
            norm.gamma
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
        ]
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            if b.is_nan() {
                assert!(a.is_nan(), "{what}[{i}]: {a}, burn's ops give NaN");
                continue;
            }
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs burn's ops {b}"
            );
        }
    }

    #[test]
    fn forward_and_gradients_equal_burns_module() {
        let device = Default::default();
        // One value; an odd width; rows past one block, split over the cores.
        for [n, d] in [[1, 1], [5, 7], [300, 257]] {
            let norm = norm(d);
            let x = Tensor::<NdArray, 2>::random([n, d], Distribution::Normal(0.0, 3.0), &device);
            let (got, want) = (run(&norm, &x, true), run(&norm, &x, false));
            for (k, what) in ["output", "dX", "dGamma"].iter().enumerate() {
                assert_close(&got[k], &want[k], &format!("{what} at [{n}, {d}]"));
            }
        }
    }

    #[test]
    fn rank_three_strided_zero_and_non_finite_rows() {
        let device = Default::default();
        let norm = norm(6);
        // [2, 3, 6] read through a transpose of [2, 6, 3]: a strided view.
        let x = Tensor::<NdArray, 3>::random([2, 6, 3], Distribution::Normal(0.0, 1.0), &device)
            .swap_dims(1, 2);
        let (got, want) = (run(&norm, &x, true), run(&norm, &x, false));
        for (k, what) in ["output", "dX", "dGamma"].iter().enumerate() {
            assert_close(&got[k], &want[k], &format!("{what}, strided rank 3"));
        }
        // A row of zeros (rms = sqrt(eps)) and a row holding a NaN.
        let mut values = vec![0.0f32; 6];
        values.extend([1.0, -2.0, f32::NAN, 0.5, 3.0, -1.0]);
        let x = Tensor::<NdArray, 2>::from_data(TensorData::new(values, [2, 6]), &device);
        let (got, want) = (run(&norm, &x, true), run(&norm, &x, false));
        assert_close(&got[0], &want[0], "output of a zero row and a NaN row");
        assert_close(&got[1][..6], &want[1][..6], "dX of a zero row");
    }

    #[test]
    fn the_default_backward_agrees_with_the_cpu_override() {
        let device = Default::default();
        let x = Tensor::<NdArray, 2>::random([33, 19], Distribution::Normal(0.0, 2.0), &device);
        let gamma = Tensor::<NdArray, 1>::random([19], Distribution::Normal(1.0, 0.5), &device);
        let grad = Tensor::<NdArray, 2>::random([33, 19], Distribution::Normal(0.0, 1.0), &device);
        let (want_x, want_gamma) =
            rms_norm_backward_ops(x.clone(), gamma.clone(), grad.clone(), 1e-5);
        let (d_x, d_gamma) = NdArray::rms_norm_backward(x, gamma, grad, 1e-5);
        let flat2 = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        let flat1 = |t: Tensor<NdArray, 1>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&flat2(d_x), &flat2(want_x), "dX");
        assert_close(&flat1(d_gamma), &flat1(want_gamma), "dGamma");
    }
}
