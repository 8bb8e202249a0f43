//! burn ndarray's SwiGLU gate on its own arrays: one pass forward, one pass backward,
//! blocks of values over the cores.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::ndarray_arrays::{array, contiguous, each_chunk, from_vec, slice, tensor};
use super::swiglu::{SwigluBackend, swiglu_backward_ops};
use crate::cpu_fast::exp_nonpositive;

/// Values per block. Below two blocks the pass stays on the calling thread: the tiny
/// preset's gates (2^18 values) gain from two cores, much smaller ones would not repay
/// the pool's hand-off.
const BLOCK: usize = 1 << 15;

impl SwigluBackend for NdArray {
    fn swiglu(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
            return burn::tensor::activation::silu(gate) * up;
        }
        let (gate, up) = (contiguous(array(gate)), contiguous(array(up)));
        let shape = gate.shape().to_vec();
        let mut out = vec![0.0f32; gate.len()];
        let (g, u) = (slice(&gate), slice(&up));
        let parallel = out.len() > BLOCK;
        each_chunk(&mut out, BLOCK, parallel, |(b, block)| {
            let start = b * BLOCK;
            for (i, y) in block.iter_mut().enumerate() {
                let (g, u) = (g[start + i], u[start + i]);
                *y = g * sigmoid(g) * u;
            }
        });
        tensor(from_vec(&shape, out))
    }

    fn swiglu_backward(
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        if [gate.dtype(), up.dtype(), grad.dtype()] != [DType::F32; 3] {
            return swiglu_backward_ops(gate, up, grad);
        }
        let (gate, up, grad) = (
            contiguous(array(gate)),
            contiguous(array(up)),
            contiguous(array(grad)),
        );
        let shape = gate.shape().to_vec();
        let (g, u, dy) = (slice(&gate), slice(&up), slice(&grad));
        // Both gradients in one pass over the inputs.
        let mut d_gate = vec![0.0f32; g.len()];
        let mut d_up = vec![0.0f32; g.len()];
        let pass = |(b, (dg, du)): (usize, (&mut [f32], &mut [f32]))| {
            let start = b * BLOCK;
            for i in 0..dg.len() {
                let (g, u, dy) = (g[start + i], u[start + i], dy[start + i]);
                let s = sigmoid(g);
                du[i] = dy * g * s;
                dg[i] = dy * u * s * (1.0 + g * (1.0 - s));
            }
        };
        if g.len() > BLOCK {
            let blocks = d_gate.par_chunks_mut(BLOCK).zip(d_up.par_chunks_mut(BLOCK));
            blocks.enumerate().for_each(pass);
        } else {
            pass((0, (&mut d_gate[..], &mut d_up[..])));
        }
        (
            tensor(from_vec(&shape, d_gate)),
            tensor(from_vec(&shape, d_up)),
        )
    }
}

/// `1 / (1 + e^-x)`, from `e^-|x|` so that the exponential never overflows; NaN stays NaN.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 { r } else { e * r }
}
