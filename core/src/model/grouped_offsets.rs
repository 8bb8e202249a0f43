//! The experts' grouped products with their row offsets on the device: the grouped
//! layout's products ([`super::ExpertLayout::Grouped`]), forward and backward, with no
//! host read where the backend has the kernel ([`GroupedMatmulBackend::device_offsets`]).
//!
//! Why a second entry point beside the host-offset one: burn's matrix products take
//! every shape from the host, so slicing rows per expert needs the offsets there, one
//! synchronisation per MoE layer. A kernel that reads the offsets itself runs on a row
//! count the host fixed in advance (a bound on the routes): rows past the routes come
//! out as zeros and cost no arithmetic. Backends without such a kernel read the offsets
//! and slice (free on the CPU, where tensors live in host memory). The autodiff op is
//! the host-offset one's (`grouped_matmul.rs`), holding the offsets where they are.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::device_routing::read_ints;
use super::grouped_matmul::GroupedMatmulBackend;
use super::precision::Precision;

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

/// `[rows, inner, cols, experts]` of a grouped product on the device
/// ([`GroupedMatmulBackend::grouped_matmul_on_device`]), checked: `w` is `[E, inner, cols]`,
/// or `[E, cols, inner]` read transposed, and there are `E + 1` offsets.
pub(crate) fn product_dims<B: Backend>(
    xs: &Tensor<B, 2>,
    w: &Tensor<B, 3>,
    offsets: &Tensor<B, 1, Int>,
    transposed: bool,
) -> [usize; 4] {
    let [rows, inner] = xs.dims();
    let [experts, a, b] = w.dims();
    let cols = if transposed { a } else { b };
    assert_eq!(
        if transposed { b } else { a },
        inner,
        "grouped product: rows of width {inner} against experts' matrices {:?}{}",
        w.dims(),
        if transposed { " transposed" } else { "" }
    );
    assert_eq!(
        offsets.dims()[0],
        experts + 1,
        "grouped product: E + 1 offsets"
    );
    [rows, inner, cols, experts]
}

/// The output of a grouped product with nothing to multiply, for the kernels to skip:
/// an empty one, or zeros where the rows have no width or there is no expert.
pub(crate) fn trivial_product<B: Backend>(
    [rows, inner, cols, experts]: [usize; 4],
    device: &B::Device,
) -> Option<Tensor<B, 2>> {
    if rows * cols == 0 {
        Some(Tensor::empty([rows, cols], device))
    } else if inner == 0 || experts == 0 {
        Some(Tensor::zeros([rows, cols], device))
    } else {
        None
    }
}

/// The host's copy of device offsets, for the backends that slice (a read-back),
/// clamped to `0..=rows` as the kernels clamp them.
fn host_offsets<B: GroupedMatmulBackend>(offsets: Tensor<B, 1, Int>, rows: usize) -> Vec<usize> {
    read_ints(offsets)
        .unwrap_or_else(|e| panic!("reading the experts' offsets for a grouped product: {e}"))
        .into_iter()
        .map(|o| (o.max(0) as usize).min(rows))
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
    let offsets = host_offsets(offsets, rows);
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
    let offsets = host_offsets(offsets, xs.dims()[0]);
    B::grouped_weight_grad(xs, grad, dims, &offsets, precision)
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
