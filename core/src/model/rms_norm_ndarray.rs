//! burn ndarray's RMSNorm on its own arrays: one pass over the rows forward, one
//! backward, blocks of rows over the cores.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::ndarray_arrays::{array, contiguous, each_chunk, from_vec, slice, tensor};
use super::rms_norm::{RmsNormBackend, rms_norm_backward_ops, rms_norm_ops};

/// Values per block of rows. Below two blocks a pass stays on the calling thread (the
/// tiny preset's activations, 2^16 values, gain from two cores; smaller ones would not
/// repay the pool's hand-off).
const BLOCK: usize = 1 << 15;

impl RmsNormBackend for NdArray {
    const OWN_RMS_NORM: bool = true;

    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let [rows, d] = x.dims();
        if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 || rows * d == 0 {
            return rms_norm_ops(x, gamma, eps);
        }
        let (x, gamma) = (contiguous(array(x)), contiguous(array(gamma)));
        let (xs, gamma) = (slice(&x), slice(&gamma));
        let mut out = vec![0.0f32; rows * d];
        let pass = |(b, block): (usize, &mut [f32])| {
            let first = b * rows_per_block(d);
            for (i, y) in block.chunks_exact_mut(d).enumerate() {
                let row = &xs[(first + i) * d..(first + i + 1) * d];
                // burn's order of operations: the mean, + eps, sqrt, x / rms * gamma.
                let rms = (mean_square(row) + eps as f32).sqrt();
                for ((y, &v), &g) in y.iter_mut().zip(row).zip(gamma) {
                    *y = v / rms * g;
                }
            }
        };
        let parallel = out.len() > BLOCK;
        each_chunk(&mut out, rows_per_block(d) * d, parallel, pass);
        tensor(from_vec(&[rows, d], out))
    }

    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        grad: Tensor<Self, 2>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let [rows, d] = x.dims();
        if [x.dtype(), gamma.dtype(), grad.dtype()] != [DType::F32; 3] || rows * d == 0 {
            return rms_norm_backward_ops(x, gamma, grad, eps);
        }
        let (x, gamma, grad) = (
            contiguous(array(x)),
            contiguous(array(gamma)),
            contiguous(array(grad)),
        );
        let (xs, gamma, dys) = (slice(&x), slice(&gamma), slice(&grad));
        let per_block = rows_per_block(d);
        let mut d_x = vec![0.0f32; rows * d];
        // dGamma: one partial sum per block of rows, added in block order below, so the
        // result does not depend on how many threads ran.
        let blocks = rows.div_ceil(per_block);
        let mut partials = vec![0.0f32; blocks * d];
        let pass = |(b, (dx_block, partial)): (usize, (&mut [f32], &mut [f32]))| {
            let first = b * per_block;
            for (i, dx) in dx_block.chunks_exact_mut(d).enumerate() {
                let at = (first + i) * d..(first + i + 1) * d;
                let (row, dy) = (&xs[at.clone()], &dys[at]);
                let r = 1.0 / (mean_square(row) + eps as f32).sqrt();
                let mut gn = 0.0f32;
                for j in 0..d {
                    let n = row[j] * r;
                    partial[j] += dy[j] * n;
                    gn += dy[j] * gamma[j] * n;
                }
                let mean_gn = gn / d as f32;
                for j in 0..d {
                    dx[j] = r * (dy[j] * gamma[j] - row[j] * r * mean_gn);
                }
            }
        };
        if rows * d > BLOCK {
            let pairs = d_x
                .par_chunks_mut(per_block * d)
                .zip(partials.par_chunks_mut(d));
            pairs.enumerate().for_each(pass);
        } else {
            let pairs = d_x.chunks_mut(per_block * d).zip(partials.chunks_mut(d));
            pairs.enumerate().for_each(pass);
        }
        let mut d_gamma = vec![0.0f32; d];
        for partial in partials.chunks_exact(d) {
            for (acc, p) in d_gamma.iter_mut().zip(partial) {
                *acc += p;
            }
        }
        (
            tensor(from_vec(&[rows, d], d_x)),
            tensor(from_vec(&[d], d_gamma)),
        )
    }
}

/// `mean(x^2)` of a row.
#[inline(always)]
fn mean_square(row: &[f32]) -> f32 {
    row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32
}

/// Whole rows per block: about [`BLOCK`] values, at least one row (`d` > 0).
fn rows_per_block(d: usize) -> usize {
    (BLOCK / d).max(1)
}
