//! Device implementations of [`crate::ops::RoutingOps`] (the CPU reference lives in
//! [`crate::cpu`]).

#[cfg(feature = "wgpu")]
mod wgpu_ops;

#[cfg(feature = "wgpu")]
pub use wgpu_ops::{DeviceArray, WgpuOps};
