//! burn ndarray's rotary position embeddings on its own arrays: one pass over the rows,
//! blocks of rows over the cores.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use ndarray::Ix3;
use rayon::prelude::*;

use super::ndarray_arrays::{array, from_vec, tensor};
use super::rope::{RopeBackend, rope_ops};

/// Values per block: below two blocks the pass stays on the calling thread.
const BLOCK: usize = 1 << 15;

impl RopeBackend for NdArray {
    fn rope(x: Tensor<Self, 4>, freq: Tensor<Self, 3>) -> Tensor<Self, 4> {
        if x.dtype() != DType::F32 || freq.dtype() != DType::F32 {
            return rope_ops(x, freq);
        }
        let [n, heads, s, h] = x.dims();
        let (xa, fa) = (array(x), array(freq));
        // Row-major copies only of strided views (the heads of a sequence-major tensor).
        let x = xa.as_standard_layout();
        let x = x.as_slice().expect("a row-major array");
        let freq = fa
            .view()
            .into_dimensionality::<Ix3>()
            .expect("burn's dims said rank 3");
        let freq = freq.as_standard_layout();
        let freq = freq.as_slice().expect("a row-major array");
        let mut out = vec![0.0f32; x.len()];
        // Rows of `h` values, position `row % s`; blocks hold whole rows.
        let rows_per_block = (BLOCK / h.max(1)).max(1);
        let pass = |(b, block): (usize, &mut [f32])| {
            let first = b * rows_per_block;
            for (r, y) in block.chunks_mut(h).enumerate() {
                let row = first + r;
                let (x, f) = (&x[row * h..(row + 1) * h], &freq[(row % s) * h * 2..]);
                for i in (0..h).step_by(2) {
                    let (cos, sin) = (f[2 * i], f[2 * i + 1]);
                    y[i] = x[i] * cos - x[i + 1] * sin;
                    y[i + 1] = x[i + 1] * cos + x[i] * sin;
                }
            }
        };
        if out.len() > BLOCK {
            out.par_chunks_mut(rows_per_block * h)
                .enumerate()
                .for_each(pass);
        } else {
            pass((0, &mut out[..]));
        }
        tensor(from_vec(&[n, heads, s, h], out))
    }
}
