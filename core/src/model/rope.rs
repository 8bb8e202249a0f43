//! Rotary position embeddings as one op of burn's backends with its own backward.
//!
//! Why an op: burn 0.21's `RotaryEncoding::apply` turns each pair into `[a, -b, b, a]` by a
//! batched matrix product with a `[2, 4]` sign matrix (one tiny product per position and
//! head: 4,096 of them for a tiny-preset query), then multiplies by the frequency table
//! and sums pairs, and autodiff records and reverses all of it. `perf` on the tiny preset
//! put 8% of a step there (docs/benchmarks.md, "CPU speed"). The rotation is linear, so
//! its backward is the same rotation by the opposite angle and keeps nothing but the table.
//!
//! With `(cos, sin)` of position `p` and pair `i` from burn's own table (`freq_complex`,
//! `[positions, h, 2]`, each pair's angle repeated for both of its elements):
//! `y[2i] = x[2i] cos - x[2i+1] sin`, `y[2i+1] = x[2i+1] cos + x[2i] sin`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::routed_rows::float;

/// A backend with rotary position embeddings as one op.
pub trait RopeBackend: Backend {
    /// `x` `[N, H, S, h]` rotated by `freq` `[S, h, 2]` (burn's `freq_complex` rows of the
    /// positions `x` holds). The default is burn's `RotaryEncoding::apply`, written out.
    fn rope(x: Tensor<Self, 4>, freq: Tensor<Self, 3>) -> Tensor<Self, 4> {
        rope_ops(x, freq)
    }

    /// The gradient of [`RopeBackend::rope`] given its output's: the rotation by the
    /// opposite angle.
    fn rope_backward(grad: Tensor<Self, 4>, freq: Tensor<Self, 3>) -> Tensor<Self, 4> {
        let [s, h, _] = freq.dims();
        let flip = Tensor::<Self, 1>::from_floats([1.0, -1.0], &freq.device()).reshape([1, 1, 2]);
        Self::rope(grad, freq * flip.expand([s, h, 2]))
    }
}

/// [`RopeBackend::rope`] in burn's tensor ops (burn 0.21's `RotaryEncoding::apply`).
pub(super) fn rope_ops<B: Backend>(x: Tensor<B, 4>, freq: Tensor<B, 3>) -> Tensor<B, 4> {
    let [n, heads, s, h] = x.dims();
    let sign =
        Tensor::<B, 2>::from_floats([[1.0, 0.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0]], &x.device());
    let out: Tensor<B, 4> = x
        .reshape([n * heads, s, h / 2, 2])
        .matmul(sign.unsqueeze())
        .reshape([n * heads, s, h, 2])
        * freq.unsqueeze();
    out.sum_dim(3).reshape([n, heads, s, h])
}

impl RopeBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl RopeBackend for burn::backend::Cuda {}

#[derive(Debug)]
struct Rope;

impl<B: RopeBackend> Backward<B, 1> for Rope {
    /// The frequency rows (a constant: no gradient).
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = float::<B, 4>(grads.consume::<B>(&ops.node));
        if let Some(node) = node {
            let dx = B::rope_backward(grad, float(ops.state));
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

impl<B: RopeBackend, C: CheckpointStrategy> RopeBackend for Autodiff<B, C> {
    fn rope(x: Tensor<Self, 4>, freq: Tensor<Self, 3>) -> Tensor<Self, 4> {
        let x = x.into_primitive().tensor();
        let freq = freq.inner();
        let forward = |x: FloatTensor<B>| B::rope(float(x), freq.clone()).into_primitive().tensor();
        let out = match Rope
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = freq.clone().into_primitive().tensor();
                prep.finish(state, forward(x.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::RotaryEncodingConfig;
    use burn::tensor::{Distribution, Tensor, TensorData};

    use super::{RopeBackend, rope_ops};

    type B = Autodiff<NdArray>;

    fn flat<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs burn's {b}"
            );
        }
    }

    #[test]
    fn forward_and_gradient_equal_burns_rotary_encoding() {
        let device = Default::default();
        // [N, H, S, h] and the first position: one head of width 2; odd counts; an offset.
        for ([n, heads, s, h], start) in [([1, 1, 1, 2], 0), ([2, 3, 5, 6], 0), ([1, 2, 3, 8], 7)] {
            let rope = RotaryEncodingConfig::new(start + s + 2, h).init::<B>(&device);
            let x0 = Tensor::<NdArray, 4>::random(
                [n, heads, s, h],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let weights = Tensor::<B, 4>::from_data(
                TensorData::new(
                    (0..n * heads * s * h)
                        .map(|i| (i % 7) as f32 - 3.1)
                        .collect(),
                    [n, heads, s, h],
                ),
                &device,
            );
            let run = |ours: bool| {
                let x = Tensor::<B, 4>::from_inner(x0.clone()).require_grad();
                let y = if ours {
                    B::rope(x.clone(), rope.freq_complex.clone().narrow(0, start, s))
                } else {
                    rope.apply(x.clone(), start)
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                (flat(y.inner()), flat(x.grad(&grads).unwrap()))
            };
            let ((y, dx), (want_y, want_dx)) = (run(true), run(false));
            assert_close(&y, &want_y, &format!("output of {:?}", [n, heads, s, h]));
            assert_close(&dx, &want_dx, &format!("dX of {:?}", [n, heads, s, h]));
        }
    }

    #[test]
    fn the_cpu_override_reads_strided_inputs_and_matches_the_default() {
        let device = Default::default();
        let rope = RotaryEncodingConfig::new(9, 4).init::<NdArray>(&device);
        // A head-major view of a sequence-major tensor, as the model's queries are.
        let x = Tensor::<NdArray, 4>::random([2, 5, 3, 4], Distribution::Normal(0.0, 1.0), &device)
            .swap_dims(1, 2);
        let freq = rope.freq_complex.clone().narrow(0, 2, 5);
        let got = NdArray::rope(x.clone(), freq.clone());
        assert_close(
            &flat(got),
            &flat(rope_ops(x.clone(), freq.clone())),
            "output",
        );
        let back = NdArray::rope_backward(x.clone(), freq.clone());
        // The rotation back undoes the rotation.
        let round = NdArray::rope_backward(NdArray::rope(x.clone(), freq.clone()), freq);
        assert_close(&flat(round), &flat(x), "rotated there and back");
        assert_eq!(back.dims(), [2, 3, 5, 4]);
    }
}
