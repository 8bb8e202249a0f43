//! The dense SwiGLU feed-forward of non-MoE blocks (when `moe_every > 1`).

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::config::ModelConfig;
use super::dense_matmul::DenseMatmulBackend;
use super::init::normal_param;
use super::precision::Precision;
use super::swiglu::{SwigluBackend, swiglu};
use crate::rng::SplitMix64;

/// `down(silu(x gate) * (x up))`.
#[derive(Module, Debug)]
pub struct DenseFfn<B: Backend> {
    /// `[D, F]`.
    pub gate: Param<Tensor<B, 2>>,
    /// `[D, F]`.
    pub up: Param<Tensor<B, 2>>,
    /// `[F, D]`.
    pub down: Param<Tensor<B, 2>>,
}

impl<B: Backend> DenseFfn<B> {
    /// Seeded initialisation.
    pub fn new(config: &ModelConfig, rng: &mut SplitMix64, device: &B::Device) -> Self {
        let (d, f, std) = (config.d_model, config.dense_hidden, config.init_std);
        let down_std = std / (2.0 * config.layers as f64).sqrt();
        Self {
            gate: normal_param(rng, [d, f], std, device),
            up: normal_param(rng, [d, f], std, device),
            down: normal_param(rng, [f, d], down_std, device),
        }
    }
}

impl<B: SwigluBackend + DenseMatmulBackend> DenseFfn<B> {
    /// `[N, D]` → `[N, D]`, the products in `precision`.
    pub fn forward(&self, x: Tensor<B, 2>, precision: Precision) -> Tensor<B, 2> {
        let hidden = swiglu(
            precision.dense(x.clone(), self.gate.val()),
            precision.dense(x, self.up.val()),
        );
        precision.dense(hidden, self.down.val())
    }
}
