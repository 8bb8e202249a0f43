//! Device implementations of [`crate::ops::RoutingOps`] (the CPU reference lives in
//! [`crate::cpu`]): one generic [`DeviceOps`] over a [`KernelSet`], instantiated for the
//! WGSL kernels ([`WgpuOps`], feature `wgpu`) and the CUDA kernels ([`CudaOps`]; a
//! stand-in without the `cuda` feature).

mod cuda_ops;
mod device_ops;
mod kernel_set;
#[cfg(feature = "wgpu")]
mod wgpu_ops;

pub use cuda_ops::{CudaArray, CudaOps};
pub use device_ops::{DeviceOps, GpuArray};
/// The grouped products' multiplication precision on CUDA (`CudaOps::kernels`).
pub use dtopp_cuda::GemmPrecision;
pub use kernel_set::{Keep, KernelSet, PlanBuffers, RoutedBuffers, SelectionBuffers};
#[cfg(feature = "wgpu")]
pub use wgpu_ops::{DeviceArray, WgpuOps};
