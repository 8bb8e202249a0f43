//! Device implementations of [`crate::ops::RoutingOps`] (the CPU reference lives in
//! [`crate::cpu`]).

mod cuda_ops;
#[cfg(feature = "wgpu")]
mod wgpu_ops;

pub use cuda_ops::{CudaArray, CudaOps};

#[cfg(feature = "wgpu")]
pub use wgpu_ops::{DeviceArray, WgpuOps};
