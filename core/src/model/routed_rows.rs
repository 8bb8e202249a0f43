//! Moving rows between tokens and routes (the MoE layer's dispatch and combine) with
//! gradients that are gathers as well, as ops of burn's backends ([`RowMovesBackend`]).
//!
//! burn's own pair, `select` and `select_assign`, differentiates a gather into a scatter,
//! and burn-cubecl 0.21 runs a scatter as one invocation per column looping over every
//! scattered row: serial on a GPU, and cut off after 65535 iterations on lavapipe. Here
//! both directions are gathers on the GPU backends, because the routing plan knows both
//! maps: `index` `[M]` (the source row of each route) and its inverse `rows` `[R, S]`
//! (the routes of each source row, padded with `M`, which is skipped). Summing a row's
//! routes walks its S slots in order: no scatter, no atomics, a fixed order.
//!
//! - **Default methods**: burn tensor ops. A backend that moves rows by gathers
//!   ([`RowMovesBackend::BY_GATHERS`]) sums slots with chunked gathers; the others
//!   (ndarray) use `select_assign`, a plain loop on a CPU and cheaper there than S
//!   gathers.
//! - **wgpu** and **cuda**: dtopp's `rows.wgsl` and `rows.cu` kernels on burn's buffers
//!   (`routing_backend::wgpu_rows`, `routing_backend::cuda_rows`).
//! - **`Autodiff<I>`**: one tracked form for every inner backend, whose backward passes
//!   are the inner backend's own ops: dispatch's gradient is a slot sum through the
//!   inverse, combine's a gather and a per-route dot product.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorPrimitive};

/// Gathered elements per chunk of a row sum (64 MiB of f32 per temporary).
const GATHER_CHUNK: usize = 1 << 24;

/// A backend with the MoE layer's row moves. Index tensors are within range: a source
/// row that must read zero is appended by the caller.
pub trait RowMovesBackend: Backend {
    /// Whether sums over routes walk the inverse map (gathers: the GPU backends, for which
    /// the routing plan then builds the inverse); else they scatter by `index`.
    const BY_GATHERS: bool = false;

    /// What moves the rows, for the training log.
    fn row_moves_name() -> &'static str {
        if Self::BY_GATHERS {
            "burn gathers both ways"
        } else {
            "burn select, select_assign"
        }
    }

    /// `src[index[m]]` for every `m`: `[M, D]` from `src` `[R, D]`. `inverse` `[R, S]`
    /// lists the `m` that read each source row (padded with `M`); the autodiff form
    /// keeps it for the gradient, which sums those rows. It may be `None` where
    /// [`RowMovesBackend::BY_GATHERS`] is false.
    fn gather_rows(
        src: Tensor<Self, 2>,
        index: &Tensor<Self, 1, Int>,
        _inverse: Option<&Tensor<Self, 2, Int>>,
    ) -> Tensor<Self, 2> {
        src.select(0, index.clone())
    }

    /// `out[r] = sum_s weights[m] * values[m]` over `m = rows[r, s] < M` (every weight
    /// 1 where `weights` is `None`): `[R, D]` (R = `out_rows`) from `values` `[M, D]`.
    /// `index` `[M]` is the inverse of `rows` (the row `r` each `m` is added to); every
    /// `m` appears in `rows` exactly once. `rows` may be `None` where
    /// [`RowMovesBackend::BY_GATHERS`] is false.
    fn sum_rows(
        values: Tensor<Self, 2>,
        weights: Option<Tensor<Self, 1>>,
        rows: Option<&Tensor<Self, 2, Int>>,
        index: &Tensor<Self, 1, Int>,
        out_rows: usize,
    ) -> Tensor<Self, 2> {
        if Self::BY_GATHERS {
            return Self::sum_slots(values, weights, needed(rows));
        }
        let d = values.dims()[1];
        let weighted = match weights {
            Some(w) => values * w.unsqueeze_dim::<2>(1),
            None => values,
        };
        Tensor::<Self, 2>::zeros([out_rows, d], &weighted.device()).select_assign(
            0,
            index.clone(),
            weighted,
            IndexingUpdateOp::Add,
        )
    }

    /// [`RowMovesBackend::sum_rows`] through the inverse map alone: `out[r] = sum_s
    /// weights[m] * values[m]` over `m = rows[r, s] < M`, in slot order. The default is
    /// `S` gathers of `[R, D]` from `values` padded with a zero row, several slots per
    /// gather while a chunk stays under [`GATHER_CHUNK`] elements.
    fn sum_slots(
        values: Tensor<Self, 2>,
        weights: Option<Tensor<Self, 1>>,
        rows: &Tensor<Self, 2, Int>,
    ) -> Tensor<Self, 2> {
        sum_rows_plain(values, weights, rows)
    }

    /// `out[m] = sum_d lhs[m, d] * rhs[m, d]`: `[M]` from two `[M, D]`.
    fn row_dots(lhs: Tensor<Self, 2>, rhs: Tensor<Self, 2>) -> Tensor<Self, 1> {
        let m = lhs.dims()[0];
        (lhs * rhs).sum_dim(1).reshape([m])
    }

    /// The token embedding's lookup, `table[tokens[i]]` (`[N, D]` from `[V, D]`), given
    /// the tokens on the host as well where the caller has them
    /// ([`super::token_embedding`]).
    fn embed_rows(
        table: Tensor<Self, 2>,
        tokens: Tensor<Self, 1, Int>,
        _host: Option<&[i64]>,
    ) -> Tensor<Self, 2> {
        table.select(0, tokens)
    }
}

