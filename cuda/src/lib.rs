//! dtopp-cuda: the CUDA kernels of the DTop-p routing ops (`src/kernels/*.cu`, one file
//! per op family, mirroring the WGSL kernels op for op) and the host code that compiles
//! them with NVRTC and launches them through cudarc.
//!
//! With the `cuda` feature the driver and NVRTC are loaded at run time, so the crate
//! builds on machines with no CUDA toolkit and no GPU; [`CudaKernels::new`] then reports
//! which of driver, NVRTC or device is missing. Without the feature the same types exist
//! as a stand-in whose constructor says the backend is not in the build, so callers need
//! no `#[cfg]`.
//!
//! The ops contract (`dtopp::ops::RoutingOps`) is implemented on top of this crate by
//! `dtopp::backends::CudaOps`.

#[cfg(feature = "cuda")]
mod device;
mod error;
pub mod params;
pub mod source;
#[cfg(not(feature = "cuda"))]
mod stand_in;

#[cfg(feature = "cuda")]
pub use device::{
    CudaKernels, DeviceBuffer, DispatchBuffers, FUSED_MAX_EXPERTS, RoutedBuffers, SelectionBuffers,
    compiled_modules, compute_capability, device_memory, driver_present, nvrtc_present,
};
pub use error::CudaError;
pub use params::{ControllerParams, DrnDims, GroupedDims, PlanDims, RowDims, SelectDims};

/// The precision of the grouped products' multiplications (inputs and outputs are f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPrecision {
    /// f32 on the CUDA cores.
    F32,
    /// bfloat16 operands on the tensor cores, f32 accumulators (sm_80 and newer).
    Bf16,
    /// IEEE half operands on the tensor cores, f32 accumulators.
    F16,
}
#[cfg(not(feature = "cuda"))]
pub use stand_in::{
    CudaKernels, DeviceBuffer, DispatchBuffers, FUSED_MAX_EXPERTS, RoutedBuffers, SelectionBuffers,
    compute_capability, device_memory, driver_present, nvrtc_present,
};
