//! Causal multi-head self-attention with rotary position embeddings (RoPE) on queries
//! and keys. Shapes: `B` batch, `S` sequence, `H` heads, `h` head width, `D = H h`.

use burn::module::{Module, Param};
use burn::nn::{RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

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
        let [b, s, _] = x.dims();
        let (q, k, v) = self.project(x, 0, precision);
        let mask = mask.unsqueeze::<4>().expand([b, self.heads, s, s]);
        self.attend(q, k, v, Some(mask), precision)
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
        let [b, s, _] = x.dims();
        let device = x.device();
        let (q, k, v) = self.project(x, start, precision);
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(vec![past_k, k], 2),
                Tensor::cat(vec![past_v, v], 2),
            ),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let total = start + s;
        // One new position sees everything cached: no mask at all.
        let mask = (s > 1).then(|| {
            let rows = Tensor::<B, 1, Int>::arange(start as i64..total as i64, &device)
                .reshape([s, 1])
                .expand([s, total]);
            let cols = Tensor::<B, 1, Int>::arange(0..total as i64, &device)
                .reshape([1, total])
                .expand([s, total]);
            cols.greater(rows)
                .unsqueeze::<4>()
                .expand([b, self.heads, s, total])
        });
        self.attend(q, k, v, mask, precision)
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
            .matmul(x.reshape([b * s, d]), self.qkv.val())
            .reshape([b, s, 3 * d]);
        let split = |i: usize| {
            qkv.clone()
                .slice([0..b, 0..s, i * d..(i + 1) * d])
                .reshape([b, s, h, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        (self.rope.apply(q, start), self.rope.apply(k, start), v)
    }

    /// Softmax attention of `q` `[B, H, S, h]` over `k`, `v` `[B, H, T, h]` (`mask`
    /// `[B, H, S, T]` true where a key is hidden), then the output projection.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Option<Tensor<B, 4, Bool>>,
        precision: Precision,
    ) -> Tensor<B, 3> {
        let [b, h, s, hd] = q.dims();
        let d = h * hd;
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let scores = match mask {
            Some(mask) => scores.mask_fill(mask, -1e9),
            None => scores,
        };
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
