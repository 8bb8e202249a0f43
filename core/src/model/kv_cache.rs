//! Incremental decoding: each attention layer keeps the keys and values of the positions
//! it has seen, so a new token costs one position's work instead of the whole prefix's.
//! The routing of a token does not depend on the others in its batch (DRN and selection
//! are per row), so the cached pass routes exactly as the full forward pass does.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::lm::{LayerRoutingArgs, LmOutput, MoeLanguageModel, RoutingPlan};
use super::precision::Precision;
use super::rms_norm::rms_norm;
use super::routing_backend::RoutingBackend;
use crate::error::{Error, Result};

/// The keys and values of every block, `[B, H, len, h]` each, after RoPE.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `model`, holding at most its `seq_len` positions (RoPE's table
    /// ends there).
    pub fn new(model: &MoeLanguageModel<B>, seq_len: usize) -> Self {
        Self {
            layers: vec![None; model.blocks.len()],
            len: 0,
            capacity: seq_len,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions the cache can hold (the model's `seq_len`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

impl<B: RoutingBackend> MoeLanguageModel<B> {
    /// The logits `[B S, V]` and routing of `tokens` `[B, S]` placed after the positions
    /// in `cache`, which then holds them too. From an empty cache this equals
    /// [`MoeLanguageModel::forward`] on the same tokens.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        routing: &RoutingPlan,
        precision: Precision,
    ) -> Result<LmOutput<B>> {
        let [b, s] = tokens.dims();
        let start = cache.len;
        if start + s > cache.capacity {
            return Err(Error::param(
                "positions in the KV cache",
                start + s,
                format!(
                    "at most the model's seq_len = {} (RoPE is defined that far)",
                    cache.capacity
                ),
            ));
        }
        let moe_layers = self.check_selectors(routing)?;
        let d = self.embed.dims()[1];
        let mut x =
            super::embed_tokens(self.embed.val(), tokens.reshape([b * s])).reshape([b, s, d]);
        let mut moe = Vec::with_capacity(moe_layers);
        for (block, kv) in self.blocks.iter().zip(&mut cache.layers) {
            x = x.clone()
                + block
                    .attn
                    .forward_cached(rms_norm(&block.attn_norm, x), kv, start, precision);
            let layer_routing = LayerRoutingArgs {
                use_drn: routing.use_drn,
                selector: routing.selectors.get(moe.len()).copied(),
                threshold: None,
                bounds: None,
            };
            let (y, out) = block.feed_forward(x.clone(), layer_routing, precision)?;
            moe.extend(out);
            x = x + y;
        }
        cache.len = start + s;
        let x = rms_norm(&self.final_norm, x).reshape([b * s, d]);
        let logits = precision.dense(x, self.head.val());
        Ok(LmOutput { logits, moe })
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::KvCache;
    use crate::model::{ModelConfig, MoeLanguageModel, Precision, RoutingPlan, Selector};

    type B = NdArray;

    #[test]
    fn cached_decoding_gives_the_full_forward_logits_and_routing() {
        let device = Default::default();
        let config = ModelConfig {
            vocab: 40,
            d_model: 24,
            layers: 3,
            heads: 3,
            seq_len: 12,
            experts: 7,
            expert_hidden: 10,
            moe_every: 2,
            dense_hidden: 16,
            rope_theta: 10_000.0,
            init_std: 0.3,
        };
        let model = MoeLanguageModel::<B>::new(&config, 11, &device).unwrap();
        let plan = RoutingPlan {
            use_drn: true,
            selectors: vec![
                Selector::TopP {
                    threshold: 0.6,
                    k_max: None
                };
                config.moe_layers()
            ],
            bounds: None,
        };
        let sequence: Vec<i64> = (0..10).map(|i| (i * 7 + 3) % 40).collect();
        let tensor = |t: &[i64]| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(t.to_vec(), [1, t.len()]), &device)
        };
        let full = model
            .forward(tensor(&sequence), &plan, Precision::F32)
            .unwrap();
        let full_logits: Vec<f32> = full.logits.into_data().to_vec().unwrap();
        let full_counts: Vec<Vec<i32>> = full
            .moe
            .iter()
            .map(|m| m.routing.counts().unwrap())
            .collect();

        // A prompt of 4 in one pass, then one token at a time.
        let mut cache = KvCache::new(&model, config.seq_len);
        let mut logits = Vec::new();
        let mut counts = vec![Vec::new(); config.moe_layers()];
        for chunk in std::iter::once(&sequence[..4]).chain(sequence[4..].chunks(1)) {
            let out = model
                .forward_cached(tensor(chunk), &mut cache, &plan, Precision::F32)
                .unwrap();
            logits.extend(out.logits.into_data().to_vec::<f32>().unwrap());
            for (all, m) in counts.iter_mut().zip(&out.moe) {
                all.extend(m.routing.counts().unwrap());
            }
        }
        assert_eq!(cache.len(), sequence.len());
        assert_eq!(counts, full_counts);
        let worst = logits
            .iter()
            .zip(&full_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "largest logit difference {worst}");

        // Past seq_len the cache refuses, naming the limit.
        let err = model
            .forward_cached(tensor(&[1, 2, 3]), &mut cache, &plan, Precision::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("seq_len = 12"), "{err}");
    }
}
