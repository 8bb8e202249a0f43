//! dtopp-shaders: the WGSL compute shaders of the DTop-p routing ops and the `wgpu` host
//! code that runs them.
//!
//! - [`source`]: the `.wgsl` files (DRN, selection, dispatch plan, gather/combine,
//!   device-resident controller), valid WGSL on their own;
//! - [`GpuContext`]: a device and queue, requested here or passed in by the caller (the
//!   trainer, the desktop app and tests share one);
//! - [`RoutingKernels`]: pipelines compiled once, and one method per op.
//!
//! The ops contract (`dtopp::ops::RoutingOps`) is implemented on top of this crate by
//! `dtopp::backends::WgpuOps`, which keeps this crate a leaf of the workspace.

mod context;
mod error;
mod kernels;
mod params;
pub mod source;

pub use bytemuck;
pub use context::GpuContext;
pub use error::ShaderError;
pub use kernels::{
    Bound, ControllerLaw, DispatchBuffers, DrnBackwardIn, DrnBackwardOut, PlanOut, RoutingKernels,
    SelectionBuffers, SelectionOut,
};
pub use wgpu;
