//! burn ndarray's per-token cross-entropy on its own arrays: one pass over the rows
//! forward (a log-sum-exp and a pick), one backward, blocks of rows over the cores.

use burn::backend::NdArray;
use burn::tensor::{DType, Int, Tensor};

use super::ndarray_arrays::{array, contiguous, each_chunk, from_vec, slice, tensor};
use super::token_losses::{TokenLossesBackend, token_losses_backward_ops, token_losses_ops};
use crate::cpu_fast::exp_nonpositive;

/// Logits per block of rows. Below two blocks a pass stays on the calling thread (the
/// tiny preset's logits, 2^18 values, gain from two cores).
const BLOCK: usize = 1 << 15;

impl TokenLossesBackend for NdArray {
    const OWN_TOKEN_LOSSES: bool = true;

    fn token_losses(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Tensor<Self, 1> {
        let [n, v] = logits.dims();
        if logits.dtype() != DType::F32 || n * v == 0 {
            return token_losses_ops(logits, targets);
        }
        let targets = target_indices(targets, v);
        let logits = contiguous(array(logits));
        let z = slice(&logits);
        let mut losses = vec![0.0f32; n];
        let rows = rows_per_block(v);
        let pass = |(b, block): (usize, &mut [f32])| {
            for (i, loss) in block.iter_mut().enumerate() {
                let t = b * rows + i;
                let row = &z[t * v..(t + 1) * v];
                *loss = log_sum_exp(row) - row[targets[t]];
            }
        };
        each_chunk(&mut losses, rows, n * v > BLOCK, pass);
        tensor(from_vec(&[n], losses))
    }

    fn token_losses_backward(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        grad: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        let [n, v] = logits.dims();
        if logits.dtype() != DType::F32 || grad.dtype() != DType::F32 || n * v == 0 {
            return token_losses_backward_ops(logits, targets, grad);
        }
        let targets = target_indices(targets, v);
        let (logits, grad) = (contiguous(array(logits)), contiguous(array(grad)));
        let (z, g) = (slice(&logits), slice(&grad));
        let mut d_logits = vec![0.0f32; n * v];
        let rows = rows_per_block(v);
        let pass = |(b, block): (usize, &mut [f32])| {
            for (i, out) in block.chunks_exact_mut(v).enumerate() {
                let t = b * rows + i;
                let row = &z[t * v..(t + 1) * v];
                let lse = log_sum_exp(row);
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = g[t] * exp_nonpositive(x - lse);
                }
                out[targets[t]] -= g[t];
            }
        };
        each_chunk(&mut d_logits, rows * v, n * v > BLOCK, pass);
        tensor(from_vec(&[n, v], d_logits))
    }
}

/// `ln sum exp(row)`, from the row's maximum so that no term overflows; NaN where the
/// row holds one, +inf where it holds +inf.
#[inline]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(
        f32::NEG_INFINITY,
        |m, &x| if x > m || x.is_nan() { x } else { m },
    );
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = row.iter().map(|&x| exp_nonpositive(x - max)).sum();
    max + sum.ln()
}

/// The targets as indices into a row of `v` logits.
///
/// # Panics
/// If one is outside `0..v`: the data loader keeps tokens inside the vocabulary, so this
/// is a broken invariant, not bad input.
fn target_indices(targets: Tensor<NdArray, 1, Int>, v: usize) -> Vec<usize> {
    let data = targets.into_data();
    let values = data.convert::<i64>().to_vec::<i64>().expect("i64 targets");
    values
        .into_iter()
        .map(|t| {
            usize::try_from(t)
                .ok()
                .filter(|&t| t < v)
                .unwrap_or_else(|| panic!("target token {t} outside the vocabulary of {v}"))
        })
        .collect()
}

/// Whole rows per block: about [`BLOCK`] logits, at least one row (`v` > 0).
fn rows_per_block(v: usize) -> usize {
    (BLOCK / v).max(1)
}
