//! burn-wgpu updates the device-resident PI controller(s) with dtopp's `controller.wgsl`
//! on burn's own buffers ([`ControllerBackend`]): the kernel `dtopp route` runs, one
//! workgroup per controller, so the next step's thresholds never leave the device.

use burn::backend::Wgpu;
use burn::tensor::{Int, Tensor};
use dtopp_shaders::ControllerLaw;

use super::wgpu::{float, int, kernels, launch, or_panic};
use crate::controller::ControllerConfig;
use crate::train::{ControllerBackend, controller_reads};

impl ControllerBackend for Wgpu {
    fn controllers_update(
        state: Tensor<Self, 2>,
        k_sum: Tensor<Self, 1, Int>,
        tokens: usize,
        config: &ControllerConfig,
    ) -> Tensor<Self, 2> {
        let device = state.device();
        let [c, _] = state.dims();
        let (len, per) = controller_reads(c, k_sum.dims()[0], tokens);
        let law = ControllerLaw {
            experts: config.num_experts,
            target: config.target as f32,
            gains: (config.kp as f32, config.ki as f32),
            clamp: (config.p_min as f32, config.p_max as f32),
        };
        let kernels = or_panic("controller_update", kernels(&device));
        // The kernel updates in place: a copy, so that `state` itself stays as it was.
        let out = state.clone() + 0.0;
        let tensors = [float(out.clone()), int(k_sum)];
        or_panic(
            "controller_update",
            launch(&tensors, |b| {
                kernels.controllers_update_into(b[0], b[1], [c, len], per, law)
            }),
        );
        out
    }
}
