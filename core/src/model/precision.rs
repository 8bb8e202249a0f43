//! Mixed precision: the dtype the large matrix products run in. Parameters, gradients,
//! optimizer state, the router (so routing decisions keep f32 probabilities), norms,
//! softmaxes, attention scores and losses stay f32; the projections, feed-forward and
//! expert matrices and the LM head cast their operands to the compute dtype and their
//! product back to f32 (burn's autodiff casts the gradients the same way).

use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The dtype of the model's large matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 products (f32 range, 8 mantissa bits): CUDA (Ampere and newer).
    Bf16,
    /// IEEE half products: GPUs with 16-bit float shaders (wgpu's `SHADER_F16`, CUDA).
    F16,
}

impl Precision {
    /// The name in configs and logs.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    fn dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// `a @ b` in this precision, returned in f32.
    pub fn matmul<B: Backend, const D: usize>(
        self,
        a: Tensor<B, D>,
        b: Tensor<B, D>,
    ) -> Tensor<B, D> {
        match self.dtype() {
            None => a.matmul(b),
            Some(dtype) => a.cast(dtype).matmul(b.cast(dtype)).cast(FloatDType::F32),
        }
    }

    /// `x @ w` (`[N, K] x [K, M]`, a dense layer's weight) in this precision, returned
    /// in f32: the backend's own dense product in f32
    /// ([`super::DenseMatmulBackend`]), else [`Precision::matmul`].
    pub fn dense<B: super::DenseMatmulBackend>(
        self,
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        match self.dtype() {
            None => B::dense_matmul(x, w),
            Some(_) => self.matmul(x, w),
        }
    }

    /// Runs a cast matrix product forward and backward on `device`, so a backend that
    /// lacks the dtype is refused by name before a run starts instead of failing inside
    /// its first step (burn panics there, e.g. wgpu on bf16).
    pub fn check<B: AutodiffBackend>(self, device: &B::Device, backend: &str) -> Result<()> {
        if self == Precision::F32 {
            return Ok(());
        }
        let probe = || {
            let a = Tensor::<B, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], device).require_grad();
            let b = Tensor::<B, 2>::from_floats([[0.5, 0.25], [1.0, 2.0]], device);
            let grads = self.matmul(a.clone(), b).sum().backward();
            let grad: Vec<f32> = a
                .grad(&grads)
                .map(|g| g.into_data().convert::<f32>().to_vec().unwrap_or_default())
                .unwrap_or_default();
            grad
        };
        // The backend reports a missing dtype by panicking; its message is the reason.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = catch_unwind(AssertUnwindSafe(probe));
        std::panic::set_hook(hook);
        let reason = match outcome {
            // d(sum(a @ b))/da = row sums of b, broadcast: [[0.75, 3], [0.75, 3]].
            Ok(grad) if grad == [0.75, 3.0, 0.75, 3.0] => return Ok(()),
            Ok(grad) => {
                format!("a test product gave the gradient {grad:?}, not [0.75, 3, 0.75, 3]")
            }
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend panicked".into())
                .trim()
                .to_string(),
        };
        Err(Error::param(
            "precision",
            self.name(),
            format!("a precision the {backend} backend supports (f32 always; {reason})"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Tensor, TensorData};

    use super::Precision;

    #[test]
    fn f32_products_are_plain_matmuls() {
        let device = Default::default();
        let a =
            Tensor::<NdArray, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [1, 2]), &device);
        let b =
            Tensor::<NdArray, 2>::from_data(TensorData::new(vec![3.0f32, 4.0], [2, 1]), &device);
        let c: Vec<f32> = Precision::F32.matmul(a, b).into_data().to_vec().unwrap();
        assert_eq!(c, [11.0]);
        assert!(
            Precision::F32
                .check::<Autodiff<NdArray>>(&device, "cpu")
                .is_ok()
        );
    }

    #[test]
    fn names_round_trip_through_the_config_format() {
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            let text = serde_json::to_string(&p).unwrap();
            assert_eq!(text, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<Precision>(&text).unwrap(), p);
        }
    }
}
