//! Moving rows between tokens and routes (the MoE layer's dispatch and combine) with
//! gradients that are gathers as well.
//!
//! burn's own pair, `select` and `select_assign`, differentiates a gather into a scatter,
//! and burn-cubecl 0.21 runs a scatter as one invocation per column looping over every
//! scattered row: serial on a GPU, and cut off after 65535 iterations on lavapipe. Here
//! both directions are gathers, because the routing plan knows both maps: `index` `[M]`
//! (the source row of each route) and its inverse `rows` `[R, S]` (the routes of each
//! source row, padded with `M`, which reads a zero row). Summing a row's routes is then S
//! gathers of `[R, D]`, in chunks, with no scatter and no atomics.
//!
//! burn has no backend-independent custom autograd function, so the tracked forms are
//! implemented for `Autodiff<I>` and picked by type for the GPU backends dtopp trains on
//! (wgpu, cuda); [`gathers`] says whether a backend gets them. Other autodiff backends get
//! the same values through `select`/`select_assign`, with burn's scatter gradients: on
//! the CPU (ndarray) a scatter is a plain loop, cheaper than `S` gathers. A GPU backend
//! without autodiff (evaluation) sums with the same gathers, untracked.

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorPrimitive};

/// Gathered elements per chunk of a row sum (64 MiB of f32 per temporary).
const GATHER_CHUNK: usize = 1 << 24;

/// Invokes `$on!(Inner)` for each backend whose MoE rows move by gathers both ways.
macro_rules! gather_backends {
    ($on:ident) => {
        $on!(burn::backend::Wgpu);
        #[cfg(feature = "cuda")]
        $on!(burn::backend::Cuda);
    };
}
pub(crate) use gather_backends;

/// Whether `B` (a GPU backend, with or without autodiff) moves the MoE layer's rows by
/// gathers both ways; else by burn's `select` / `select_assign`.
pub fn gathers<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    macro_rules! on {
        ($inner:ty) => {
            if id == TypeId::of::<Autodiff<$inner>>() || id == TypeId::of::<$inner>() {
                return true;
            }
        };
    }
    gather_backends!(on);
    false
}

/// `src[index[m]]` for every `m`: `[M, D]` from `src` `[R, D]`. `inverse` `[R, S]` lists
/// the `m` that read each source row, padded with `M`; the gradient of row `r` sums
/// those. `inverse` may be `None` where [`gathers`] is false (it is not read there).
pub fn gather_rows<B: Backend>(
    src: Tensor<B, 2>,
    index: &Tensor<B, 1, Int>,
    inverse: Option<&Tensor<B, 2, Int>>,
) -> Tensor<B, 2> {
    macro_rules! on {
        ($inner:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner>>() {
                let out = gather_rows_tracked::<$inner>(
                    same(src),
                    same(index.clone()),
                    same(needed(inverse).clone()),
                );
                return same(out);
            }
        };
    }
    gather_backends!(on);
    src.select(0, index.clone())
}

/// `out[r] = sum_s weights[m] * values[m]` over `m = rows[r, s] < M`: `[R, D]` (R =
/// `out_rows`) from `values` `[M, D]` and `weights` `[M]`. `index` `[M]` is the inverse
/// of `rows` (the row `r` each `m` is added to); every `m` appears in `rows` exactly
/// once. `rows` may be `None` where [`gathers`] is false (it is not read there).
pub fn sum_rows<B: Backend>(
    values: Tensor<B, 2>,
    weights: Tensor<B, 1>,
    rows: Option<&Tensor<B, 2, Int>>,
    index: &Tensor<B, 1, Int>,
    out_rows: usize,
) -> Tensor<B, 2> {
    macro_rules! on {
        ($inner:ty) => {
            if TypeId::of::<B>() == TypeId::of::<Autodiff<$inner>>() {
                let out = sum_rows_tracked::<$inner>(
                    same(values),
                    same(weights),
                    same(needed(rows).clone()),
                    same(index.clone()),
                );
                return same(out);
            }
        };
    }
    gather_backends!(on);
    if gathers::<B>() {
        // A GPU backend without autodiff: no gradient to track.
        return sum_rows_plain(values, Some(weights), needed(rows));
    }
    let d = values.dims()[1];
    let weighted = values * weights.unsqueeze_dim::<2>(1);
    Tensor::<B, 2>::zeros([out_rows, d], &weighted.device()).select_assign(
        0,
        index.clone(),
        weighted,
        IndexingUpdateOp::Add,
    )
}

