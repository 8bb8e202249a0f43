//! Dynamic Routing Normalization, `P = softmax(theta * (z - mu) / sqrt(var + eps))` per
//! token, as an op of burn's backends ([`DrnBackend`]), the way burn adds custom ops.
//!
//! - **Default methods**: burn tensor ops, forward ([`drn_probs`]) and backward
//!   ([`drn_backward_ops`], the derivation the kernels implement). Under autodiff a
//!   backend without its own DRN ([`DrnBackend::OWN_DRN`] false: ndarray) has its
//!   forward ops differentiated by burn, as before.
//! - **wgpu**: dtopp's `drn.wgsl` kernels on burn's buffers, forward and backward
//!   (`routing_backend::wgpu_drn`), theta read on the device.
//! - **cuda**: dtopp's `drn.cu` kernels on burn-cuda's buffers, the same way
//!   (`routing_backend::cuda_drn`).
//! - **`Autodiff<I>`** over a backend with its own DRN: one tracked op whose backward is
//!   the inner backend's `drn_backward`.
//!
//! The tests check the burn-op forms against `crate::cpu::drn_backward`, and the wgpu and
//! CUDA kernels against both and against finite differences (`tests/tests/drn_backend.rs`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::routed_rows::float;
use crate::ops::DRN_EPS;

/// A backend with DRN as an op.
pub trait DrnBackend: Backend {
    /// Whether the backend runs DRN with its own forward and backward (kernels); where
    /// false, autodiff differentiates the default's burn tensor ops.
    const OWN_DRN: bool = false;

    /// What normalizes the router logits, for the training log.
    fn drn_name() -> &'static str {
        "burn tensor ops"
    }

    /// `P` `[N, E]` from router logits `[N, E]` and the layer's scale `theta` `[1]`.
    fn drn(logits: Tensor<Self, 2>, theta: Tensor<Self, 1>) -> Tensor<Self, 2> {
        drn_probs(logits, theta)
    }

    /// `(dL/dz [N, E], dL/dtheta [1])` given the logits, theta, `P = drn(z, theta)` and
    /// `dL/dP`.
    fn drn_backward(
        logits: Tensor<Self, 2>,
        theta: Tensor<Self, 1>,
        probs: Tensor<Self, 2>,
        grad_probs: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        drn_backward_ops(logits, theta, probs, grad_probs)
    }
}

/// Routing probabilities `[N, E]` from logits `[N, E]` and the layer's scale `theta`
/// (`[1]`, a learnable parameter), in burn tensor ops. Standardization uses the
/// population variance (divide by `E`), as the spec does; `var_mean` would divide by
/// `E - 1`.
pub fn drn_probs<B: Backend>(logits: Tensor<B, 2>, theta: Tensor<B, 1>) -> Tensor<B, 2> {
    let (var, mean) = logits.clone().var_mean_bias(1);
    let standardized = (logits - mean) / (var + f64::from(DRN_EPS)).sqrt();
    softmax(standardized * theta.unsqueeze::<2>(), 1)
}

/// DRN's backward in burn tensor ops. With `u = (z - mu) / sigma`, `zhat = theta u` and
/// `g = dL/dP`: `dL/dzhat = P (g - sum P g)`, `dL/dtheta = sum dL/dzhat u` and, through
/// the standardization, `dL/dz = (du - mean du - u mean(du u)) / sigma` for
/// `du = theta dL/dzhat`.
pub fn drn_backward_ops<B: Backend>(
    logits: Tensor<B, 2>,
    theta: Tensor<B, 1>,
    probs: Tensor<B, 2>,
    grad_probs: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let (var, mean) = logits.clone().var_mean_bias(1);
    let sigma = (var + f64::from(DRN_EPS)).sqrt();
    let u = (logits - mean) / sigma.clone();
    let dot = (probs.clone() * grad_probs.clone()).sum_dim(1);
    let dzhat = probs * (grad_probs - dot);
    let grad_theta = (dzhat.clone() * u.clone()).sum();
    let du = dzhat * theta.unsqueeze::<2>();
    let du_mean = du.clone().mean_dim(1);
    let du_u_mean = (du.clone() * u.clone()).mean_dim(1);
    ((du - du_mean - u * du_u_mean) / sigma, grad_theta)
}

impl<I: DrnBackend, C: CheckpointStrategy> DrnBackend for Autodiff<I, C> {
    const OWN_DRN: bool = I::OWN_DRN;

