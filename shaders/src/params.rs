//! Kernel parameter structs, `#[repr(C)]` and byte-for-byte mirrors of the WGSL structs
//! of the same name (uniform buffers: 16-byte multiples, checked at compile time).

use bytemuck::{Pod, Zeroable};

/// `DrnParams` in drn.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct DrnParams {
    pub tokens: u32,
    pub experts: u32,
    pub use_drn: u32,
    pub eps: f32,
    pub _pad: [u32; 4],
}

/// `SelectParams` in select.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SelectParams {
    pub tokens: u32,
    pub experts: u32,
    pub k: u32,
    pub k_max: u32,
}

/// `PlanParams` in dispatch.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct PlanParams {
    pub tokens: u32,
    pub experts: u32,
    pub chunk: u32,
    pub num_chunks: u32,
}

/// `MoveParams` in gather_combine.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct MoveParams {
    pub rows: u32,
    pub hidden: u32,
    pub experts: u32,
    pub _pad: u32,
}

/// `RowParams` in rows.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct RowParams {
    pub rows: u32,
    pub hidden: u32,
    pub sources: u32,
    pub slots: u32,
    pub weighted: u32,
    pub _pad: [u32; 3],
}

/// `ControllerParams` in controller.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ControllerParams {
    pub len: u32,
    pub experts: u32,
    pub target: f32,
    pub kp: f32,
    pub ki: f32,
    pub p_min: f32,
    pub p_max: f32,
    pub per: f32,
}

/// `GroupedParams` in grouped_matmul.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct GroupedParams {
    pub rows: u32,
    pub inner: u32,
    pub cols: u32,
    pub experts: u32,
    pub transposed: u32,
    pub col_tiles: u32,
    pub inner_tiles: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<DrnParams>() == 32);
const _: () = assert!(size_of::<GroupedParams>() == 32);
const _: () = assert!(size_of::<SelectParams>() == 16);
const _: () = assert!(size_of::<PlanParams>() == 16);
const _: () = assert!(size_of::<MoveParams>() == 16);
const _: () = assert!(size_of::<ControllerParams>() == 32);
