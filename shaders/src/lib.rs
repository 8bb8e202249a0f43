//! dtopp-shaders: the WGSL compute shaders of the routing ops (DRN, Top-p / Top-k
//! selection, dispatch plan, gather, combine, device-resident controller update) and the
//! `wgpu` host code that runs them behind `dtopp::ops::RoutingOps`.
//!
//! This crate is a member of the workspace from the start so that the dependency layout
//! (DESIGN.md section 2) is fixed; the kernels arrive with the WGSL issue. Until then it
//! exports nothing, and `dtopp --backend` offers only `cpu`.
