//! One parameter's AdamW update as a backend op: the gradient scaled by the clipping
//! factor, both moments, the bias corrections, decay and the step.
//!
//! Written with burn's tensor ops (the default) it is fourteen elementwise ops, each
//! allocating and streaming a tensor the parameter's size. On the CPU that is most of a
//! step for a model whose parameters outnumber its tokens: bench/cpu-mid.toml has
//! 26.4M parameters and 1,024 tokens per step. burn ndarray runs it here as one pass over
//! the four arrays, in place, on every core (rayon), with the same f32 operations in the
//! same order, so it gives the same bits as the default.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// The factor every gradient is multiplied by (global-norm clipping).
pub(crate) enum Scale<B: Backend> {
    /// Decided on the host.
    Host(f64),
    /// `[1]` on the device.
    Device(Tensor<B, 1>),
}

/// The scalars of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The optimizer step, from 1 (bias corrections).
    pub step: i32,
    /// `1 - lr * weight_decay` where the parameter decays.
    pub decay: Option<f64>,
}

/// A backend with the fused AdamW update.
pub trait AdamWUpdateBackend: Backend {
    /// `(value, first, second)` after one AdamW step of a flattened parameter `value`
    /// with gradient `grad` (times `scale`) and moments `first`, `second`.
    #[allow(private_interfaces)]
    fn adamw_update(
        value: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        scale: &Scale<Self>,
        first: Tensor<Self, 1>,
        second: Tensor<Self, 1>,
        h: AdamWStep,
    ) -> [Tensor<Self, 1>; 3] {
        tensor_ops(value, grad, scale, first, second, h)
    }
}

/// The update in burn's tensor ops.
fn tensor_ops<B: Backend>(
    value: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    scale: &Scale<B>,
    first: Tensor<B, 1>,
    second: Tensor<B, 1>,
    h: AdamWStep,
) -> [Tensor<B, 1>; 3] {
    let [n] = grad.dims();
    let grad = match scale {
        Scale::Host(scale) => grad * *scale,
        Scale::Device(scale) => grad * scale.clone().expand([n]),
    };
    let first = first * h.beta1 + grad.clone() * (1.0 - h.beta1);
    let second = second * h.beta2 + grad.square() * (1.0 - h.beta2);
    let first_hat = first.clone() / (1.0 - h.beta1.powi(h.step));
    let second_hat = second.clone() / (1.0 - h.beta2.powi(h.step));
    let mut value = value;
    if let Some(decay) = h.decay {
        value = value * decay;
    }
    let value = value - first_hat / (second_hat.sqrt() + h.eps) * h.lr;
    [value, first, second]
}

impl AdamWUpdateBackend for burn::backend::NdArray {
    #[allow(private_interfaces)]
    fn adamw_update(
        value: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        scale: &Scale<Self>,
        first: Tensor<Self, 1>,
        second: Tensor<Self, 1>,
        h: AdamWStep,
    ) -> [Tensor<Self, 1>; 3] {
        use burn::tensor::DType;
        if [&value, &grad, &first, &second]
            .iter()
            .any(|t| t.dtype() != DType::F32)
        {
            return tensor_ops(value, grad, scale, first, second, h);
        }
        ndarray_pass([value, grad, first, second], scale, h)
    }
}

