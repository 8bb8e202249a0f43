//! The MoE feed-forward sub-layer as a burn module: its parameters and the call into
//! [`super::moe_forward`].

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::config::ModelConfig;
use super::init::{constant_param, normal_param};
use super::layer_bounds::LayerBounds;
use super::moe::{MoeForward, MoeWeights, moe_forward};
use super::precision::Precision;
use super::routing::Selector;
use super::routing_backend::RoutingBackend;
use crate::error::Result;
use crate::rng::SplitMix64;

/// Router, DRN scale and `E` SwiGLU experts.
#[derive(Module, Debug)]
pub struct MoeLayer<B: Backend> {
    /// `[D, E]` router projection.
    pub router: Param<Tensor<B, 2>>,
    /// `[1]` the layer's DRN scale theta (initialised to 1).
    pub theta: Param<Tensor<B, 1>>,
    /// `[E, D, F]`.
    pub gate: Param<Tensor<B, 3>>,
    /// `[E, D, F]`.
    pub up: Param<Tensor<B, 3>>,
    /// `[E, F, D]`.
    pub down: Param<Tensor<B, 3>>,
}

impl<B: Backend> MoeLayer<B> {
    /// Seeded initialisation.
    pub fn new(config: &ModelConfig, rng: &mut SplitMix64, device: &B::Device) -> Self {
        let (d, e, f, std) = (
            config.d_model,
            config.experts,
            config.expert_hidden,
            config.init_std,
        );
        let down_std = std / (2.0 * config.layers as f64).sqrt();
        Self {
            router: normal_param(rng, [d, e], std, device),
            theta: constant_param([1], 1.0, device),
            gate: normal_param(rng, [e, d, f], std, device),
            up: normal_param(rng, [e, d, f], std, device),
            down: normal_param(rng, [e, f, d], down_std, device),
        }
    }
}

impl<B: RoutingBackend> MoeLayer<B> {
    /// Token rows `[N, D]` through the router and the selected experts (`threshold`: a
    /// Top-p threshold held on the device; `bounds`: the padded layout's, for
    /// [`super::ExpertLayout::Padded`]).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        use_drn: bool,
        selector: Selector,
        threshold: Option<Tensor<B, 1>>,
        bounds: Option<LayerBounds>,
        precision: Precision,
    ) -> Result<MoeForward<B>> {
        let weights = MoeWeights {
            router: self.router.val(),
            theta: self.theta.val(),
            gate: self.gate.val(),
            up: self.up.val(),
            down: self.down.val(),
        };
        moe_forward(x, &weights, use_drn, selector, threshold, bounds, precision)
    }
}
