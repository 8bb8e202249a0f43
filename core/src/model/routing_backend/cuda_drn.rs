//! burn-cuda normalizes the router logits with dtopp's `drn.cu` kernels on burn's own
//! buffers, forward and backward ([`DrnBackend`]), queued on burn-cuda's stream through its
//! client ([`super::cuda_launch`]): theta is read on the device, so no layer waits for
//! the host. The same entry points run in `dtopp route --backend cuda`.

use burn::backend::Cuda;
use burn::tensor::{DType, Tensor};
use dtopp_cuda::DrnDims;

use super::clean_status;
use super::cuda_launch::{
    CudaModule, float, float_tensor, int, kernels_on, launch, or_panic, output,
};
use crate::model::drn::{DrnBackend, drn_backward_ops, drn_probs};
use crate::ops::DRN_EPS;

/// Tokens per block (`WARPS` in common.cuh): one warp per token.
const WARPS: usize = 8;
/// Threads of `drn_theta_sum`'s one block.
const SUM_THREADS: u32 = 256;

const DRN: CudaModule = CudaModule::new("drn.cu", dtopp_cuda::source::DRN);

impl DrnBackend for Cuda {
    const OWN_DRN: bool = true;

    fn drn_name() -> &'static str {
        if kernels_on() {
            "dtopp drn.cu kernels on burn-cuda's buffers"
        } else {
            "burn tensor ops (DTOPP_CUDA_KERNELS=off)"
        }
    }

    fn drn(logits: Tensor<Self, 2>, theta: Tensor<Self, 1>) -> Tensor<Self, 2> {
        if !kernels_on() {
            return drn_probs(logits, theta);
        }
        let device = logits.device();
        let [n, e] = logits.dims();
        if n * e == 0 {
            return Tensor::zeros([n, e], &device);
        }
        or_panic("drn_forward", &device);
        let status = int(clean_status::<Cuda>(&device));
        let logits = float(logits);
        let probs = output(&logits, [n, e], DType::F32);
        launch(
            DRN.kernel("drn_forward", (WARPS * 32) as u32),
            [n.div_ceil(WARPS) as u32, 1, 1],
            &[&logits, &float(theta), &probs, &status],
            &DrnDims::new(n, e, true, DRN_EPS),
        );
        float_tensor(probs)
    }

    fn drn_backward(
        logits: Tensor<Self, 2>,
        theta: Tensor<Self, 1>,
        probs: Tensor<Self, 2>,
        grad_probs: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        if !kernels_on() {
            return drn_backward_ops(logits, theta, probs, grad_probs);
        }
        let device = logits.device();
        let [n, e] = logits.dims();
        if n * e == 0 {
            return (Tensor::zeros([n, e], &device), Tensor::zeros([1], &device));
        }
        or_panic("drn_backward", &device);
        let status = int(clean_status::<Cuda>(&device));
        let logits = float(logits);
        let grad_logits = output(&logits, [n, e], DType::F32);
        let partials = output(&logits, [n], DType::F32);
        let grad_theta = output(&logits, [1], DType::F32);
        let dims = DrnDims::new(n, e, true, DRN_EPS);
        launch(
            DRN.kernel("drn_backward", (WARPS * 32) as u32),
            [n.div_ceil(WARPS) as u32, 1, 1],
            &[
                &logits,
                &float(theta),
                &float(probs),
                &float(grad_probs),
                &grad_logits,
                &partials,
                &status,
            ],
            &dims,
        );
        // The partials summed in a fixed order: no float atomics, the same bits each run.
        launch(
            DRN.kernel("drn_theta_sum", SUM_THREADS),
            [1, 1, 1],
            &[&partials, &grad_theta],
            &dims,
        );
        (float_tensor(grad_logits), float_tensor(grad_theta))
    }
}