/// The pass over burn ndarray's own f32 arrays `[value, grad, first, second]`: value and
/// moments are updated in place (copied first only where another tensor shares them).
fn ndarray_pass(
    tensors: [Tensor<burn::backend::NdArray, 1>; 4],
    scale: &Scale<burn::backend::NdArray>,
    h: AdamWStep,
) -> [Tensor<burn::backend::NdArray, 1>; 3] {
    use crate::model::ndarray_arrays::{array, tensor};
    use rayon::prelude::*;

    let [mut v, g, mut m1, mut m2] = tensors.map(array);
    let s = match scale {
        Scale::Host(s) => *s as f32,
        Scale::Device(t) => t.clone().into_scalar(),
    };
    // The scalars as burn's scalar ops convert them (f64 -> f32).
    let (b1, b2, lr, eps) = (h.beta1 as f32, h.beta2 as f32, h.lr as f32, h.eps as f32);
    let (c1, c2) = ((1.0 - h.beta1) as f32, (1.0 - h.beta2) as f32);
    let (bias1, bias2) = (
        (1.0 - h.beta1.powi(h.step)) as f32,
        (1.0 - h.beta2.powi(h.step)) as f32,
    );
    let decay = h.decay.map(|d| d as f32);
    let contiguous = match (
        v.as_slice_memory_order_mut(),
        g.as_slice_memory_order(),
        m1.as_slice_memory_order_mut(),
        m2.as_slice_memory_order_mut(),
    ) {
        (Some(v), Some(g), Some(m1), Some(m2)) => {
            const CHUNK: usize = 1 << 15;
            v.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m1.par_chunks_mut(CHUNK))
                .zip(m2.par_chunks_mut(CHUNK))
                .for_each(|(((v, g), m1), m2)| {
                    for i in 0..v.len() {
                        // The tensor ops' operations, one by one, in their order.
                        let gi = g[i] * s;
                        m1[i] = m1[i] * b1 + gi * c1;
                        m2[i] = m2[i] * b2 + gi * gi * c2;
                        let m_hat = m1[i] / bias1;
                        let v_hat = m2[i] / bias2;
                        let mut x = v[i];
                        if let Some(d) = decay {
                            x *= d;
                        }
                        v[i] = x - m_hat / (v_hat.sqrt() + eps) * lr;
                    }
                });
            true
        }
        _ => false,
    };
    let [v, g, m1, m2] = [v, g, m1, m2].map(tensor);
    if !contiguous {
        // A strided view (never made by the trainer): the tensor ops.
        return tensor_ops(v, g, scale, m1, m2, h);
    }
    [v, m1, m2]
}

impl AdamWUpdateBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl AdamWUpdateBackend for burn::backend::Cuda {}
impl<B: AdamWUpdateBackend, C: CheckpointStrategy> AdamWUpdateBackend for Autodiff<B, C> {}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, Tensor};

    use super::{AdamWStep, AdamWUpdateBackend, Scale, tensor_ops};

    #[test]
    fn the_cpu_pass_gives_the_tensor_ops_bits() {
        let device = Default::default();
        // Several rayon chunks and a partial one.
        let n = 3 * (1 << 15) + 17;
        let random =
            |std: f64| Tensor::<NdArray, 1>::random([n], Distribution::Normal(0.0, std), &device);
        let (value, grad, first) = (random(1.0), random(0.1), random(0.01));
        let second = random(0.001).abs();
        let before = value.to_data().to_vec::<f32>().unwrap();
        for (step, decay, scale) in [
            (1, None, Scale::Host(1.0)),
            (7, Some(1.0 - 3e-4 * 0.1), Scale::Host(0.37)),
            (
                1000,
                Some(0.99),
                Scale::Device(Tensor::from_floats([0.5], &device)),
            ),
        ] {
            let h = AdamWStep {
                lr: 3e-4,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                step,
                decay,
            };
            let inputs = || (value.clone(), grad.clone(), first.clone(), second.clone());
            let (v, g, m1, m2) = inputs();
            let want = tensor_ops(v, g, &scale, m1, m2, h);
            let (v, g, m1, m2) = inputs();
            let got = NdArray::adamw_update(v, g, &scale, m1, m2, h);
            for (what, (a, b)) in ["value", "first", "second"]
                .iter()
                .zip(got.into_iter().zip(want))
            {
                let (a, b) = (
                    a.to_data().to_vec::<f32>().unwrap(),
                    b.to_data().to_vec::<f32>().unwrap(),
                );
                assert!(a == b, "{what} differs at step {step}");
            }
        }
        // The inputs were not written through (the pass copies arrays others share).
        assert_eq!(value.to_data().to_vec::<f32>().unwrap(), before);
    }
}
