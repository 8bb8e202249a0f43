//! The model's dense matrix products (the attention's projections, the dense
//! feed-forward, the router and the LM head: `[N, K] x [K, M]` by a weight) as one op of
//! burn's backends with its own backward.
//!
//! Why an op: burn ndarray multiplies on one core (its `matmul` runs `matrixmultiply`
//! without threads; the crate's own threading kept these shapes on one thread,
//! docs/benchmarks.md). On burn ndarray the op splits the output's rows over the cores
//! forward and for `dX = dY W^T`, and the weight's rows for `dW = X^T dY`: each part is
//! one `general_mat_mul`, the call burn's `matmul` makes. The GPU backends keep burn's
//! `matmul` under burn's autodiff ([`DenseMatmulBackend::OWN_DENSE_MATMUL`] false).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::tracked_pair::{PairBackward, tracked_pair};

/// A backend with the dense `[N, K] x [K, M]` product as one op.
pub trait DenseMatmulBackend: Backend {
    /// Whether [`DenseMatmulBackend::dense_matmul`] is the backend's own, so that
    /// autodiff tracks it as one op with [`DenseMatmulBackend::dense_matmul_backward`];
    /// else burn differentiates its `matmul`.
    const OWN_DENSE_MATMUL: bool = false;

    /// `x w`. The default is burn's `matmul`.
    fn dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// `(dX, dW) = (dY w^T, x^T dY)`. The default is burn's `matmul`.
    fn dense_matmul_backward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        (
            grad.clone().matmul(w.transpose()),
            x.transpose().matmul(grad),
        )
    }
}

impl DenseMatmulBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl DenseMatmulBackend for burn::backend::Cuda {}

/// The product's backward, [`DenseMatmulBackend::dense_matmul_backward`].
#[derive(Clone, Debug)]
struct DenseMatmulGrad;

impl<B: DenseMatmulBackend> PairBackward<B, 2> for DenseMatmulGrad {
    fn backward(
        &self,
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
        grad: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        B::dense_matmul_backward(x, w, grad)
    }
}

impl<B: DenseMatmulBackend, C: CheckpointStrategy> DenseMatmulBackend for Autodiff<B, C> {
    const OWN_DENSE_MATMUL: bool = B::OWN_DENSE_MATMUL;

    fn dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if !B::OWN_DENSE_MATMUL {
            return x.matmul(w);
        }
        tracked_pair(x, w, DenseMatmulGrad, B::dense_matmul)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::DenseMatmulBackend;

    use crate::model::init::drawn;

    type B = Autodiff<NdArray>;

    /// The product, dX and dW of the op (`own`) or of burn's `matmul` under autodiff.
    fn run(x: &Tensor<NdArray, 2>, w: &Tensor<NdArray, 2>, own: bool) -> [Vec<f32>; 3] {
        let xa = Tensor::<B, 2>::from_inner(x.clone()).require_grad();
        let wa = Tensor::<B, 2>::from_inner(w.clone()).require_grad();
        let y = if own {
            B::dense_matmul(xa.clone(), wa.clone())
        } else {
            xa.clone().matmul(wa.clone())
        };
        let [n, m] = y.dims();
        // A weighted sum, so that every output's gradient differs.
        let weights = Tensor::<B, 2>::from_data(
            TensorData::new((0..n * m).map(|i| (i % 7) as f32 - 2.5).collect(), [n, m]),
            &Default::default(),
        );
        let grads = (y.clone() * weights).sum().backward();
        let flat = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        [
            flat(y.inner()),
            flat(xa.grad(&grads).unwrap()),
            flat(wa.grad(&grads).unwrap()),
        ]
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs burn's matmul {b}"
            );
        }
    }

    #[test]
    fn product_and_gradients_equal_burns_matmul() {
        let device = Default::default();
        // One value; odd sizes; a product large enough to split over the cores (forward,
        // dX and dW each twice the per-thread threshold, 2^25 multiply-adds), with rows
        // not a multiple of the split.
        for [n, k, m] in [[1, 1, 1], [5, 7, 3], [1031, 257, 257]] {
            let x = drawn::<NdArray, 2>([n, k], (0.0, 1.0), 1, &device);
            let w = drawn::<NdArray, 2>([k, m], (0.0, 1.0), 2, &device);
            let (got, want) = (run(&x, &w, true), run(&x, &w, false));
            for (i, what) in ["product", "dX", "dW"].iter().enumerate() {
                assert_close(
                    &got[i],
                    &want[i],
                    &format!("{what} of [{n}, {k}] x [{k}, {m}]"),
                );
            }
        }
    }

    #[test]
    fn strided_operands_read_as_their_values() {
        let device = Default::default();
        // A transposed x and w: views with column strides.
        let x = drawn::<NdArray, 2>([70, 300], (0.0, 1.0), 3, &device).transpose();
        let w = drawn::<NdArray, 2>([90, 70], (0.0, 1.0), 4, &device).transpose();
        let (got, want) = (run(&x, &w, true), run(&x, &w, false));
        for (i, what) in ["product", "dX", "dW"].iter().enumerate() {
            assert_close(&got[i], &want[i], &format!("{what} of transposed operands"));
        }
    }
}
