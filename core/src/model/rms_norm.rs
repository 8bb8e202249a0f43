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
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::nn::RmsNorm;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::tracked_pair::{PairBackward, tracked_pair};

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

/// The norm's backward at epsilon `.0`, [`RmsNormBackend::rms_norm_backward`].
#[derive(Clone, Debug)]
struct RmsNormGrad(f64);

impl<B: RmsNormBackend> PairBackward<B, 1> for RmsNormGrad {
    fn backward(
        &self,
        x: Tensor<B, 2>,
        gamma: Tensor<B, 1>,
        grad: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 1>) {
        B::rms_norm_backward(x, gamma, grad, self.0)
    }
}

impl<B: RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    const OWN_RMS_NORM: bool = B::OWN_RMS_NORM;

    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        if !B::OWN_RMS_NORM {
            return rms_norm_ops(x, gamma, eps);
        }
        tracked_pair(x, gamma, RmsNormGrad(eps), |x, gamma| {
            B::rms_norm(x, gamma, eps)
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{RmsNorm, RmsNormConfig};
    use burn::tensor::{Tensor, TensorData};

    use super::{RmsNormBackend, rms_norm, rms_norm_backward_ops};

    use crate::model::init::drawn;

    type B = Autodiff<NdArray>;

    /// A norm of width `d` with gamma drawn around 1 (so every column differs).
    fn norm(d: usize) -> RmsNorm<B> {
        let mut norm = RmsNormConfig::new(d).init::<B>(&Default::default());
        // A leaf of the graph: drawn on the inner backend.
        let gamma =
            Tensor::<B, 1>::from_inner(drawn([d], (1.0, 0.5), d as u64, &Default::default()));
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

    /// Within `rtol` of burn's value, relative to `1 + |value|`; NaN where burn's is.
    fn assert_within(got: &[f32], want: &[f32], rtol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            if b.is_nan() {
                assert!(a.is_nan(), "{what}[{i}]: {a}, burn's ops give NaN");
                continue;
            }
            assert!(
                (a - b).abs() <= rtol * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs burn's ops {b}"
            );
        }
    }

    /// Output and dX within 1e-5; dGamma, a sum over the rows in another order whose
    /// terms (`dY n`, up to about 10 here) cancel to well under 1, within 1e-4.
    fn assert_close3(got: &[Vec<f32>; 3], want: &[Vec<f32>; 3], what: &str) {
        for (k, (name, rtol)) in [("output", 1e-5), ("dX", 1e-5), ("dGamma", 1e-4)]
            .into_iter()
            .enumerate()
        {
            assert_within(&got[k], &want[k], rtol, &format!("{name} {what}"));
        }
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_within(got, want, 1e-5, what);
    }

    #[test]
    fn forward_and_gradients_equal_burns_module() {
        let device = Default::default();
        // One value; an odd width; rows past one block, split over the cores.
        for [n, d] in [[1, 1], [5, 7], [300, 257]] {
            let norm = norm(d);
            let x = drawn::<NdArray, 2>([n, d], (0.0, 3.0), 1, &device);
            let (got, want) = (run(&norm, &x, true), run(&norm, &x, false));
            assert_close3(&got, &want, &format!("at [{n}, {d}]"));
        }
    }

    #[test]
    fn rank_three_strided_zero_and_non_finite_rows() {
        let device = Default::default();
        let norm = norm(6);
        // [2, 3, 6] read through a transpose of [2, 6, 3]: a strided view.
        let x = drawn::<NdArray, 3>([2, 6, 3], (0.0, 1.0), 2, &device).swap_dims(1, 2);
        let (got, want) = (run(&norm, &x, true), run(&norm, &x, false));
        assert_close3(&got, &want, "of a strided rank 3 input");
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
        let x = drawn::<NdArray, 2>([33, 19], (0.0, 2.0), 3, &device);
        let gamma = drawn::<NdArray, 1>([19], (1.0, 0.5), 4, &device);
        let grad = drawn::<NdArray, 2>([33, 19], (0.0, 1.0), 5, &device);
        let (want_x, want_gamma) =
            rms_norm_backward_ops(x.clone(), gamma.clone(), grad.clone(), 1e-5);
        let (d_x, d_gamma) = NdArray::rms_norm_backward(x, gamma, grad, 1e-5);
        let flat2 = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        let flat1 = |t: Tensor<NdArray, 1>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&flat2(d_x), &flat2(want_x), "dX");
        assert_within(&flat1(d_gamma), &flat1(want_gamma), 1e-4, "dGamma");
    }
}
