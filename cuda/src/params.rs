//! The scalars of the kernels that take them as one struct passed by value
//! (`GroupedDims` in grouped_matmul.cu, `SelectDims` in select.cu, `PlanDims` in
//! dispatch.cu, `DrnDims` in drn.cu, `RowDims` in rows.cu, `ControllerParams` in
//! controller.cu), laid out as the kernels declare them. One struct, two launchers: cudarc pushes it as one argument
//! ([`crate::CudaKernels`]), and dtopp's launches through cubecl's client on burn-cuda's
//! buffers pass it as the kernel's metadata block ([`words`]), which cubecl appends after
//! the buffers.

use bytemuck::{Pod, Zeroable};

/// `GroupedDims`: the grouped products' shape; `transposed` (0 or 1) is read by the
/// forward kernels only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct GroupedDims {
    /// Rows of `x` (a bound on the routes).
    pub rows: u32,
    /// Width of a row of `x`.
    pub inner: u32,
    /// Width of a row of the output.
    pub cols: u32,
    /// Experts (`E`; the offsets have `E + 1` entries).
    pub experts: u32,
    /// 1: the matrices are `[E, cols, inner]`, read transposed.
    pub transposed: u32,
}

impl GroupedDims {
    /// `[rows, inner, cols, experts]`, `w` read transposed or not.
    pub fn new([rows, inner, cols, experts]: [usize; 4], transposed: bool) -> Self {
        Self {
            rows: rows as u32,
            inner: inner as u32,
            cols: cols as u32,
            experts: experts as u32,
            transposed: u32::from(transposed),
        }
    }
}

/// `SelectDims`: a selection's shape and count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SelectDims {
    /// Tokens (`N`).
    pub tokens: u32,
    /// Experts per token (`E`).
    pub experts: u32,
    /// Top-k's `k`, or Top-p's cap on experts per token (0: none).
    pub k: u32,
}

impl SelectDims {
    /// `tokens` x `experts`, taking `k` (Top-k's `k`, or Top-p's cap, 0 for none).
    pub fn new(tokens: usize, experts: usize, k: usize) -> Self {
        Self {
            tokens: tokens as u32,
            experts: experts as u32,
            k: k as u32,
        }
    }
}

/// Tokens per chunk of the dispatch plan, as its launchers split the tokens.
pub const PLAN_CHUNK: usize = 32;

/// `PlanDims`: a dispatch plan's shape and chunking.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PlanDims {
    /// Tokens (`N`).
    pub tokens: u32,
    /// Experts per token (`E`).
    pub experts: u32,
    /// Tokens per chunk.
    pub chunk: u32,
    /// Chunks (`ceil(N / chunk)`).
    pub num_chunks: u32,
}

impl PlanDims {
    /// The plan of `tokens` x `experts`, in chunks of [`PLAN_CHUNK`] tokens.
    pub fn new(tokens: usize, experts: usize) -> Self {
        Self {
            tokens: tokens as u32,
            experts: experts as u32,
            chunk: PLAN_CHUNK as u32,
            num_chunks: tokens.div_ceil(PLAN_CHUNK) as u32,
        }
    }
}

/// DRN's variance epsilon, `dtopp::ops::DRN_EPS` (this crate sits below dtopp; a test
/// there holds the two equal).
pub const DRN_EPS: f32 = 1e-6;

/// `DrnDims`: DRN's shape, whether it standardizes, and its epsilon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct DrnDims {
    /// Tokens (`N`).
    pub tokens: u32,
    /// Experts per token (`E`).
    pub experts: u32,
    /// 1: DRN (theta read from its buffer); 0: plain softmax.
    pub use_drn: i32,
    /// The variance's epsilon (`dtopp::ops::DRN_EPS`).
    pub eps: f32,
}

impl DrnDims {
    /// `tokens` x `experts`, with DRN or plain softmax.
    pub fn new(tokens: usize, experts: usize, use_drn: bool, eps: f32) -> Self {
        Self {
            tokens: tokens as u32,
            experts: experts as u32,
            use_drn: i32::from(use_drn),
            eps,
        }
    }
}

/// `RowDims`: the row moves' shape (rows.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RowDims {
    /// Output rows.
    pub rows: u32,
    /// Width `D`.
    pub hidden: u32,
    /// Rows of the source (`gather_rows`) or of the values (`sum_rows`).
    pub sources: u32,
    /// Slots per output row (`sum_rows`).
    pub slots: u32,
}

impl RowDims {
    /// `[rows, hidden, sources, slots]`.
    pub fn new([rows, hidden, sources, slots]: [usize; 4]) -> Self {
        Self {
            rows: rows as u32,
            hidden: hidden as u32,
            sources: sources as u32,
            slots: slots as u32,
        }
    }
}

/// `ControllerParams`: the PI law of controller.cu, for controllers that each read `len`
/// counts covering `per` tokens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct ControllerParams {
    /// Counts per controller.
    pub len: u32,
    /// Experts (`E`).
    pub experts: u32,
    /// The target `T`.
    pub target: f32,
    /// Proportional gain.
    pub kp: f32,
    /// Integral gain.
    pub ki: f32,
    /// Lower clamp of `p`.
    pub p_min: f32,
    /// Upper clamp of `p`.
    pub p_max: f32,
    /// Tokens one controller's counts cover.
    pub per: f32,
}

/// `params`' bytes in 8-byte words, zero padded: the form cubecl's launch arguments carry
/// a kernel's metadata block in. The kernel reads its struct from the block's start.
pub fn words<T: Pod>(params: &T) -> Vec<u64> {
    let bytes = bytemuck::bytes_of(params);
    bytes
        .chunks(8)
        .map(|chunk| {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            u64::from_ne_bytes(word)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hold_the_struct_bytes_in_order() {
        let dims = GroupedDims {
            rows: 1,
            inner: 2,
            cols: 3,
            experts: 4,
            transposed: 5,
        };
        let w = words(&dims);
        assert_eq!(w.len(), 3);
        let back: &[u8] = bytemuck::cast_slice(&w);
        assert_eq!(&back[..20], bytemuck::bytes_of(&dims));
        assert_eq!(&back[20..], &[0; 4]);
        assert_eq!(size_of::<SelectDims>(), 12);
        assert_eq!(size_of::<DrnDims>(), 16);
        assert_eq!(size_of::<RowDims>(), 16);
        assert_eq!(size_of::<ControllerParams>(), 32);
    }
}
