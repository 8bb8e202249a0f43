//! burn ndarray's dense products on its own arrays, over the cores: the output's rows
//! split into one block per thread, each block one `general_mat_mul` (the call burn's
//! `matmul` makes, on one core). Operands are read through their strides (matrixmultiply
//! packs any layout), so `W^T` and `X^T` in the backward are views, not copies.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, Ix2};
use rayon::prelude::*;

use super::dense_matmul::DenseMatmulBackend;
use super::ndarray_arrays::{array, tensor};

/// The multiply-adds a product must have per thread before its rows are split over the
/// threads. Measured with `dtopp bench train` on 2 cores (docs/benchmarks.md): at 2^22
/// the tiny preset's projections (2^22-2^24, `K` = 64) ran 10-15% slower split than on
/// one core, while bench/cpu-mid.toml's (2^26-2^28) gained 15% at 2^25 against one core.
const MIN_MACS_PER_THREAD: usize = 1 << 25;

impl DenseMatmulBackend for NdArray {
    const OWN_DENSE_MATMUL: bool = true;

    fn dense_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return x.matmul(w);
        }
        let (x, w) = (array(x), array(w));
        let (x, w) = (rank2(&x), rank2(&w));
        tensor(product(x, w).into_dyn().into_shared())
    }

    fn dense_matmul_backward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if [x.dtype(), w.dtype(), grad.dtype()] != [DType::F32; 3] {
            return (
                grad.clone().matmul(w.transpose()),
                x.transpose().matmul(grad),
            );
        }
        let (x, w, grad) = (array(x), array(w), array(grad));
        let (x, w, g) = (rank2(&x), rank2(&w), rank2(&grad));
        let d_x = product(g, w.t());
        let d_w = product(x.t(), g);
        (
            tensor(d_x.into_dyn().into_shared()),
            tensor(d_w.into_dyn().into_shared()),
        )
    }
}

fn rank2(a: &ndarray::ArcArray<f32, ndarray::IxDyn>) -> ArrayView2<'_, f32> {
    a.view()
        .into_dimensionality::<Ix2>()
        .expect("burn's dims said rank 2")
}

/// `a b`, the rows of `a` (and of the output) split over the threads where each block
/// has [`MIN_MACS_PER_THREAD`] multiply-adds (smaller products lose more to the pool's
/// hand-off and the repacked weight than they gain).
fn product(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
    let (n, k, m) = (a.nrows(), a.ncols(), b.ncols());
    let mut out = Array2::<f32>::zeros((n, m));
    let macs = n.saturating_mul(k).saturating_mul(m);
    let parts = rayon::current_num_threads()
        .min(macs / MIN_MACS_PER_THREAD)
        .min(n)
        .max(1);
    let one = |(a, mut out): (ArrayView2<f32>, ArrayViewMut2<f32>)| {
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut out);
    };
    if parts == 1 {
        one((a, out.view_mut()));
    } else {
        let rows = n.div_ceil(parts);
        let blocks: Vec<_> = a
            .axis_chunks_iter(Axis(0), rows)
            .zip(out.axis_chunks_iter_mut(Axis(0), rows))
            .collect();
        blocks.into_par_iter().for_each(one);
    }
    out
}
