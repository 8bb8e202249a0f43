//! The SwiGLU gate `silu(gate) * up`, elementwise, as one op of burn's backends with its
//! own backward.
//!
//! Why an op: burn 0.21 writes `sigmoid` as `exp(-ln(1 + exp(-x)))` (two `exp` and one
//! `ln` per value, each a pass that allocates its own tensor), and autodiff then
//! differentiates `silu(gate) * up` through five recorded ops. `perf` on the tiny preset
//! (docs/benchmarks.md, "CPU speed") put 11% of a step in libm's `expf` and `logf`, about
//! half of it here. On burn ndarray the forward is one pass and the backward another,
//! with `e^x` from the vectorized polynomial of the fast routing ops.
//!
//! With `s = sigmoid(g)`: `y = g s u`, `dU = dY g s`, `dG = dY u s (1 + g (1 - s))`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;

use super::tracked_pair::{PairBackward, tracked_pair};

/// A backend with the SwiGLU gate as one op.
pub trait SwigluBackend: Backend {
    /// `silu(gate) * up`, elementwise (`gate` and `up` of one shape). The default is
    /// burn's tensor ops.
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        silu(gate) * up
    }

    /// The gradients `(dGate, dUp)` of [`SwigluBackend::swiglu`] given the output's
    /// gradient. The default is burn's tensor ops.
    fn swiglu_backward(
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        swiglu_backward_ops(gate, up, grad)
    }
}

/// [`SwigluBackend::swiglu_backward`] in burn's tensor ops.
pub(super) fn swiglu_backward_ops<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let s = sigmoid(gate.clone());
    let d_up = grad.clone() * gate.clone() * s.clone();
    let slope = s.clone() * (gate * (s.neg() + 1.0) + 1.0);
    (grad * up * slope, d_up)
}

impl SwigluBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl SwigluBackend for burn::backend::Cuda {}

/// `silu(gate) * up` for gate and up of any rank (the padded layout's `[E, C, F]`), by
/// way of [`SwigluBackend::swiglu`] on rows of the last axis.
pub fn swiglu<B: SwigluBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = gate.dims();
    let width = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    B::swiglu(gate.reshape([rows, width]), up.reshape([rows, width])).reshape(dims)
}

/// The gate's backward, [`SwigluBackend::swiglu_backward`].
#[derive(Clone, Debug)]
struct SwigluGrad;

impl<B: SwigluBackend> PairBackward<B, 2> for SwigluGrad {
    fn backward(
        &self,
        gate: Tensor<B, 2>,
        up: Tensor<B, 2>,
        grad: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        B::swiglu_backward(gate, up, grad)
    }
}

impl<B: SwigluBackend, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        tracked_pair(gate, up, SwigluGrad, B::swiglu)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::activation::silu;
    use burn::tensor::{Distribution, Tensor, TensorData};

    use super::{SwigluBackend, swiglu_backward_ops};
    use crate::model::test_support::assert_close_to_burn;

    type B = Autodiff<NdArray>;

    /// Output, dGate and dUp of the op (`fused`) or of burn's own ops under autodiff.
    fn run(gate: &Tensor<NdArray, 2>, up: &Tensor<NdArray, 2>, fused: bool) -> [Vec<f32>; 3] {
        let g = Tensor::<B, 2>::from_inner(gate.clone()).require_grad();
        let u = Tensor::<B, 2>::from_inner(up.clone()).require_grad();
        let y = if fused {
            B::swiglu(g.clone(), u.clone())
        } else {
            silu(g.clone()) * u.clone()
        };
        // A weighted sum, so that every output's gradient differs.
        let [n, f] = y.dims();
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new((0..n * f).map(|i| (i % 7) as f32 - 2.5).collect(), [n, f]),
            &Default::default(),
        );
        let grads = (y.clone() * weights).sum().backward();
        let values = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        [
            values(y.inner()),
            values(g.grad(&grads).unwrap()),
            values(u.grad(&grads).unwrap()),
        ]
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_close_to_burn(got, want, 2e-6, what);
    }

    #[test]
    fn forward_and_gradients_equal_burns_ops() {
        let device = Default::default();
        // One value; an odd width; a block large enough to split over the cores.
        for [n, f] in [[1, 1], [5, 7], [300, 257]] {
            let gate =
                Tensor::<NdArray, 2>::random([n, f], Distribution::Normal(0.0, 4.0), &device);
            let up = Tensor::<NdArray, 2>::random([n, f], Distribution::Normal(0.0, 1.0), &device);
            let (got, want) = (run(&gate, &up, true), run(&gate, &up, false));
            for (k, what) in ["output", "dGate", "dUp"].iter().enumerate() {
                assert_close(&got[k], &want[k], &format!("{what} at [{n}, {f}]"));
            }
        }
    }

    #[test]
    fn the_default_methods_agree_with_the_cpu_override() {
        let device = Default::default();
        let gate = Tensor::<NdArray, 2>::random([33, 19], Distribution::Normal(0.0, 3.0), &device);
        let up = Tensor::<NdArray, 2>::random([33, 19], Distribution::Normal(0.0, 1.0), &device);
        let grad = Tensor::<NdArray, 2>::random([33, 19], Distribution::Normal(0.0, 1.0), &device);
        // The trait's default body, burn's ops on the same backend.
        let (want_gate, want_up) = swiglu_backward_ops(gate.clone(), up.clone(), grad.clone());
        let (d_gate, d_up) = NdArray::swiglu_backward(gate, up, grad);
        let values = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&values(d_gate), &values(want_gate), "dGate");
        assert_close(&values(d_up), &values(want_up), "dUp");
    }

    #[test]
    fn transposed_inputs_and_non_finite_gates() {
        let device = Default::default();
        let values = vec![
            0.0,
            -0.0,
            1e-30,
            -88.0,
            88.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.0,
            -3.0,
            20.0,
            -20.0,
        ];
        let gate = Tensor::<NdArray, 2>::from_data(TensorData::new(values, [3, 4]), &device);
        let up = Tensor::<NdArray, 2>::random([3, 4], Distribution::Normal(0.0, 1.0), &device);
        // Strided views (a transpose) read the same values as contiguous ones.
        let (gate_t, up_t) = (gate.clone().transpose(), up.clone().transpose());
        let got = NdArray::swiglu(gate_t.clone(), up_t.clone());
        let want = silu(gate_t) * up_t;
        let flat = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        assert_close(&flat(got), &flat(want), "output of transposed inputs");
        let got = run(&gate, &up, true);
        let want = run(&gate, &up, false);
        assert_close(&got[0], &want[0], "output with non-finite gates");
    }
}
