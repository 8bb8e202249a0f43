//! The decoder-only MoE language model: token embedding, pre-norm blocks of causal
//! self-attention (RoPE) and a feed-forward that is MoE in every `moe_every`-th block,
//! a final RMSNorm and an untied output head.

use burn::module::{Module, Param};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::attention::CausalSelfAttention;
use super::config::ModelConfig;
use super::dense::DenseFfn;
use super::init::normal_param;
use super::layer_bounds::LayerBounds;
use super::moe::MoeForward;
use super::moe_layer::MoeLayer;
use super::precision::Precision;
use super::rms_norm::rms_norm;
use super::routing::Selector;
use super::routing_backend::RoutingBackend;
use super::token_embedding::{embed_host_tokens, embed_tokens};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub(super) attn_norm: RmsNorm<B>,
    pub(super) attn: CausalSelfAttention<B>,
    ffn_norm: RmsNorm<B>,
    /// Present in MoE blocks.
    pub moe: Option<MoeLayer<B>>,
    dense: Option<DenseFfn<B>>,
}

/// How one block's feed-forward routes (ignored by a dense block).
pub(super) struct LayerRoutingArgs<B: Backend> {
    pub use_drn: bool,
    /// The layer's selector (`None` only for a model without MoE layers left to route).
    pub selector: Option<Selector>,
    pub threshold: Option<Tensor<B, 1>>,
    pub bounds: Option<LayerBounds>,
}

impl<B: RoutingBackend> Block<B> {
    /// The pre-norm feed-forward of `x` `[B, S, D]`: its output `[B, S, D]` (before the
    /// residual add) and, in an MoE block, the layer's routing.
    pub(super) fn feed_forward(
        &self,
        x: Tensor<B, 3>,
        routing: LayerRoutingArgs<B>,
        precision: Precision,
    ) -> Result<(Tensor<B, 3>, Option<MoeForward<B>>)> {
        let [b, s, d] = x.dims();
        let h = rms_norm(&self.ffn_norm, x).reshape([b * s, d]);
        let (y, out) = match (&self.moe, &self.dense) {
            (Some(layer), _) => {
                let selector = routing.selector.expect("one selector per MoE layer");
                let out = layer.forward(
                    h,
                    routing.use_drn,
                    selector,
                    routing.threshold,
                    routing.bounds,
                    precision,
                )?;
                (out.output.clone(), Some(out))
            }
            (None, Some(dense)) => (dense.forward(h, precision), None),
            (None, None) => unreachable!("every block has a feed-forward"),
        };
        Ok((y.reshape([b, s, d]), out))
    }
}

/// The whole model.
#[derive(Module, Debug)]
pub struct MoeLanguageModel<B: Backend> {
    /// `[V, D]` token embedding.
    pub embed: Param<Tensor<B, 2>>,
    /// The blocks, first to last.
    pub blocks: Vec<Block<B>>,
    pub(super) final_norm: RmsNorm<B>,
    /// `[D, V]` output head.
    pub head: Param<Tensor<B, 2>>,
}

/// How the MoE layers route in one forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingPlan {
    /// DRN (true) or plain softmax (false) on the router logits.
    pub use_drn: bool,
    /// One selector per MoE layer, first to last.
    pub selectors: Vec<Selector>,
    /// One [`LayerBounds`] per MoE layer for the padded or grouped layout
    /// ([`super::ExpertLayout`]); `None` runs the exact layout.
    pub bounds: Option<Vec<LayerBounds>>,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct LmOutput<B: Backend> {
    /// `[B S, V]` next-token logits, row `b S + s`.
    pub logits: Tensor<B, 2>,
    /// One entry per MoE layer, first to last.
    pub moe: Vec<MoeForward<B>>,
}

impl<B: Backend> MoeLanguageModel<B> {
    /// A model with seeded weights (same seed, same weights on every backend).
    pub fn new(config: &ModelConfig, seed: u64, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let mut rng = SplitMix64::substream(seed, 0x4D4F_4445, 0);
        let (d, v, std) = (config.d_model, config.vocab, config.init_std);
        let norm = || RmsNormConfig::new(d).init(device);
        let embed = normal_param(&mut rng, [v, d], std, device);
        let blocks = (0..config.layers)
            .map(|l| {
                let moe = config.is_moe_block(l);
                Block {
                    attn_norm: norm(),
                    attn: CausalSelfAttention::new(config, &mut rng, device),
                    ffn_norm: norm(),
                    moe: moe.then(|| MoeLayer::new(config, &mut rng, device)),
                    dense: (!moe).then(|| DenseFfn::new(config, &mut rng, device)),
                }
            })
            .collect();
        let head = normal_param(&mut rng, [d, v], std, device);
        Ok(Self {
            embed,
            blocks,
            final_norm: norm(),
            head,
        })
    }

    /// The MoE layers, first to last.
    pub fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer<B>> {
        self.blocks.iter().filter_map(|b| b.moe.as_ref())
    }
}

