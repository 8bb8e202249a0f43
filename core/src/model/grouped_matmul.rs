//! Every expert's rows times its own matrix, `[M, D] x [E, D, F] -> [M, F]`, as one op
//! of burn's backends with its own backward.
//!
//! Why an op: written with burn's tensor ops, each expert slices its rows out of the
//! routed rows and its matrix out of the `[E, D, F]` parameter, and the backward of a
//! slice is a zero tensor of the *whole* input with the slice's gradient written in. So
//! a layer's backward built `E` zero copies of the routed rows and `E` zero copies of
//! each expert parameter (`E^2 D F` values), then added them up: on the 32-expert CPU
//! shape of docs/benchmarks.md that was about half the step (`perf`: burn's
//! `TensorData::full` 25% and the kernel's page clearing 18%). Here the backward is
//! the same products the other way round: `dX = grouped(dY, W^T)` and, per expert,
//! `dW_e = X_e^T dY_e`, stacked once.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::grouped_offsets::{through_host, weight_grad_through_host};
use super::precision::Precision;
use super::routed_rows::float;

/// A backend with the experts' grouped matrix product.
pub trait GroupedMatmulBackend: Backend {
    /// Whether the experts' products run side by side on the host's cores (rayon, one
    /// expert per task). The CPU backend: burn ndarray multiplies on one core, and its
    /// own threaded build lost on these shapes because it splits every elementwise op
    /// (docs/benchmarks.md, "CPU speed"); a whole product per task is coarse enough.
    const PARALLEL_EXPERTS: bool = false;

    /// `out[m] = xs[m] @ w[e]` for the rows `m` in `offsets[e]..offsets[e + 1]` of each
    /// expert `e` (`offsets` has `E + 1` entries, ending at `M`); products in
    /// `precision`. The default slices per expert, which costs nothing outside autodiff.
    fn grouped_matmul(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: &[usize],
        precision: Precision,
    ) -> Tensor<Self, 2> {
        sliced_products(xs, w, offsets, precision)
    }

    /// `dW` of [`GroupedMatmulBackend::grouped_matmul`]: `xs_e^T grad_e` per expert
    /// (`dims` is `[E, D, F]`), zeros for an expert without rows. The default slices and
    /// stacks in burn's tensor ops.
    fn grouped_weight_grad(
        xs: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        dims: [usize; 3],
        offsets: &[usize],
        precision: Precision,
    ) -> Tensor<Self, 3> {
        weight_grad(xs, grad, dims, offsets, precision)
    }

    /// Whether [`GroupedMatmulBackend::grouped_matmul_on_device`] reads the offsets on
    /// the device (dtopp's kernel) in this process; otherwise it reads them back and
    /// slices. A function, not a constant: CUDA's kernels can be switched off at run time
    /// (`DTOPP_CUDA_KERNELS=off`).
    fn device_offsets() -> bool {
        false
    }

    /// [`GroupedMatmulBackend::grouped_matmul`] with the `E + 1` offsets on the device
    /// and `xs`'s row count a bound on the routes: rows from `offsets[E]` on are zero.
    /// `transposed`: `w` is `[E, F, D]` and multiplies as `w[e]ᵀ` (the backward's `dX`).
    /// The default reads the offsets back.
    fn grouped_matmul_on_device(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: Tensor<Self, 1, Int>,
        transposed: bool,
        precision: Precision,
    ) -> Tensor<Self, 2> {
        through_host(xs, w, offsets, transposed, precision)
    }

    /// [`GroupedMatmulBackend::grouped_weight_grad`] with the offsets on the device, as
    /// in [`GroupedMatmulBackend::grouped_matmul_on_device`].
    fn grouped_weight_grad_on_device(
        xs: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        dims: [usize; 3],
        offsets: Tensor<Self, 1, Int>,
        precision: Precision,
    ) -> Tensor<Self, 3> {
        weight_grad_through_host(xs, grad, dims, offsets, precision)
    }
}

/// The grouped product in burn's tensor ops: a slice of rows and of the matrix per expert.
pub(super) fn sliced_products<B: GroupedMatmulBackend>(
    xs: Tensor<B, 2>,
    w: Tensor<B, 3>,
    offsets: &[usize],
    precision: Precision,
) -> Tensor<B, 2> {
    let [_, d, f] = w.dims();
    let outputs: Vec<Tensor<B, 2>> = per_expert::<B, _>(offsets, [d, f], |e, start, end| {
        (start < end).then(|| {
            let rows = xs.clone().slice([start..end, 0..d]);
            let matrix = w.clone().slice([e..e + 1, 0..d, 0..f]).reshape([d, f]);
            precision.matmul(rows, matrix)
        })
    })
    .into_iter()
    .flatten()
    .collect();
    if outputs.is_empty() {
        return Tensor::zeros([0, f], &xs.device());
    }
    Tensor::cat(outputs, 0)
}

