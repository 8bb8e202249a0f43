//! burn-cuda moves the MoE layer's rows with dtopp's `rows.cu` kernels on burn's own
//! buffers, forward and backward ([`RowMovesBackend`]), as burn-wgpu does with
//! `rows.wgsl`: dispatch is `gather_rows`, its gradient `sum_rows` through the plan's
//! inverse; combine is `sum_rows_weighted`, its gradients `gather_rows` and `row_dots`.
//! One launch each, where burn's tensor ops take a gather, a multiply and a reduction per
//! chunk of slots.

use burn::backend::Cuda;
use burn::tensor::{DType, Int, Tensor};
use dtopp_cuda::RowDims;

use super::cuda_launch::{
    CudaModule, float, float_tensor, int, kernels_on, launch, or_panic, output,
};
use crate::model::routed_rows::{RowMovesBackend, sum_rows_plain};

/// Threads per block of the element-wise kernels.
const THREADS: usize = 256;
/// Rows per block of `row_dots` (a warp per row; `WARPS` in common.cuh).
const WARPS: usize = 8;

const ROWS: CudaModule = CudaModule::new("rows.cu", dtopp_cuda::source::ROWS);

/// Blocks for one thread per element of `[rows, width]`.
fn element_grid(rows: usize, width: usize) -> [u32; 3] {
    [(rows * width).div_ceil(THREADS) as u32, 1, 1]
}

impl RowMovesBackend for Cuda {
    const BY_GATHERS: bool = true;

    fn row_moves_name() -> &'static str {
        if kernels_on() {
            "dtopp rows.cu kernels on burn-cuda's buffers, gathers both ways"
        } else {
            "burn gathers both ways (DTOPP_CUDA_KERNELS=off)"
        }
    }

    fn gather_rows(
        src: Tensor<Self, 2>,
        index: &Tensor<Self, 1, Int>,
        _inverse: Option<&Tensor<Self, 2, Int>>,
    ) -> Tensor<Self, 2> {
        if !kernels_on() {
            return src.select(0, index.clone());
        }
        let device = src.device();
        let [r, d] = src.dims();
        let m = index.dims()[0];
        if m * d == 0 || r == 0 {
            return Tensor::zeros([m, d], &device);
        }
        or_panic("gather_rows", &device);
        let src = float(src);
        let out = output(&src, [m, d], DType::F32);
        launch(
            ROWS.kernel("gather_rows", THREADS as u32),
            element_grid(m, d),
            &[&src, &int(index.clone()), &out],
            &RowDims::new([m, d, r, 0]),
        );
        float_tensor(out)
    }

    fn sum_slots(
        values: Tensor<Self, 2>,
        weights: Option<Tensor<Self, 1>>,
        rows: &Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 2> {
        if !kernels_on() {
            return sum_rows_plain(values, weights, rows);
        }
        let device = values.device();
        let [m, d] = values.dims();
        let [r, s] = rows.dims();
        if r * d == 0 || m == 0 || s == 0 {
            return Tensor::zeros([r, d], &device);
        }
        or_panic("sum_rows", &device);
        let values = float(values);
        let rows = int(rows.clone());
        let out = output(&values, [r, d], DType::F32);
        let dims = RowDims::new([r, d, m, s]);
        let grid = element_grid(r, d);
        match weights {
            Some(w) => launch(
                ROWS.kernel("sum_rows_weighted", THREADS as u32),
                grid,
                &[&values, &float(w), &rows, &out],
                &dims,
            ),
            None => launch(
                ROWS.kernel("sum_rows", THREADS as u32),
                grid,
                &[&values, &rows, &out],
                &dims,
            ),
        }
        float_tensor(out)
    }

    fn row_dots(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 1> {
        let device = lhs.device();
        let [m, d] = lhs.dims();
        if !kernels_on() {
            return (lhs * rhs).sum_dim(1).reshape([m]);
        }
        if m == 0 || d == 0 {
            return Tensor::zeros([m], &device);
        }
        or_panic("row_dots", &device);
        let lhs = float(lhs);
        let out = output(&lhs, [m], DType::F32);
        launch(
            ROWS.kernel("row_dots", (WARPS * 32) as u32),
            [m.div_ceil(WARPS) as u32, 1, 1],
            &[&lhs, &float(rhs), &out],
            &RowDims::new([m, d, m, 0]),
        );
        float_tensor(out)
    }
}
