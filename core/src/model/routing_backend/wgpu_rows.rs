//! burn-wgpu moves the MoE layer's rows with dtopp's `rows.wgsl` kernels on burn's own
//! buffers, forward and backward ([`RowMovesBackend`]): dispatch is `gather_rows`, its
//! gradient `sum_rows` through the plan's inverse; combine is `sum_rows` with weights, its
//! gradients `gather_rows` and `row_dots`. burn's `select` and chunked gathers are not
//! used, and neither is its scatter.

use burn::backend::Wgpu;
use burn::tensor::{Int, Tensor};

use super::wgpu::{float, int, kernels, launch, or_panic};
use crate::model::routed_rows::RowMovesBackend;

impl RowMovesBackend for Wgpu {
    const BY_GATHERS: bool = true;

    fn row_moves_name() -> &'static str {
        "dtopp rows.wgsl kernels on burn's buffers, gathers both ways"
    }

    fn gather_rows(
        src: Tensor<Self, 2>,
        index: &Tensor<Self, 1, Int>,
        _inverse: Option<&Tensor<Self, 2, Int>>,
    ) -> Tensor<Self, 2> {
        let device = src.device();
        let [r, d] = src.dims();
        let m = index.dims()[0];
        if m * d == 0 || r == 0 {
            return Tensor::zeros([m, d], &device);
        }
        let kernels = or_panic("gather_rows", kernels(&device));
        let out = Tensor::<Self, 2>::empty([m, d], &device);
        let tensors = [float(src), int(index.clone()), float(out.clone())];
        or_panic(
            "gather_rows",
            launch(&tensors, |b| {
                kernels.gather_rows_into(b[0], b[1], [m, d, r], b[2])
            }),
        );
        out
    }

    fn sum_slots(
        values: Tensor<Self, 2>,
        weights: Option<Tensor<Self, 1>>,
        rows: &Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 2> {
        let device = values.device();
        let [m, d] = values.dims();
        let [r, s] = rows.dims();
        if r * d == 0 || m == 0 || s == 0 {
            return Tensor::zeros([r, d], &device);
        }
        let kernels = or_panic("sum_rows", kernels(&device));
        let out = Tensor::<Self, 2>::empty([r, d], &device);
        let weighted = weights.is_some();
        let mut tensors = vec![float(values), int(rows.clone()), float(out.clone())];
        tensors.extend(weights.map(float));
        or_panic(
            "sum_rows",
            launch(&tensors, |b| {
                kernels.sum_rows_into(b[0], weighted.then(|| b[3]), b[1], [r, d, m, s], b[2])
            }),
        );
        out
    }

    fn row_dots(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 1> {
        let device = lhs.device();
        let [m, d] = lhs.dims();
        if m == 0 || d == 0 {
            return Tensor::zeros([m], &device);
        }
        let kernels = or_panic("row_dots", kernels(&device));
        let out = Tensor::<Self, 1>::empty([m], &device);
        let tensors = [float(lhs), float(rhs), float(out.clone())];
        or_panic(
            "row_dots",
            launch(&tensors, |b| {
                kernels.row_dots_into(b[0], b[1], [m, d], b[2])
            }),
        );
        out
    }
}