impl RowMovesBackend for burn::backend::NdArray {}
/// Without dtopp's WGSL kernels in the build, burn-wgpu still moves rows by gathers, in
/// burn's tensor ops.
#[cfg(not(feature = "wgpu"))]
impl RowMovesBackend for burn::backend::Wgpu {
    const BY_GATHERS: bool = true;
}

/// Whether `B` moves the MoE layer's rows by gathers both ways
/// ([`RowMovesBackend::BY_GATHERS`]).
pub fn gathers<B: RowMovesBackend>() -> bool {
    B::BY_GATHERS
}

/// [`RowMovesBackend::gather_rows`].
pub fn gather_rows<B: RowMovesBackend>(
    src: Tensor<B, 2>,
    index: &Tensor<B, 1, Int>,
    inverse: Option<&Tensor<B, 2, Int>>,
) -> Tensor<B, 2> {
    B::gather_rows(src, index, inverse)
}

/// [`RowMovesBackend::sum_rows`] of weighted values.
pub fn sum_rows<B: RowMovesBackend>(
    values: Tensor<B, 2>,
    weights: Tensor<B, 1>,
    rows: Option<&Tensor<B, 2, Int>>,
    index: &Tensor<B, 1, Int>,
    out_rows: usize,
) -> Tensor<B, 2> {
    B::sum_rows(values, Some(weights), rows, index, out_rows)
}

/// The inverse map, which the caller builds wherever [`gathers`] holds.
fn needed<T>(inverse: Option<&T>) -> &T {
    inverse.expect("the inverse map is built for every backend whose rows move by gathers")
}

/// The row sum in burn's tensor ops: `S` gathers of `[R, D]` from `values` padded with a
/// zero row, several slots per gather while a chunk stays under [`GATHER_CHUNK`]
/// elements.
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
    let per_chunk = (GATHER_CHUNK / (r * d).max(1)).clamp(1, s.max(1));
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

fn int<I: Backend, const D: usize>(p: IntTensor<I>) -> Tensor<I, D, Int> {
    Tensor::from_primitive(p)
}

impl<I: RowMovesBackend, C: CheckpointStrategy> RowMovesBackend for Autodiff<I, C> {
    const BY_GATHERS: bool = I::BY_GATHERS;

