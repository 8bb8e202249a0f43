//! Causal multi-head self-attention with rotary position embeddings (RoPE) on queries
//! and keys. Shapes: `B` batch, `S` sequence, `H` heads, `h` head width, `D = H h`.

use burn::module::{Module, Param};
use burn::nn::{RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use super::config::ModelConfig;
use super::init::normal_param;
use super::precision::Precision;
use crate::rng::SplitMix64;

/// One attention sub-layer.
#[derive(Module, Debug)]
pub struct CausalSelfAttention<B: Backend> {
    /// `[D, 3D]` fused query, key and value projection.
    pub qkv: Param<Tensor<B, 2>>,
    /// `[D, D]` output projection.
    pub out: Param<Tensor<B, 2>>,
    rope: RotaryEncoding<B>,
    heads: usize,
}

impl<B: Backend> CausalSelfAttention<B> {
    /// Seeded initialisation; the output projection is scaled by `1/sqrt(2 layers)` as
    /// in GPT-2 so the residual stream does not grow with depth.
    pub fn new(config: &ModelConfig, rng: &mut SplitMix64, device: &B::Device) -> Self {
        let d = config.d_model;
        let std = config.init_std;
        let out_std = std / (2.0 * config.layers as f64).sqrt();
        Self {
            qkv: normal_param(rng, [d, 3 * d], std, device),
            out: normal_param(rng, [d, d], out_std, device),
            rope: RotaryEncodingConfig::new(config.seq_len, d / config.heads)
                .with_theta(config.rope_theta)
                .init(device),
            heads: config.heads,
        }
    }

    /// `x` `[B, S, D]` → `[B, S, D]`; `mask` `[S, S]` is true above the diagonal.
    /// The projections run in `precision`; scores and softmax in f32.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 2, Bool>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let (h, hd) = (self.heads, d / self.heads);
        // Projections as one [B S, D] matmul: a broadcast batched matmul would repack the
        // weight for every sequence.
        let qkv = precision
            .matmul(x.reshape([b * s, d]), self.qkv.val())
            .reshape([b, s, 3 * d]);
        let split = |i: usize| {
            qkv.clone()
                .slice([0..b, 0..s, i * d..(i + 1) * d])
                .reshape([b, s, h, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let (q, k) = (self.rope.forward(q), self.rope.forward(k));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let scores = scores.mask_fill(mask.unsqueeze::<4>().expand([b, h, s, s]), -1e9);
        let context = softmax(scores, 3).matmul(v);
        let context = context.swap_dims(1, 2).reshape([b * s, d]);
        precision.matmul(context, self.out.val()).reshape([b, s, d])
    }
}

/// The causal mask `[S, S]`: true where a query would see a later key. burn's
/// `tril_mask` is true *outside* the lower triangle (diagonal included), which is
/// exactly the strictly upper part (its `triu_mask` would hide the past instead).
pub fn causal_mask<B: Backend>(seq: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, device)
}
