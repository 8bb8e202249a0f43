//! dtopp-cuda: the CUDA kernels of the routing ops (`.cu` files compiled at run time
//! through NVRTC, the driver loaded dynamically) behind `dtopp::ops::RoutingOps`.
//!
//! This crate is a member of the workspace from the start so that the dependency layout
//! (DESIGN.md section 2) is fixed; the kernels arrive with the CUDA issue. Until then it
//! exports nothing, and `dtopp --backend` offers only `cpu`. burn's own CUDA backend
//! already builds here (feature `cuda` of the `dtopp` crate, checked in CI).
