//! burn ndarray's grouped expert products on its own arrays: each expert's rows and
//! matrix are views, and each product is written straight into its rows of the output
//! (forward and `dX`) or into its matrix of `[E, D, F]` (`dW`).
//!
//! Why: burn ndarray's `slice` copies (`to_owned`), and `cat`/`stack` copy again, so the
//! tensor-op form moved every routed row and every expert matrix twice more than the
//! products read them (`perf` on the tiny preset: 10% of a step in `memmove`, a third of
//! it here). The products are the same `general_mat_mul` calls burn's `matmul` makes,
//! on the same values, so the results are bit-identical.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use ndarray::{Array2, Array3, ArrayViewMut2, Axis, Ix2, Ix3, s};
use rayon::prelude::*;

use super::grouped_matmul::{GroupedMatmulBackend, side_by_side, sliced_products, weight_grad};
use super::ndarray_arrays::{array, tensor};
use super::precision::Precision;

impl GroupedMatmulBackend for NdArray {
    const PARALLEL_EXPERTS: bool = true;

    fn grouped_matmul(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: &[usize],
        precision: Precision,
    ) -> Tensor<Self, 2> {
        if precision != Precision::F32 || xs.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return sliced_products(xs, w, offsets, precision);
        }
        let [_, d, f] = w.dims();
        let (xs_array, w_array) = (array(xs), array(w));
        let (Some(x), Some(w)) = (
            xs_array.view().into_dimensionality::<Ix2>().ok(),
            w_array.view().into_dimensionality::<Ix3>().ok(),
        ) else {
            unreachable!("burn's dims said rank 2 and 3");
        };
        // Row-major, as burn's own products see them after its slices copied them (a
        // copy here only where a tensor is a transposed or strided view, such as `W^T`
        // in `dX`).
        let (x, w) = (x.as_standard_layout(), w.as_standard_layout());
        let mut out = Array2::<f32>::zeros((x.nrows(), f));
        let parts = row_blocks(out.view_mut(), offsets);
        let product = |(e, mut rows): (usize, ArrayViewMut2<f32>)| {
            let (start, end) = (offsets[e], offsets[e + 1]);
            ndarray::linalg::general_mat_mul(
                1.0,
                &x.slice(s![start..end, ..]),
                &w.index_axis(Axis(0), e),
                0.0,
                &mut rows,
            );
        };
        each_expert(parts, side_by_side::<Self>(offsets, [d, f]), product);
        tensor(out.into_dyn().into_shared())
    }

    fn grouped_weight_grad(
        xs: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        dims: [usize; 3],
        offsets: &[usize],
        precision: Precision,
    ) -> Tensor<Self, 3> {
        if precision != Precision::F32 || xs.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return weight_grad(xs, grad, dims, offsets, precision);
        }
        let [e, d, f] = dims;
        let (xs_array, grad_array) = (array(xs), array(grad));
        let (Some(x), Some(g)) = (
            xs_array.view().into_dimensionality::<Ix2>().ok(),
            grad_array.view().into_dimensionality::<Ix2>().ok(),
        ) else {
            unreachable!("burn's dims said rank 2");
        };
        let mut out = Array3::<f32>::zeros((e, d, f));
        // An expert without rows keeps its zero matrix.
        let product = |(e, mut matrix): (usize, ArrayViewMut2<f32>)| {
            let (start, end) = (offsets[e], offsets[e + 1]);
            if start < end {
                ndarray::linalg::general_mat_mul(
                    1.0,
                    &x.slice(s![start..end, ..]).t(),
                    &g.slice(s![start..end, ..]),
                    0.0,
                    &mut matrix,
                );
            }
        };
        let matrices = out.outer_iter_mut().enumerate().collect();
        each_expert(matrices, side_by_side::<Self>(offsets, [d, f]), product);
        tensor(out.into_dyn().into_shared())
    }
}

/// `product` on each expert's part of an output, side by side on the host's cores where
/// `parallel` (the products are large enough, [`side_by_side`]).
fn each_expert<'a>(
    parts: Vec<(usize, ArrayViewMut2<'a, f32>)>,
    parallel: bool,
    product: impl Fn((usize, ArrayViewMut2<'a, f32>)) + Send + Sync,
) {
    if parallel {
        parts.into_par_iter().for_each(product);
    } else {
        parts.into_iter().for_each(product);
    }
}

/// `out` split into each expert's rows, `(expert, rows)`.
fn row_blocks<'a>(
    mut out: ArrayViewMut2<'a, f32>,
    offsets: &[usize],
) -> Vec<(usize, ArrayViewMut2<'a, f32>)> {
    let mut blocks = Vec::with_capacity(offsets.len().saturating_sub(1));
    for (e, pair) in offsets.windows(2).enumerate() {
        let (rows, rest) = out.split_at(Axis(0), pair[1] - pair[0]);
        blocks.push((e, rows));
        out = rest;
    }
    blocks
}
