//! DRN as burn tensor ops: `P = softmax(theta * (z - mu) / sqrt(var + eps))` per token.
//! Autodiff gives the gradients for the router weights and `theta`; the tests check
//! them against `crate::cpu::drn_backward`, so the two derivations confirm each other.

use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;

use crate::ops::DRN_EPS;

/// Routing probabilities `[N, E]` from logits `[N, E]` and the layer's scale `theta`
/// (`[1]`, a learnable parameter). Standardization uses the population variance (divide
/// by `E`), as the spec does; `var_mean` would divide by `E - 1`.
pub fn drn_probs<B: Backend>(logits: Tensor<B, 2>, theta: Tensor<B, 1>) -> Tensor<B, 2> {
    let (var, mean) = logits.clone().var_mean_bias(1);
    let standardized = (logits - mean) / (var + f64::from(DRN_EPS)).sqrt();
    softmax(standardized * theta.unsqueeze::<2>(), 1)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::drn_probs;
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
        }
    }
}