/// The inverse map, which the caller builds wherever [`gathers`] holds.
fn needed<T>(inverse: Option<&T>) -> &T {
    inverse.expect("the inverse map is built for every backend whose rows move by gathers")
}

/// The value itself, as the type a `TypeId` check has shown it to be.
pub(super) fn same<X: 'static, Y: 'static>(x: X) -> Y {
    *(Box::new(x) as Box<dyn Any>)
        .downcast::<Y>()
        .unwrap_or_else(|_| unreachable!("types compared equal by TypeId"))
}

/// The untracked row sum: `S` gathers of `[R, D]` from `values` padded with a zero row,
/// several slots per gather while a chunk stays under [`GATHER_CHUNK`] elements.
pub(super) fn sum_rows_plain<B: Backend>(
    values: Tensor<B, 2>,
    weights: Option<Tensor<B, 1>>,
    rows: &Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let device = values.device();
    let [r, s] = rows.dims();
    let d = values.dims()[1];
    let padded = Tensor::cat(vec![values, Tensor::zeros([1, d], &device)], 0);
    let weights = weights.map(|w| Tensor::cat(vec![w, Tensor::zeros([1], &device)], 0));
    let per_chunk = (GATHER_CHUNK / (r * d).max(1)).clamp(1, s);
    let mut out = Tensor::<B, 2>::zeros([r, d], &device);
    for start in (0..s).step_by(per_chunk) {
        let c = per_chunk.min(s - start);
        let idx = rows.clone().narrow(1, start, c).reshape([r * c]);
        let mut picked = padded.clone().select(0, idx.clone()).reshape([r, c, d]);
        if let Some(w) = &weights {
            picked = picked * w.clone().select(0, idx).reshape([r, c, 1]);
        }
        out = out + picked.sum_dim(1).reshape([r, d]);
    }
    out
}

