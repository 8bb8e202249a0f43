//! burn-cuda's grouped expert products with dtopp's `grouped_matmul.cu` on burn's own
//! buffers ([`super::cuda_launch`]): the experts' offsets stay on the device, so the
//! grouped layout runs a MoE layer forward and backward with no host read and no host
//! wait ([`GroupedMatmulBackend`]). f32 products on the CUDA cores; bf16 and f16 forward
//! products (and the backward's `dX`) on the tensor cores, `dW` in f32.
//!
//! The host-offset entry points (the exact layout) keep the default, burn's own products
//! on slices (cuBLAS-class kernels, autotuned, when the shapes are on the host).

use burn::backend::Cuda;
use burn::tensor::{DType, Int, Tensor};
use dtopp_cuda::GroupedDims;

use super::cuda_launch::{
    CudaModule, float, float_tensor, int, kernels_on, launch, or_panic, output,
};
use crate::model::grouped_matmul::GroupedMatmulBackend;
use crate::model::grouped_offsets::{
    product_dims, through_host, trivial_product, weight_grad_through_host,
};
use crate::model::precision::Precision;

/// Rows and columns of a block's output tile (`TILE` in grouped_matmul.cu).
const TILE: usize = 64;
/// CUDA's limit on a grid's y and z extents.
const GRID_YZ_MAX: usize = 65_535;

const MODULE: CudaModule = CudaModule::new("grouped_matmul.cu", dtopp_cuda::source::GROUPED_MATMUL);

impl GroupedMatmulBackend for Cuda {
    fn device_offsets() -> bool {
        kernels_on()
    }

    fn grouped_matmul_on_device(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: Tensor<Self, 1, Int>,
        transposed: bool,
        precision: Precision,
    ) -> Tensor<Self, 2> {
        if !kernels_on() {
            return through_host(xs, w, offsets, transposed, precision);
        }
        let device = xs.device();
        let dims = product_dims(&xs, &w, &offsets, transposed);
        if let Some(out) = trivial_product(dims, &device) {
            return out;
        }
        let [rows, inner, cols, experts] = dims;
        or_panic("grouped_matmul", &device);
        // Row tiles: a bound on the experts' tiles (each wastes less than one); the spare
        // blocks zero the rows past the routes.
        let row_tiles = rows.div_ceil(TILE) + experts;
        assert!(
            row_tiles <= GRID_YZ_MAX,
            "grouped product: {rows} rows and {experts} experts need {row_tiles} row tiles, past CUDA's {GRID_YZ_MAX}"
        );
        let (entry, threads) = match precision {
            Precision::F32 => ("grouped_forward_f32", 256),
            Precision::Bf16 => ("grouped_forward_bf16", 128),
            Precision::F16 => ("grouped_forward_f16", 128),
        };
        let (xs, w, offsets) = (float(xs), float(w), int(offsets));
        let out = output(&xs, [rows, cols], DType::F32);
        let dims = GroupedDims::new([rows, inner, cols, experts], transposed);
        launch(
            MODULE.kernel(entry, threads),
            [cols.div_ceil(TILE) as u32, row_tiles as u32, 1],
            &[&offsets, &xs, &w, &out],
            &dims,
        );
        float_tensor(out)
    }

    fn grouped_weight_grad_on_device(
        xs: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        dims: [usize; 3],
        offsets: Tensor<Self, 1, Int>,
        precision: Precision,
    ) -> Tensor<Self, 3> {
        if !kernels_on() {
            return weight_grad_through_host(xs, grad, dims, offsets, precision);
        }
        let device = xs.device();
        let [experts, inner, cols] = dims;
        let rows = xs.dims()[0];
        if experts * inner * cols == 0 || rows == 0 {
            return Tensor::zeros(dims, &device);
        }
        or_panic("grouped_weight_grad", &device);
        assert!(
            experts <= GRID_YZ_MAX && inner.div_ceil(TILE) <= GRID_YZ_MAX,
            "grouped weight gradient: {experts} experts of [{inner}, {cols}] past CUDA's grid"
        );
        let (xs, grad, offsets) = (float(xs), float(grad), int(offsets));
        let out = output(&xs, dims, DType::F32);
        let params = GroupedDims::new([rows, inner, cols, experts], false);
        launch(
            MODULE.kernel("grouped_weight_grad_f32", 256),
            [
                cols.div_ceil(TILE) as u32,
                inner.div_ceil(TILE) as u32,
                experts as u32,
            ],
            &[&offsets, &xs, &grad, &out],
            &params,
        );
        float_tensor(out)
    }
}
