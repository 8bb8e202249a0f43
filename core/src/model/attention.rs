//! Causal multi-head self-attention with rotary position embeddings (RoPE) on queries
//! and keys. Shapes: `B` batch, `S` sequence, `H` heads, `h` head width, `D = H h`.

use burn::module::{Module, Param};
use burn::nn::{RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::attention_op::{AttentionBackend, causal_attention};
use super::config::ModelConfig;
use super::dense_matmul::DenseMatmulBackend;
use super::init::normal_param;
use super::precision::Precision;
use super::rope::RopeBackend;
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
}

impl<B: AttentionBackend + RopeBackend + DenseMatmulBackend> CausalSelfAttention<B> {
    /// `x` `[B, S, D]` → `[B, S, D]`, causal. The projections run in `precision`; scores
    /// and softmax in f32.
    pub fn forward(&self, x: Tensor<B, 3>, precision: Precision) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, 0, precision);
        self.attend(q, k, v, 0, precision)
    }

    /// [`Self::forward`] for `x` `[B, S, D]` at positions `start..start + S`, given the
    /// keys and values of positions `0..start` in `cache` (`[B, H, start, h]` each, after
    /// RoPE), which it extends to `start + S`. The new positions see every cached one;
    /// among themselves attention stays causal.
    pub fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        start: usize,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, start, precision);
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(vec![past_k, k], 2),
                Tensor::cat(vec![past_v, v], 2),
            ),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        self.attend(q, k, v, start, precision)
    }

    /// Queries, keys and values `[B, H, S, h]` of `x` at positions `start..start + S`,
    /// RoPE applied to queries and keys.
    fn project(
        &self,
        x: Tensor<B, 3>,
        start: usize,
        precision: Precision,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, d] = x.dims();
        let (h, hd) = (self.heads, d / self.heads);
        // Projections as one [B S, D] matmul: a broadcast batched matmul would repack the
        // weight for every sequence.
        let qkv = precision
            .dense(x.reshape([b * s, d]), self.qkv.val())
            .reshape([b, s, 3 * d]);
        let split = |i: usize| {
            qkv.clone()
                .slice([0..b, 0..s, i * d..(i + 1) * d])
                .reshape([b, s, h, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let freq = || self.rope.freq_complex.clone().narrow(0, start, s);
        (B::rope(q, freq()), B::rope(k, freq()), v)
    }

    /// Causal softmax attention of `q` `[B, H, S, h]` (positions `start..start + S`) over
    /// `k`, `v` `[B, H, T, h]` (positions `0..T`), then the output projection.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        start: usize,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [b, h, s, hd] = q.dims();
        let context = causal_attention(q, k, v, start).reshape([b * s, h * hd]);
        precision
            .dense(context, self.out.val())
            .reshape([b, s, h * hd])
    }
}