/// The multiply-adds an expert's product must average before the products run side by
/// side. Measured with `dtopp bench train` on 2 cores: the tiny preset's products (about
/// 2^20 each) ran 6% slower side by side, bench/cpu-mid.toml's (2^23) 3% faster.
const PARALLEL_MIN_MACS: usize = 1 << 22;

/// `product(e, start, end)` for every expert `e` and its rows `start..end`, in expert
/// order; side by side where [`GroupedMatmulBackend::PARALLEL_EXPERTS`] and the products
/// (`[rows, inner] x [inner, cols]` each) are large enough.
pub(super) fn per_expert<B: GroupedMatmulBackend, T: Send>(
    offsets: &[usize],
    [inner, cols]: [usize; 2],
    product: impl Fn(usize, usize, usize) -> T + Send + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let experts = offsets.len().saturating_sub(1);
    let one = |e: usize| product(e, offsets[e], offsets[e + 1]);
    if side_by_side::<B>(offsets, [inner, cols]) {
        (0..experts).into_par_iter().map(one).collect()
    } else {
        (0..experts).map(one).collect()
    }
}

/// Whether the experts' products (`[rows, inner] x [inner, cols]` each) run side by side:
/// [`GroupedMatmulBackend::PARALLEL_EXPERTS`], and each averages [`PARALLEL_MIN_MACS`].
pub(super) fn side_by_side<B: GroupedMatmulBackend>(
    offsets: &[usize],
    [inner, cols]: [usize; 2],
) -> bool {
    let experts = offsets.len().saturating_sub(1).max(1);
    let rows = offsets.last().copied().unwrap_or(0);
    B::PARALLEL_EXPERTS
        && rows.saturating_mul(inner).saturating_mul(cols) / experts >= PARALLEL_MIN_MACS
}

/// Without dtopp's WGSL kernels in the build, burn-wgpu slices per expert.
#[cfg(not(feature = "wgpu"))]
impl GroupedMatmulBackend for burn::backend::Wgpu {}

/// [`GroupedMatmulBackend::grouped_weight_grad`] in burn's tensor ops.
pub(super) fn weight_grad<B: GroupedMatmulBackend>(
    xs: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    dims: [usize; 3],
    offsets: &[usize],
    precision: Precision,
) -> Tensor<B, 3> {
    let [_, d, f] = dims;
    let device = xs.device();
    let per_expert = per_expert::<B, _>(offsets, [d, f], |_, start, end| {
        if start == end {
            return Tensor::zeros([d, f], &device);
        }
        let rows = xs.clone().slice([start..end, 0..d]);
        let g = grad.clone().slice([start..end, 0..f]);
        precision.matmul(rows.transpose(), g)
    });
    Tensor::stack(per_expert, 0)
}

/// Where a grouped product's offsets are: read by the host (the exact layout) or on the
/// device (the grouped layout). One autodiff op serves both; its backward calls the
/// inner backend's products of the same kind.
#[derive(Clone, Debug)]
enum GroupOffsets<B: Backend> {
    Host(Vec<usize>),
    Device(Tensor<B, 1, Int>),
}

impl<B: GroupedMatmulBackend> GroupOffsets<B> {
    /// `xs` by `w[e]`, or by `w[e]ᵀ` where `transposed`.
    fn product(
        &self,
        xs: Tensor<B, 2>,
        w: Tensor<B, 3>,
        transposed: bool,
        precision: Precision,
    ) -> Tensor<B, 2> {
        match self {
            GroupOffsets::Host(offsets) => {
                let w = if transposed { w.swap_dims(1, 2) } else { w };
                B::grouped_matmul(xs, w, offsets, precision)
            }
            GroupOffsets::Device(offsets) => {
                B::grouped_matmul_on_device(xs, w, offsets.clone(), transposed, precision)
            }
        }
    }

    /// `xs_eᵀ grad_e` per expert, `[E, D, F]`.
    fn weight_grad(
        &self,
        xs: Tensor<B, 2>,
        grad: Tensor<B, 2>,
        dims: [usize; 3],
        precision: Precision,
    ) -> Tensor<B, 3> {
        match self {
            GroupOffsets::Host(offsets) => {
                B::grouped_weight_grad(xs, grad, dims, offsets, precision)
            }
            GroupOffsets::Device(offsets) => {
                B::grouped_weight_grad_on_device(xs, grad, dims, offsets.clone(), precision)
            }
        }
    }
}

#[derive(Debug)]
struct GroupedMatmul;

