//! The backend `dtopp eval` and `dtopp generate` run the model on: burn's backend without
//! autodiff, routing through its routing extension on the model's own tensors
//! ([`crate::model::RoutingBackend`]).

use super::Backend;
use crate::error::Result;
use crate::model::RoutingBackend;

/// Work generic over the backend, run by [`on_inference_backend`].
pub(crate) trait InferenceJob {
    /// What the job returns.
    type Output;
    /// Runs on backend `B`'s `device`; `name` says which backend for the log.
    fn run<B: RoutingBackend>(self, device: &B::Device, name: &'static str)
    -> Result<Self::Output>;
}

/// Runs `job` on the burn backend `backend` names: ndarray (the CPU routing reference),
/// wgpu (dtopp's WGSL routing on burn's buffers) or CUDA, having checked it can start.
pub(crate) fn on_inference_backend<J: InferenceJob>(backend: Backend, job: J) -> Result<J::Output> {
    match backend {
        Backend::Cpu => job.run::<burn::backend::NdArray>(&Default::default(), "ndarray (CPU)"),
        Backend::CpuReference => Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let device = super::wgpu_model_device(burn::backend::wgpu::WgpuDevice::DefaultDevice)?;
            job.run::<burn::backend::Wgpu>(&device, "wgpu")
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            // The driver and device checked before burn-cuda touches them.
            super::cuda_backend()?;
            job.run::<burn::backend::Cuda>(&Default::default(), "cuda")
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => match super::cuda_backend() {
            Err(e) => Err(e),
            Ok(_) => unreachable!("the CUDA stand-in never constructs"),
        },
    }
}
