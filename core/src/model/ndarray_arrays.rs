//! The f32 arrays under burn ndarray's tensors, for the ops that work on them directly
//! (the grouped expert products, the fused AdamW pass): shared, not copied, both ways.

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use ndarray::{ArcArray, ArrayD, IxDyn};
use rayon::prelude::*;

/// The f32 array under a tensor (shared with it, not copied).
///
/// # Panics
/// If the tensor is not f32 (callers check the dtype first).
pub(crate) fn array<const D: usize>(t: Tensor<NdArray, D>) -> ArcArray<f32, IxDyn> {
    match t.into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(storage)) => storage.into_owned(),
        _ => unreachable!("the caller checked that the tensor is f32"),
    }
}

/// A tensor over `a` (not copied).
pub(crate) fn tensor<const D: usize>(a: ArcArray<f32, IxDyn>) -> Tensor<NdArray, D> {
    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::F32(a.into())))
}

/// An array of `shape` over `values` (row-major, one per element).
pub(crate) fn from_vec(shape: &[usize], values: Vec<f32>) -> ArcArray<f32, IxDyn> {
    ArrayD::from_shape_vec(IxDyn(shape), values)
        .expect("one value per element of the shape")
        .into_shared()
}

/// `a` in row-major order: itself when it already is (no copy), else a row-major copy.
pub(crate) fn contiguous(a: ArcArray<f32, IxDyn>) -> ArcArray<f32, IxDyn> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned().into_shared()
    }
}

pub(crate) fn slice(a: &ArcArray<f32, IxDyn>) -> &[f32] {
    a.as_slice()
        .expect("contiguous() returned a row-major array")
}

/// `pass((c, chunk))` on the consecutive chunks of `len` values of `out` (the last may be
/// shorter), chunk `c` starting at `c * len`: over the cores where `parallel`, else in
/// order on the calling thread.
pub(crate) fn each_chunk(
    out: &mut [f32],
    len: usize,
    parallel: bool,
    pass: impl Fn((usize, &mut [f32])) + Send + Sync,
) {
    if parallel {
        out.par_chunks_mut(len).enumerate().for_each(pass);
    } else {
        out.chunks_mut(len).enumerate().for_each(pass);
    }
}