impl<B: RoutingBackend> MoeLanguageModel<B> {
    /// Next-token logits for `tokens` `[B, S]`, the large products in `precision`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        routing: &RoutingPlan,
        precision: Precision,
    ) -> Result<LmOutput<B>> {
        self.forward_from(tokens, None, routing, None, precision)
    }

    /// [`Self::forward`] given the same tokens as a host copy too (`[B S]`, row-major):
    /// the embedding's backward pass then reads nothing back
    /// ([`super::token_embedding::embed_host_tokens`]). `thresholds` (`[L]`, on the
    /// model's device), where given, replace the Top-p selectors' host thresholds: the
    /// trainer's controller keeps them there ([`super::ExpertLayout::Padded`]).
    pub fn forward_with_host_tokens(
        &self,
        tokens: Tensor<B, 2, Int>,
        host: &[i64],
        routing: &RoutingPlan,
        thresholds: Option<&Tensor<B, 1>>,
        precision: Precision,
    ) -> Result<LmOutput<B>> {
        if host.len() != tokens.shape().num_elements() {
            return Err(Error::param(
                "host copy of the tokens",
                host.len(),
                format!("the tokens' {} entries", tokens.shape().num_elements()),
            ));
        }
        self.forward_from(tokens, Some(host), routing, thresholds, precision)
    }

    /// The number of MoE layers, checked against `routing`'s selectors (one each).
    pub(super) fn check_selectors(&self, routing: &RoutingPlan) -> Result<usize> {
        let moe_layers = self.moe_layers().count();
        if routing.selectors.len() != moe_layers {
            return Err(Error::param(
                "routing selectors",
                routing.selectors.len(),
                format!("one per MoE layer ({moe_layers})"),
            ));
        }
        Ok(moe_layers)
    }

    fn forward_from(
        &self,
        tokens: Tensor<B, 2, Int>,
        host: Option<&[i64]>,
        routing: &RoutingPlan,
        thresholds: Option<&Tensor<B, 1>>,
        precision: Precision,
    ) -> Result<LmOutput<B>> {
        let [b, s] = tokens.dims();
        let moe_layers = self.check_selectors(routing)?;
        if let Some(bounds) = &routing.bounds
            && bounds.len() != moe_layers
        {
            return Err(Error::param(
                "expert row bounds",
                bounds.len(),
                format!("one per MoE layer ({moe_layers})"),
            ));
        }
        if let Some(p) = thresholds
            && p.dims()[0] != moe_layers
        {
            return Err(Error::param(
                "thresholds held on the device",
                p.dims()[0],
                format!("one per MoE layer ({moe_layers})"),
            ));
        }
        let d = self.embed.dims()[1];
        let flat = tokens.reshape([b * s]);
        let mut x = match host {
            Some(host) => embed_host_tokens(self.embed.val(), flat, host),
            None => embed_tokens(self.embed.val(), flat),
        }
        .reshape([b, s, d]);
        let mut moe = Vec::with_capacity(moe_layers);
        for block in &self.blocks {
            x = x.clone() + block.attn.forward(rms_norm(&block.attn_norm, x), precision);
            let l = moe.len();
            let layer_routing = LayerRoutingArgs {
                use_drn: routing.use_drn,
                selector: routing.selectors.get(l).copied(),
                threshold: thresholds.map(|p| p.clone().narrow(0, l, 1)),
                bounds: routing.bounds.as_ref().map(|b| b[l]),
            };
            let (y, out) = block.feed_forward(x.clone(), layer_routing, precision)?;
            moe.extend(out);
            x = x + y;
        }
        let x = rms_norm(&self.final_norm, x).reshape([b * s, d]);
        let logits = precision.dense(x, self.head.val());
        Ok(LmOutput { logits, moe })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{MoeLanguageModel, Precision, RoutingPlan};
    use crate::model::{ModelConfig, Selector};

    type B = NdArray;

    fn config() -> ModelConfig {
        ModelConfig {
            vocab: 32,
            d_model: 16,
            layers: 3,
            heads: 2,
            seq_len: 8,
            experts: 5,
            expert_hidden: 8,
            moe_every: 2,
            dense_hidden: 12,
            rope_theta: 10_000.0,
            init_std: 0.2,
        }
    }

    #[test]
    fn a_later_token_never_changes_an_earlier_prediction() {
        let device = Default::default();
        let c = config();
        let model = MoeLanguageModel::<B>::new(&c, 3, &device).unwrap();
        let plan = RoutingPlan {
            use_drn: true,
            selectors: vec![Selector::TopK(2); c.moe_layers()],
            bounds: None,
        };
        let logits = |tokens: Vec<i64>| -> Vec<f32> {
            let t = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [1, 8]), &device);
            let out = model.forward(t, &plan, Precision::F32).unwrap();
            out.logits.into_data().to_vec().unwrap()
        };
        let a = logits(vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let b = logits(vec![1, 2, 3, 4, 5, 9, 10, 11]);
        let v = c.vocab;
        // Positions 0..5 saw identical prefixes; position 5 onwards did not.
        assert_eq!(a[..5 * v], b[..5 * v]);
        assert_ne!(a[5 * v..6 * v], b[5 * v..6 * v]);
    }
}