    fn row_moves_name() -> &'static str {
        I::row_moves_name()
    }

    fn gather_rows(
        src: Tensor<Self, 2>,
        index: &Tensor<Self, 1, Int>,
        inverse: Option<&Tensor<Self, 2, Int>>,
    ) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct GatherRows;

        impl<I: RowMovesBackend> Backward<I, 1> for GatherRows {
            /// The index `[M]`, the inverse map `[R, S]` (gather backends) and R.
            type State = (IntTensor<I>, Option<IntTensor<I>>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let grad = grads.consume::<I>(&ops.node);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    let (index, inverse, r) = ops.state;
                    let inverse = inverse.map(int::<I, 2>);
                    let summed = I::sum_rows(
                        float::<I, 2>(grad),
                        None,
                        inverse.as_ref(),
                        &int::<I, 1>(index),
                        r,
                    );
                    grads.register::<I>(parent.id, summed.into_primitive().tensor());
                }
            }
        }

        let r = src.dims()[0];
        let src = src.into_primitive().tensor();
        let inner_index = index.clone().inner();
        let out = I::gather_rows(float::<I, 2>(src.primitive), &inner_index, None)
            .into_primitive()
            .tensor();
        let out = match GatherRows
            .prepare::<NoCheckpointing>([src.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let inverse = inverse
                    .filter(|_| I::BY_GATHERS)
                    .map(|t| t.clone().inner().into_primitive());
                prep.finish((inner_index.into_primitive(), inverse, r), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn sum_rows(
        values: Tensor<Self, 2>,
        weights: Option<Tensor<Self, 1>>,
        rows: Option<&Tensor<Self, 2, Int>>,
        index: &Tensor<Self, 1, Int>,
        out_rows: usize,
    ) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct SumRows;

        impl<I: RowMovesBackend> Backward<I, 2> for SumRows {
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
                let at_value = I::gather_rows(grad, &int::<I, 1>(index), None);
                let [values_parent, weights_parent] = ops.parents;
                if let Some(parent) = weights_parent {
                    let dot = I::row_dots(at_value.clone(), float::<I, 2>(values));
                    grads.register::<I>(parent.id, dot.into_primitive().tensor());
                }
                if let Some(parent) = values_parent {
                    let scaled = at_value * float::<I, 1>(weights).unsqueeze_dim::<2>(1);
                    grads.register::<I>(parent.id, scaled.into_primitive().tensor());
                }
            }
        }

        // Unweighted: constant weights of 1 (untracked, so no gradient reaches them).
        let m = values.dims()[0];
        let weights = weights.unwrap_or_else(|| Tensor::ones([m], &values.device()));
        let values = values.into_primitive().tensor();
        let weights = weights.into_primitive().tensor();
        let inner_rows = rows.map(|r| r.clone().inner());
        let inner_index = index.clone().inner();
        let out = I::sum_rows(
            float::<I, 2>(values.primitive.clone()),
            Some(float::<I, 1>(weights.primitive.clone())),
            inner_rows.as_ref(),
            &inner_index,
            out_rows,
        )
        .into_primitive()
        .tensor();
        let out = match SumRows
            .prepare::<NoCheckpointing>([values.node.clone(), weights.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    values.primitive,
                    weights.primitive,
                    inner_index.into_primitive(),
                ),
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn embed_rows(
        table: Tensor<Self, 2>,
        tokens: Tensor<Self, 1, Int>,
        host: Option<&[i64]>,
    ) -> Tensor<Self, 2> {
        if I::BY_GATHERS {
            super::token_embedding::embed_tokens_tracked::<I, C>(table, tokens, host)
        } else {
            table.select(0, tokens)
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

    use super::{RowMovesBackend, gathers, sum_rows_plain};
    use crate::rng::SplitMix64;

    type B = Autodiff<NdArray>;

    fn floats(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn data(t: Tensor<NdArray, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// The tracked forms (on ndarray here; generic over the inner backend) give the values
    /// and gradients of burn's select / select_assign, and the slot sum through the
    /// inverse (the gather backends' form) gives the scatter's values.
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
                B::gather_rows(x.clone(), &index, Some(&rows))
            } else {
                x.clone().select(0, index.clone())
            };
            let transformed = routed.clone() * routed.clone() + routed;
            let out = if ours {
                let by_slots = sum_rows_plain(
                    transformed.clone().inner(),
                    Some(w.clone().inner()),
                    &rows.clone().inner(),
                );
                let out = B::sum_rows(transformed, Some(w.clone()), Some(&rows), &index, r);
                let close =
                    |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5);
                assert!(close(data(by_slots), data(out.clone().inner())));
                out
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
