//! burn-wgpu normalizes the router logits with dtopp's `drn.wgsl` kernels on burn's own
//! buffers, forward and backward ([`DrnBackend`]): theta is read on the device, so no
//! layer waits for the host. The same text runs in `dtopp route` and the benchmarks.

use burn::backend::Wgpu;
use burn::tensor::Tensor;
use dtopp_shaders::{DrnBackwardIn, DrnBackwardOut};

use super::clean_status;
use super::wgpu::{float, int, kernels, launch, or_panic};
use crate::model::drn::DrnBackend;

impl DrnBackend for Wgpu {
    const OWN_DRN: bool = true;

    fn drn_name() -> &'static str {
        "dtopp drn.wgsl kernels on burn's buffers"
    }

    fn drn(logits: Tensor<Self, 2>, theta: Tensor<Self, 1>) -> Tensor<Self, 2> {
        let device = logits.device();
        let [n, e] = logits.dims();
        if n * e == 0 {
            return Tensor::zeros([n, e], &device);
        }
        let kernels = or_panic("drn_forward", kernels(&device));
        let probs = Tensor::<Self, 2>::empty([n, e], &device);
        let tensors = [
            float(logits),
            float(theta),
            float(probs.clone()),
            int(clean_status::<Wgpu>(&device)),
        ];
        or_panic(
            "drn_forward",
            launch(&tensors, |b| {
                kernels.drn_forward_into(b[0], b[1], [n, e], true, b[2], b[3])
            }),
        );
        probs
    }

    fn drn_backward(
        logits: Tensor<Self, 2>,
        theta: Tensor<Self, 1>,
        probs: Tensor<Self, 2>,
        grad_probs: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let device = logits.device();
        let [n, e] = logits.dims();
        if n * e == 0 {
            return (Tensor::zeros([n, e], &device), Tensor::zeros([1], &device));
        }
        let kernels = or_panic("drn_backward", kernels(&device));
        let grad_logits = Tensor::<Self, 2>::empty([n, e], &device);
        let partials = Tensor::<Self, 1>::empty([n], &device);
        let grad_theta = Tensor::<Self, 1>::empty([1], &device);
        let tensors = [
            float(logits),
            float(theta),
            float(probs),
            float(grad_probs),
            float(grad_logits.clone()),
            float(partials),
            float(grad_theta.clone()),
            int(clean_status::<Wgpu>(&device)),
        ];
        or_panic(
            "drn_backward",
            launch(&tensors, |b| {
                kernels.drn_backward_into(
                    DrnBackwardIn {
                        logits: b[0],
                        theta: b[1],
                        probs: b[2],
                        grad_probs: b[3],
                    },
                    [n, e],
                    true,
                    DrnBackwardOut {
                        grad_logits: b[4],
                        theta_partials: b[5],
                        grad_theta: b[6],
                        status: b[7],
                    },
                )
            }),
        );
        (grad_logits, grad_theta)
    }
}
