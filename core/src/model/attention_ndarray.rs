//! burn ndarray's causal attention on its own arrays: one task per (sequence, head),
//! side by side on the cores; each task's products read the heads as strided views
//! (no copies) and write into its own block of the outputs, and the mask and softmax are
//! one pass per row over the keys the query may see.

use burn::backend::NdArray;
use burn::tensor::{DType, Tensor};
use ndarray::linalg::general_mat_mul;
use ndarray::{
    Array2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut3, Axis, Ix3, Ix4, IxDyn, s,
};
use rayon::prelude::*;

use super::attention_op::{AttentionBackend, attention_backward_ops, attention_ops};
use super::ndarray_arrays::{array, from_vec, tensor};
use crate::cpu_fast::exp_nonpositive;

impl AttentionBackend for NdArray {
    fn causal_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        start: usize,
    ) -> (Tensor<Self, 3>, Tensor<Self, 4>) {
        if [q.dtype(), k.dtype(), v.dtype()] != [DType::F32; 3] {
            return attention_ops(q, k, v, start);
        }
        let [b, h, s, hd] = q.dims();
        let t = k.dims()[2];
        let scale = 1.0 / (hd as f32).sqrt();
        let (qa, ka, va) = (array(q), array(k), array(v));
        let (q, k, v) = (rank4(&qa), rank4(&ka), rank4(&va));
        let mut context = vec![0.0f32; b * s * h * hd];
        let mut probs = vec![0.0f32; b * h * s * t];
        let mut context_view = view_mut(&mut context, (b, s, h * hd));
        let mut probs_view = view_mut(&mut probs, (b * h, s, t));
        let tasks: Vec<_> = heads_of(&mut context_view, h, hd)
            .into_iter()
            .zip(probs_view.outer_iter_mut())
            .enumerate()
            .collect();
        each(tasks, |(n, (mut out, mut p))| {
            let (bi, hi) = (n / h, n % h);
            let (qh, kh) = (q.slice(s![bi, hi, .., ..]), k.slice(s![bi, hi, .., ..]));
            general_mat_mul(scale, &qh, &kh.t(), 0.0, &mut p);
            for (i, mut row) in p.outer_iter_mut().enumerate() {
                let row = row.as_slice_mut().expect("rows of a row-major buffer");
                softmax_prefix(row, (start + i + 1).min(t));
            }
            general_mat_mul(1.0, &p, &v.slice(s![bi, hi, .., ..]), 0.0, &mut out);
        });
        (
            tensor(from_vec(&[b, s, h * hd], context)),
            tensor(from_vec(&[b, h, s, t], probs)),
        )
    }

    fn causal_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        probs: Tensor<Self, 4>,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let dtypes = [q.dtype(), k.dtype(), v.dtype(), probs.dtype(), grad.dtype()];
        if dtypes != [DType::F32; 5] {
            return attention_backward_ops(q, k, v, probs, grad);
        }
        let [b, h, s, hd] = q.dims();
        let t = k.dims()[2];
        let scale = 1.0 / (hd as f32).sqrt();
        let (qa, ka, va, pa, ga) = (array(q), array(k), array(v), array(probs), array(grad));
        let (q, k, v, p) = (rank4(&qa), rank4(&ka), rank4(&va), rank4(&pa));
        let g: ArrayView3<f32> = ga
            .view()
            .into_dimensionality::<Ix3>()
            .expect("burn's dims said rank 3");
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; b * h * s * hd],
            vec![0.0f32; b * h * t * hd],
            vec![0.0f32; b * h * t * hd],
        );
        let mut dq_view = view_mut(&mut dq, (b * h, s, hd));
        let mut dk_view = view_mut(&mut dk, (b * h, t, hd));
        let mut dv_view = view_mut(&mut dv, (b * h, t, hd));
        let tasks: Vec<_> = dq_view
            .outer_iter_mut()
            .zip(dk_view.outer_iter_mut())
            .zip(dv_view.outer_iter_mut())
            .enumerate()
            .collect();
        each(tasks, |(n, ((mut dq, mut dk), mut dv))| {
            let (bi, hi) = (n / h, n % h);
            let gh = g.slice(s![bi, .., hi * hd..(hi + 1) * hd]);
            let ph = p.slice(s![bi, hi, .., ..]);
            general_mat_mul(1.0, &ph.t(), &gh, 0.0, &mut dv);
            // dP, then dS = P (dP - rowsum(dP P)) in its place.
            let mut ds = Array2::<f32>::zeros((s, t));
            general_mat_mul(1.0, &gh, &v.slice(s![bi, hi, .., ..]).t(), 0.0, &mut ds);
            for (mut d, p) in ds.outer_iter_mut().zip(ph.outer_iter()) {
                let inner: f32 = d.iter().zip(p.iter()).map(|(d, p)| d * p).sum();
                d.zip_mut_with(&p, |d, &p| *d = p * (*d - inner));
            }
            general_mat_mul(scale, &ds, &k.slice(s![bi, hi, .., ..]), 0.0, &mut dq);
            general_mat_mul(scale, &ds.t(), &q.slice(s![bi, hi, .., ..]), 0.0, &mut dk);
        });
        (
            tensor(from_vec(&[b, h, s, hd], dq)),
            tensor(from_vec(&[b, h, t, hd], dk)),
            tensor(from_vec(&[b, h, t, hd], dv)),
        )
    }
}

/// The softmax of `row[..visible]` in place, zeros after it (the keys the query may
/// not see). A NaN score makes its row NaN, as in burn's softmax.
fn softmax_prefix(row: &mut [f32], visible: usize) {
    let (seen, hidden) = row.split_at_mut(visible);
    let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f32;
    for x in seen.iter_mut() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|x| *x *= inv);
    hidden.fill(0.0);
}

/// `task` on every (sequence, head), side by side on the cores.
fn each<T: Send>(tasks: Vec<T>, task: impl Fn(T) + Send + Sync) {
    if tasks.len() > 1 {
        tasks.into_par_iter().for_each(task);
    } else {
        tasks.into_iter().for_each(task);
    }
}

/// The `[S, h]` block of each head in `context` `[B, S, H h]`, sequence-major.
fn heads_of<'a>(
    context: &'a mut ArrayViewMut3<'_, f32>,
    heads: usize,
    width: usize,
) -> Vec<ArrayViewMut2<'a, f32>> {
    let mut blocks = Vec::with_capacity(context.len_of(Axis(0)) * heads);
    for sequence in context.outer_iter_mut() {
        let mut rest = sequence;
        for _ in 0..heads {
            let (head, tail) = rest.split_at(Axis(1), width);
            blocks.push(head);
            rest = tail;
        }
    }
    blocks
}

fn rank4(a: &ndarray::ArcArray<f32, IxDyn>) -> ArrayView4<'_, f32> {
    a.view()
        .into_dimensionality::<Ix4>()
        .expect("burn's dims said rank 4")
}

fn view_mut(buffer: &mut [f32], shape: (usize, usize, usize)) -> ArrayViewMut3<'_, f32> {
    ArrayViewMut3::from_shape(shape, buffer).expect("the buffer holds the shape")
}
