//! burn-cuda updates the device-resident PI controller(s) with dtopp's `controller.cu`
//! on burn's own buffers ([`ControllerBackend`]), one block per controller, queued on
//! burn-cuda's stream: one launch where burn's tensor ops take about twenty, and the
//! next step's thresholds never leave the device.

use burn::backend::Cuda;
use burn::tensor::{Int, Tensor};
use dtopp_cuda::ControllerParams;

use super::cuda_launch::{CudaModule, float, float_tensor, int, kernels_on, launch, or_panic};
use crate::controller::ControllerConfig;
use crate::train::{ControllerBackend, controller_reads, controllers_update_ops};

/// Threads of each controller's block (the kernel's shared array is this long).
const THREADS: u32 = 256;

const CONTROLLER: CudaModule = CudaModule::new("controller.cu", dtopp_cuda::source::CONTROLLER);

impl ControllerBackend for Cuda {
    fn controllers_update(
        state: Tensor<Self, 2>,
        k_sum: Tensor<Self, 1, Int>,
        tokens: usize,
        config: &ControllerConfig,
    ) -> Tensor<Self, 2> {
        if !kernels_on() {
            return controllers_update_ops(state, k_sum, tokens, config);
        }
        let device = state.device();
        or_panic("controller_update", &device);
        let [c, _] = state.dims();
        let (len, per) = controller_reads(c, k_sum.dims()[0], tokens);
        let law = ControllerParams {
            len: len as u32,
            experts: config.num_experts as u32,
            target: config.target as f32,
            kp: config.kp as f32,
            ki: config.ki as f32,
            p_min: config.p_min as f32,
            p_max: config.p_max as f32,
            per,
        };
        // The kernel updates in place: a copy, so that `state` itself stays as it was.
        let out = float(state + 0.0);
        launch(
            CONTROLLER.kernel("controller_update", THREADS),
            [c as u32, 1, 1],
            &[&int(k_sum), &out],
            &law,
        );
        float_tensor(out)
    }
}