pub(super) fn float<I: Backend, const D: usize>(p: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn gather_rows_tracked<I: Backend>(
    src: Tensor<Autodiff<I>, 2>,
    index: Tensor<Autodiff<I>, 1, Int>,
    inverse: Tensor<Autodiff<I>, 2, Int>,
) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct GatherRows;

    impl<I: Backend> Backward<I, 1> for GatherRows {
        /// The inverse map `[R, S]`.
        type State = IntTensor<I>;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<I>(&ops.node);
            let [parent] = ops.parents;
            if let Some(parent) = parent {
                let inverse = Tensor::<I, 2, Int>::from_primitive(ops.state);
                let summed = sum_rows_plain(float::<I, 2>(grad), None, &inverse);
                grads.register::<I>(parent.id, summed.into_primitive().tensor());
            }
        }
    }

    let src = src.into_primitive().tensor();
    let index = Tensor::<I, 1, Int>::from_primitive(index.into_primitive());
    let out = float::<I, 2>(src.primitive)
        .select(0, index)
        .into_primitive()
        .tensor();
    let out = match GatherRows
        .prepare::<NoCheckpointing>([src.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(inverse.into_primitive(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn sum_rows_tracked<I: Backend>(
    values: Tensor<Autodiff<I>, 2>,
    weights: Tensor<Autodiff<I>, 1>,
    rows: Tensor<Autodiff<I>, 2, Int>,
    index: Tensor<Autodiff<I>, 1, Int>,
) -> Tensor<Autodiff<I>, 2> {
    #[derive(Debug)]
    struct SumRows;

    impl<I: Backend> Backward<I, 2> for SumRows {
        /// Values `[M, D]`, weights `[M]` and the row of each value `[M]`.
        type State = (FloatTensor<I>, FloatTensor<I>, IntTensor<I>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let (values, weights, index) = ops.state;
            let grad = float::<I, 2>(grads.consume::<I>(&ops.node));
            // The output gradient at each value's row: a gather.
            let at_value = grad.select(0, Tensor::<I, 1, Int>::from_primitive(index));
            let [values_parent, weights_parent] = ops.parents;
            if let Some(parent) = weights_parent {
                let m = at_value.dims()[0];
                let dot = (at_value.clone() * float::<I, 2>(values))
                    .sum_dim(1)
                    .reshape([m]);
                grads.register::<I>(parent.id, dot.into_primitive().tensor());
            }
            if let Some(parent) = values_parent {
                let scaled = at_value * float::<I, 1>(weights).unsqueeze_dim::<2>(1);
                grads.register::<I>(parent.id, scaled.into_primitive().tensor());
            }
        }
    }

    let values = values.into_primitive().tensor();
    let weights = weights.into_primitive().tensor();
    let rows = Tensor::<I, 2, Int>::from_primitive(rows.into_primitive());
    let out = sum_rows_plain(
        float::<I, 2>(values.primitive.clone()),
        Some(float::<I, 1>(weights.primitive.clone())),
        &rows,
    )
    .into_primitive()
    .tensor();
    let out = match SumRows
        .prepare::<NoCheckpointing>([values.node.clone(), weights.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (values.primitive, weights.primitive, index.into_primitive()),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

    use super::{gather_rows_tracked, gathers, sum_rows_tracked};
    use crate::rng::SplitMix64;

    type B = Autodiff<NdArray>;

    fn floats(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn data(t: Tensor<NdArray, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// The tracked forms (on ndarray here; generic over the inner backend) give the values
    /// and gradients of burn's select / select_assign.
    #[test]
    fn gathers_match_select_and_select_assign_with_gradients() {
        assert!(gathers::<Autodiff<burn::backend::Wgpu>>() && gathers::<burn::backend::Wgpu>());
        assert!(!gathers::<B>() && !gathers::<NdArray>());
        let device = Default::default();
        let mut rng = SplitMix64::new(5);
        // 4 tokens, D = 3; routes: token 0 -> 2 routes, 1 -> 0, 2 -> 3, 3 -> 1 (M = 6).
        let index_v: Vec<i64> = vec![2, 0, 3, 2, 0, 2];
        let (r, m, d, s) = (4usize, 6usize, 3usize, 3usize);
        let mut rows_v = vec![m as i64; r * s];
        let mut used = [0usize; 4];
        for (route, &t) in index_v.iter().enumerate() {
            rows_v[t as usize * s + used[t as usize]] = route as i64;
            used[t as usize] += 1;
        }
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index_v, [m]), &device);
        let rows = Tensor::<B, 2, Int>::from_data(TensorData::new(rows_v, [r, s]), &device);
        let x_v: Vec<f32> = (0..r * d).map(|_| rng.normal() as f32).collect();
        let w_v: Vec<f32> = (0..m).map(|_| rng.normal() as f32).collect();
        let out_w = floats((0..r * d).map(|_| rng.normal() as f32).collect(), [r, d]);
        let mut results = Vec::new();
        for ours in [true, false] {
            let x = floats(x_v.clone(), [r, d]).require_grad();
            let w = Tensor::<B, 1>::from_data(TensorData::new(w_v.clone(), [m]), &device)
                .require_grad();
            let routed = if ours {
                gather_rows_tracked::<NdArray>(x.clone(), index.clone(), rows.clone())
            } else {
                x.clone().select(0, index.clone())
            };
            let transformed = routed.clone() * routed.clone() + routed;
            let out = if ours {
                sum_rows_tracked::<NdArray>(transformed, w.clone(), rows.clone(), index.clone())
            } else {
                Tensor::<B, 2>::zeros([r, d], &device).select_assign(
                    0,
                    index.clone(),
                    transformed * w.clone().unsqueeze_dim::<2>(1),
                    IndexingUpdateOp::Add,
                )
            };
            let grads = (out.clone() * out_w.clone()).sum().backward();
            let gw: Vec<f32> = w.grad(&grads).unwrap().into_data().to_vec().unwrap();
            results.push((data(out.inner()), data(x.grad(&grads).unwrap()), gw));
        }
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        for (what, a, b) in [
            ("output", &results[0].0, &results[1].0),
            ("d/dx", &results[0].1, &results[1].1),
            ("d/dw", &results[0].2, &results[1].2),
        ] {
            assert!(close(a, b), "{what}: {a:?} vs {b:?}");
        }
    }
}
