//! The experts' grouped products with their row offsets on the device: the grouped
//! layout's products ([`super::ExpertLayout::Grouped`]), forward and backward, with no
//! host read where the backend has the kernel ([`GroupedMatmulBackend::DEVICE_OFFSETS`]).
//!
//! Why a second entry point beside the host-offset one: burn's matrix products take
//! every shape from the host, so slicing rows per expert needs the offsets there, one
//! synchronisation per MoE layer. A kernel that reads the offsets itself runs on a row
//! count the host fixed in advance (a bound on the routes): rows past the routes come
//! out as zeros and cost no arithmetic. Backends without such a kernel read the offsets
//! and slice (free on the CPU, where tensors live in host memory).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorPrimitive};

use super::device_routing::read_ints;
use super::grouped_matmul::GroupedMatmulBackend;
use super::precision::Precision;
use super::routed_rows::float;

/// `out[m] = xs[m] @ w[e]` for the rows `m` in `offsets[e]..offsets[e + 1]` of every
/// expert `e`, `offsets` (`E + 1` entries from 0) on the device; rows from `offsets[E]`
/// to `xs`'s row count are zero. Differentiable in `xs` and `w`.
pub fn grouped_on_device<B: GroupedMatmulBackend>(
    xs: Tensor<B, 2>,
    w: Tensor<B, 3>,
    offsets: &Tensor<B, 1, Int>,
    precision: Precision,
) -> Tensor<B, 2> {
    B::grouped_matmul_on_device(xs, w, offsets.clone(), false, precision)
}

/// The host's copy of device offsets, for the backends that slice (a read-back).
pub(super) fn host_offsets<B: GroupedMatmulBackend>(offsets: Tensor<B, 1, Int>) -> Vec<usize> {
    read_ints(offsets)
        .unwrap_or_else(|e| panic!("reading the experts' offsets for a grouped product: {e}"))
        .into_iter()
        .map(|o| o.max(0) as usize)
        .collect()
}

/// The host-offset product on `xs`'s full row count: the sliced rows' products, then
/// zero rows past the routes (offsets clamped to the rows, as the kernels do).
pub(crate) fn through_host<B: GroupedMatmulBackend>(
    xs: Tensor<B, 2>,
    w: Tensor<B, 3>,
    offsets: Tensor<B, 1, Int>,
    transposed: bool,
    precision: Precision,
) -> Tensor<B, 2> {
    let rows = xs.dims()[0];
    let offsets: Vec<usize> = host_offsets(offsets)
        .into_iter()
        .map(|o| o.min(rows))
        .collect();
    let routes = offsets.last().copied().unwrap_or(0);
    let w = if transposed { w.swap_dims(1, 2) } else { w };
    let cols = w.dims()[2];
    let device = xs.device();
    let inner = xs.dims()[1];
    let routed = B::grouped_matmul(xs.slice([0..routes, 0..inner]), w, &offsets, precision);
    if routes == rows {
        routed
    } else {
        Tensor::cat(
            vec![routed, Tensor::zeros([rows - routes, cols], &device)],
            0,
        )
    }
}

/// [`GroupedMatmulBackend::grouped_weight_grad_on_device`] through the host offsets.
pub(crate) fn weight_grad_through_host<B: GroupedMatmulBackend>(
    xs: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    dims: [usize; 3],
    offsets: Tensor<B, 1, Int>,
    precision: Precision,
) -> Tensor<B, 3> {
    let rows = xs.dims()[0];
    let offsets: Vec<usize> = host_offsets(offsets)
        .into_iter()
        .map(|o| o.min(rows))
        .collect();
    B::grouped_weight_grad(xs, grad, dims, &offsets, precision)
}

#[derive(Debug)]
struct DeviceGroupedMatmul;

impl<B: GroupedMatmulBackend> Backward<B, 2> for DeviceGroupedMatmul {
    /// The checkpointed rows and weights, `[E, D, F]`, the offsets and the precision.
    type State = (NodeId, NodeId, [usize; 3], Tensor<B, 1, Int>, Precision);

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
            let dw = B::grouped_weight_grad_on_device(
                xs,
                grad.clone(),
                dims,
                offsets.clone(),
                precision,
            );
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = node_xs {
            // dX = dY · W_eᵀ per expert: the same kernel reading W transposed.
            let dx = B::grouped_matmul_on_device(grad, w, offsets, true, precision);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// The autodiff form of [`GroupedMatmulBackend::grouped_matmul_on_device`] (untransposed:
/// the model only calls it that way; its backward calls the inner backend's transposed).
pub(super) fn autodiff_on_device<B: GroupedMatmulBackend, C: CheckpointStrategy>(
    xs: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 3>,
    offsets: Tensor<Autodiff<B, C>, 1, Int>,
    transposed: bool,
    precision: Precision,
) -> Tensor<Autodiff<B, C>, 2> {
    if transposed {
        // Differentiating the transposed form is never needed; keep it correct anyway.
        return autodiff_on_device(xs, w.swap_dims(1, 2), offsets, false, precision);
    }
    let dims = w.dims();
    let offsets = offsets.inner();
    let xs = xs.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let forward = |xs: FloatTensor<B>, w: FloatTensor<B>| {
        B::grouped_matmul_on_device(float(xs), float(w), offsets.clone(), false, precision)
            .into_primitive()
            .tensor()
    };
    let out = match DeviceGroupedMatmul
        .prepare::<C>([xs.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let xs_id = prep.checkpoint(&xs);
            let w_id = prep.checkpoint(&w);
            let state = (xs_id, w_id, dims, offsets.clone(), precision);
            prep.finish(state, forward(xs.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(xs.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Int, Tensor, TensorData};

    use super::{GroupedMatmulBackend, Precision, grouped_on_device};

    type B = Autodiff<NdArray>;

    #[test]
    fn device_offsets_equal_host_offsets_and_rows_past_the_routes_are_zero() {
        let device = Default::default();
        // Five experts, one without rows; 12 routes in a bound of 15 rows.
        let offsets = [0usize, 3, 3, 4, 9, 12];
        let (rows, d, f) = (15, 6, 7);
        let xs0 = Tensor::<B, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<B, 3>::random([5, d, f], Distribution::Normal(0.0, 1.0), &device);
        let up = Tensor::<B, 2>::random([rows, f], Distribution::Normal(0.0, 1.0), &device);
        let on_device = Tensor::<B, 1, Int>::from_data(
            TensorData::new(offsets.iter().map(|&o| o as i64).collect(), [6]),
            &device,
        );
        let values = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
        let run = |device_offsets: bool| {
            let xs = xs0.clone().require_grad();
            let w = w0.clone().require_grad();
            let y = if device_offsets {
                grouped_on_device(xs.clone(), w.clone(), &on_device, Precision::F32)
            } else {
                let routed = B::grouped_matmul(
                    xs.clone().slice([0..12, 0..d]),
                    w.clone(),
                    &offsets,
                    Precision::F32,
                );
                Tensor::cat(vec![routed, Tensor::zeros([3, f], &device)], 0)
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            (
                values(y.inner()),
                values(xs.grad(&grads).unwrap()),
                w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            )
        };
        let (want, got) = (run(false), run(true));
        assert_eq!(got, want);
        assert!(got.0[12 * f..].iter().all(|&v| v == 0.0));
        assert!(got.1[12 * d..].iter().all(|&v| v == 0.0));
    }
}