impl<B: GroupedMatmulBackend> Backward<B, 2> for GroupedMatmul {
    /// The checkpointed rows and weights, `[E, D, F]`, the offsets and the precision.
    type State = (NodeId, NodeId, [usize; 3], GroupOffsets<B>, Precision);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_xs, node_w] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (xs_id, w_id, dims, offsets, precision) = ops.state;
        let xs = float::<B, 2>(checkpointer.retrieve_node_output(xs_id));
        let w = float::<B, 3>(checkpointer.retrieve_node_output(w_id));
        if let Some(node) = node_w {
            let dw = offsets.weight_grad(xs, grad.clone(), dims, precision);
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = node_xs {
            // dX = dY · W_eᵀ per expert.
            let dx = offsets.product(grad, w, true, precision);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// The grouped product on autodiff: `xs` by `w[e]` on the inner backend, tracked.
fn tracked<B: GroupedMatmulBackend, C: CheckpointStrategy>(
    xs: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 3>,
    offsets: GroupOffsets<B>,
    precision: Precision,
) -> Tensor<Autodiff<B, C>, 2> {
    let dims = w.dims();
    let xs = xs.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward = |xs: FloatTensor<B>, w: FloatTensor<B>| {
        offsets
            .product(float(xs), float(w), false, precision)
            .into_primitive()
            .tensor()
    };
    let out = match GroupedMatmul
        .prepare::<C>([xs.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let xs_id = prep.checkpoint(&xs);
            let w_id = prep.checkpoint(&w);
            let out = forward(xs.primitive, w.primitive);
            prep.finish((xs_id, w_id, dims, offsets, precision), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(xs.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

impl<B: GroupedMatmulBackend, C: CheckpointStrategy> GroupedMatmulBackend for Autodiff<B, C> {
    fn device_offsets() -> bool {
        B::device_offsets()
    }

    fn grouped_matmul_on_device(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: Tensor<Self, 1, Int>,
        transposed: bool,
        precision: Precision,
    ) -> Tensor<Self, 2> {
        // Only the backward multiplies by `w[e]ᵀ`, on the inner backend.
        let w = if transposed { w.swap_dims(1, 2) } else { w };
        tracked(xs, w, GroupOffsets::Device(offsets.inner()), precision)
    }

    fn grouped_matmul(
        xs: Tensor<Self, 2>,
        w: Tensor<Self, 3>,
        offsets: &[usize],
        precision: Precision,
    ) -> Tensor<Self, 2> {
        tracked(xs, w, GroupOffsets::Host(offsets.to_vec()), precision)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tensor};

    use super::{GroupedMatmulBackend, Precision};

    type B = Autodiff<NdArray>;

    /// The same product written with autodiff's own slices (the code this op replaced).
    fn sliced(xs: Tensor<B, 2>, w: Tensor<B, 3>, offsets: &[usize]) -> Tensor<B, 2> {
        let [_, d, f] = w.dims();
        let parts: Vec<_> = offsets
            .windows(2)
            .enumerate()
            .filter(|(_, p)| p[0] < p[1])
            .map(|(e, p)| {
                let rows = xs.clone().slice([p[0]..p[1], 0..d]);
                rows.matmul(w.clone().slice([e..e + 1, 0..d, 0..f]).reshape([d, f]))
            })
            .collect();
        Tensor::cat(parts, 0)
    }

    #[test]
    fn forward_and_gradients_equal_the_sliced_products() {
        // Five experts (not a power of two), one without rows, one with a single row.
        equals_the_sliced_products(&[0, 3, 3, 4, 9, 12], 6, 7);
        // Products large enough to run side by side on the CPU (PARALLEL_MIN_MACS).
        let offsets = [0, 1100, 1100, 2300];
        const { assert!(2300 * 64 * 96 / 3 >= super::PARALLEL_MIN_MACS) };
        equals_the_sliced_products(&offsets, 64, 96);
    }

    fn equals_the_sliced_products(offsets: &[usize], d: usize, f: usize) {
        let device = Default::default();
        let (m, experts) = (offsets[offsets.len() - 1], offsets.len() - 1);
        let xs0 = Tensor::<B, 2>::random([m, d], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<B, 3>::random([experts, d, f], Distribution::Normal(0.0, 1.0), &device);
        let up = Tensor::<B, 2>::random([m, f], Distribution::Normal(0.0, 1.0), &device);
        let run = |grouped: bool| {
            let xs = xs0.clone().require_grad();
            let w = w0.clone().require_grad();
            let y = if grouped {
                B::grouped_matmul(xs.clone(), w.clone(), offsets, Precision::F32)
            } else {
                sliced(xs.clone(), w.clone(), offsets)
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            let values = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
            (
                values(y.inner()),
                values(xs.grad(&grads).unwrap()),
                w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            )
        };
        let (want, got) = (run(false), run(true));
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{what}[{i}]: {x} vs {y}"
                );
            }
        };
        close(&got.0, &want.0, "output");
        close(&got.1, &want.1, "dX");
        close(&got.2, &want.2, "dW");
        // The expert without rows gets a zero gradient.
        assert!(got.2[d * f..2 * d * f].iter().all(|&v| v == 0.0));
        // The same products, side by side or not: the output is bit-identical.
        assert_eq!(got.0, want.0);
    }
}