    fn drn_name() -> &'static str {
        I::drn_name()
    }

    fn drn(logits: Tensor<Self, 2>, theta: Tensor<Self, 1>) -> Tensor<Self, 2> {
        if !I::OWN_DRN {
            return drn_probs(logits, theta);
        }

        #[derive(Debug)]
        struct Drn;

        impl<I: DrnBackend> Backward<I, 2> for Drn {
            /// The logits, theta and the probabilities.
            type State = (FloatTensor<I>, FloatTensor<I>, FloatTensor<I>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (logits, theta, probs) = ops.state;
                let grad = float::<I, 2>(grads.consume::<I>(&ops.node));
                let (grad_logits, grad_theta) = I::drn_backward(
                    float::<I, 2>(logits),
                    float::<I, 1>(theta),
                    float::<I, 2>(probs),
                    grad,
                );
                let [logits_parent, theta_parent] = ops.parents;
                if let Some(parent) = logits_parent {
                    grads.register::<I>(parent.id, grad_logits.into_primitive().tensor());
                }
                if let Some(parent) = theta_parent {
                    grads.register::<I>(parent.id, grad_theta.into_primitive().tensor());
                }
            }
        }

        let logits = logits.into_primitive().tensor();
        let theta = theta.into_primitive().tensor();
        let probs = I::drn(
            float::<I, 2>(logits.primitive.clone()),
            float::<I, 1>(theta.primitive.clone()),
        )
        .into_primitive()
        .tensor();
        let out = match Drn
            .prepare::<NoCheckpointing>([logits.node.clone(), theta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((logits.primitive, theta.primitive, probs.clone()), probs)
            }
            OpsKind::UnTracked(prep) => prep.finish(probs),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

impl DrnBackend for burn::backend::NdArray {}

/// Without dtopp's WGSL kernels in the build, burn-wgpu normalizes with the default.
#[cfg(not(feature = "wgpu"))]
impl DrnBackend for burn::backend::Wgpu {}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::{drn_backward_ops, drn_probs};
    use crate::cpu;
    use crate::ops::{Normalization, RouteShape};
    use crate::rng::SplitMix64;

    type B = Autodiff<NdArray>;

    fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= atol + rtol * w.abs(),
                "{what}[{i}]: burn {g}, cpu {w}"
            );
        }
    }

    #[test]
    fn forward_and_gradients_match_the_cpu_reference() {
        let device = Default::default();
        for (n, e, theta) in [(1, 1, 1.0f32), (7, 5, 0.7), (16, 64, 2.5), (3, 100, 1.3)] {
            let mut rng = SplitMix64::new((n * e) as u64);
            let z: Vec<f32> = (0..n * e).map(|_| rng.normal() as f32 * 3.0).collect();
            let w: Vec<f32> = (0..n * e).map(|_| rng.normal() as f32).collect();
            let logits = Tensor::<B, 2>::from_data(TensorData::new(z.clone(), [n, e]), &device)
                .require_grad();
            let theta_t = Tensor::<B, 1>::from_data(TensorData::new(vec![theta], [1]), &device)
                .require_grad();
            let probs = drn_probs(logits.clone(), theta_t.clone());
            let weights = Tensor::<B, 2>::from_data(TensorData::new(w.clone(), [n, e]), &device);
            // L = sum(w * P), so dL/dP = w.
            let grads = (probs.clone() * weights).sum().backward();

            let shape = RouteShape::new(n, e).unwrap();
            let norm = Normalization::Drn { theta };
            let want_p = cpu::drn_forward(&z, shape, norm).unwrap();
            let (want_dz, want_dtheta) = cpu::drn_backward(&z, &want_p, &w, shape, norm).unwrap();

            let got_p: Vec<f32> = probs.into_data().to_vec().unwrap();
            let got_dz: Vec<f32> = logits.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let got_dtheta: Vec<f32> = theta_t.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let what = format!("N={n} E={e} theta={theta}");
            close(&format!("{what} probs"), &got_p, &want_p, 1e-6, 1e-4);
            close(&format!("{what} dz"), &got_dz, &want_dz, 1e-5, 1e-3);
            close(
                &format!("{what} dtheta"),
                &got_dtheta,
                &[want_dtheta],
                1e-4,
                1e-3,
            );

            // The explicit backward (the default of `DrnBackend::drn_backward`, the
            // derivation the kernels implement) against the same reference.
            let host = |v: &[f32]| {
                Tensor::<NdArray, 2>::from_data(TensorData::new(v.to_vec(), [n, e]), &device)
            };
            let theta_host =
                Tensor::<NdArray, 1>::from_data(TensorData::new(vec![theta], [1]), &device);
            let (dz, dtheta) = drn_backward_ops(host(&z), theta_host, host(&want_p), host(&w));
            let dz: Vec<f32> = dz.into_data().to_vec().unwrap();
            let dtheta: Vec<f32> = dtheta.into_data().to_vec().unwrap();
            close(&format!("{what} explicit dz"), &dz, &want_dz, 1e-5, 1e-3);
            close(
                &format!("{what} explicit dtheta"),
                &dtheta,
                &[want_dtheta],
                1e-4,
                1e-3,
            );
        }
    }
}
