//! burn-wgpu's grouped expert products with dtopp's `grouped_matmul.wgsl` on burn's own
//! buffers: the experts' offsets stay on the device, so the grouped layout runs a MoE
//! layer forward and backward with no host read ([`GroupedMatmulBackend`]).
//!
//! The host-offset entry points (the exact layout) keep the default, burn's own products
//! on slices: with the shapes on the host, burn's tuned matmul measured faster on
//! lavapipe than this kernel (docs/benchmarks.md). Products in f32 only: another
//! precision takes the default, through the host.

use burn::backend::Wgpu;
use burn::tensor::{Int, Tensor};

use super::wgpu::{float, int, kernels, launch, or_panic};
use crate::model::grouped_matmul::GroupedMatmulBackend;
use crate::model::grouped_offsets::{
    product_dims, through_host, trivial_product, weight_grad_through_host,
};
use crate::model::precision::Precision;

impl GroupedMatmulBackend for Wgpu {
    fn device_offsets() -> bool {
        true
    }

    fn grouped_matmul_on_device(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: Tensor<Self, 1, Int>,
        transposed: bool,
        precision: Precision,
    ) -> Tensor<Self, 2> {
        if precision != Precision::F32 {
            return through_host(xs, w, offsets, transposed, precision);
        }
        let device = xs.device();
        let dims = product_dims(&xs, &w, &offsets, transposed);
        if let Some(out) = trivial_product(dims, &device) {
            return out;
        }
        let [rows, _, cols, _] = dims;
        let out = Tensor::<Self, 2>::empty([rows, cols], &device);
        let kernels = or_panic("grouped_matmul", kernels(&device));
        let tensors = [float(xs), float(w), int(offsets), float(out.clone())];
        or_panic(
            "grouped_matmul",
            launch(&tensors, |t| {
                kernels.grouped_matmul_into(t[0], t[1], t[2], dims, transposed, t[3])
            }),
        );
        out
    }

    fn grouped_weight_grad_on_device(
        xs: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        dims: [usize; 3],
        offsets: Tensor<Self, 1, Int>,
        precision: Precision,
    ) -> Tensor<Self, 3> {
        if precision != Precision::F32 {
            return weight_grad_through_host(xs, grad, dims, offsets, precision);
        }
        let device = xs.device();
        let [experts, inner, cols] = dims;
        let rows = xs.dims()[0];
        if experts * inner * cols == 0 {
            return Tensor::zeros(dims, &device);
        }
        if rows == 0 {
            return Tensor::zeros(dims, &device);
        }
        let kernels = or_panic("grouped_weight_grad", kernels(&device));
        let out = Tensor::<Self, 3>::empty(dims, &device);
        let tensors = [float(xs), float(grad), int(offsets), float(out.clone())];
        or_panic(
            "grouped_weight_grad",
            launch(&tensors, |t| {
                kernels.grouped_weight_grad_into(
                    t[0],
                    t[1],
                    t[2],
                    [rows, inner, cols, experts],
                    t[3],
                )
            }),
        );
        out
    }
}
