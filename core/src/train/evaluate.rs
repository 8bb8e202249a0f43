//! Validation: the loss and routing of a model over fixed batches, and the routing sample
//! of the validation snippet. Used by the trainer at its evaluation steps and by
//! `dtopp eval` on a trained run.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::batches::{Batch, Corpus};
use super::losses::cross_entropy;
use crate::data::TokenClass;
use crate::error::{Error, Result};
use crate::host_reads;
use crate::metrics::{ClassBucket, DifficultyBucket, RoutingSample};
use crate::model::{MoeLanguageModel, Precision, RoutingBackend, RoutingPlan};

/// A batch as the model's input tokens `[B, S]` and flat targets `[B S]`.
pub(crate) fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let shape = [batch.batch, batch.seq_len];
    let inputs = Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device);
    let targets = Tensor::from_data(
        TensorData::new(batch.targets.clone(), [batch.batch * batch.seq_len]),
        device,
    );
    (inputs, targets)
}

/// A tensor's values on the host (one counted read-back).
pub(crate) fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    host_reads::count(1);
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("reading a tensor back: {e:?}"),
        })
}

/// One pass over the validation batches.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Activated experts per token of each MoE layer, averaged over the batches' tokens.
    pub active_per_layer: Vec<f64>,
    /// Tokens evaluated.
    pub tokens: u64,
    /// Activated experts grouped by the difficulty of the token each position predicts
    /// (synthetic corpus; empty otherwise).
    pub by_difficulty: Vec<DifficultyBucket>,
    /// Loss and activated experts by the class of the token each position predicts
    /// (`synthetic:reasoning`; empty otherwise).
    pub by_class: Vec<ClassBucket>,
}

impl Evaluation {
    /// Active experts per token, averaged over the MoE layers.
    pub fn mean_active(&self) -> f64 {
        let layers = self.active_per_layer.len().max(1);
        self.active_per_layer.iter().sum::<f64>() / layers as f64
    }
}

/// Mean cross-entropy and routing of `model` over `batches` (f32, no gradients kept).
pub fn evaluate<B: RoutingBackend>(
    model: &MoeLanguageModel<B>,
    batches: &[Batch],
    plan: &RoutingPlan,
    device: &B::Device,
) -> Result<Evaluation> {
    let mut total = 0.0;
    let mut active = vec![0u64; model.moe_layers().count()];
    let mut tokens = 0u64;
    // Difficulty in hundredths of a bit -> (tokens, experts summed per layer).
    let mut buckets: std::collections::BTreeMap<i64, (u64, Vec<u64>)> = Default::default();
    // Class label -> (tokens, summed loss, experts summed per layer).
    let mut by_class: std::collections::BTreeMap<u8, (u64, f64, Vec<u64>)> = Default::default();
    for batch in batches {
        let (inputs, targets) = batch_tensors::<B>(batch, device);
        let output = model.forward(inputs, plan, Precision::F32)?;
        let counts: Vec<Vec<i32>> = output
            .moe
            .iter()
            .map(|layer| layer.routing.counts())
            .collect::<Result<_>>()?;
        for (sum, layer) in active.iter_mut().zip(&counts) {
            *sum += layer.iter().map(|&k| k as u64).sum::<u64>();
        }
        tokens += (batch.batch * batch.seq_len) as u64;
        if let Some(difficulty) = &batch.difficulty {
            for (i, d) in difficulty.iter().enumerate() {
                let entry = buckets
                    .entry((f64::from(*d) * 100.0).round() as i64)
                    .or_insert_with(|| (0, vec![0; counts.len()]));
                entry.0 += 1;
                for (sum, layer) in entry.1.iter_mut().zip(&counts) {
                    *sum += layer[i] as u64;
                }
            }
        }
        if let Some(classes) = &batch.classes {
            // Per-position losses, read back only where the corpus labels classes.
            let n = batch.batch * batch.seq_len;
            let losses = host_f32(B::token_losses(output.logits.clone(), targets.clone()))?;
            debug_assert_eq!(losses.len(), n);
            for (i, &class) in classes.iter().enumerate() {
                let entry = by_class
                    .entry(class)
                    .or_insert_with(|| (0, 0.0, vec![0; counts.len()]));
                entry.0 += 1;
                entry.1 += f64::from(losses[i]);
                for (sum, layer) in entry.2.iter_mut().zip(&counts) {
                    *sum += layer[i] as u64;
                }
            }
        }
        total += f64::from(host_f32(cross_entropy(output.logits, targets))?[0]);
    }
    let by_class = by_class
        .into_iter()
        .map(|(class, (tokens, loss, sums))| {
            let per_layer: Vec<f64> = sums.iter().map(|&s| s as f64 / tokens as f64).collect();
            ClassBucket {
                class: TokenClass::ALL
                    .get(usize::from(class))
                    .map_or("unknown", |c| c.name())
                    .to_string(),
                tokens,
                loss: loss / tokens as f64,
                mean_active: per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64,
                mean_active_per_layer: per_layer,
            }
        })
        .collect();
    let by_difficulty = buckets
        .into_iter()
        .map(|(key, (tokens, sums))| {
            let per_layer: Vec<f64> = sums.iter().map(|&s| s as f64 / tokens as f64).collect();
            DifficultyBucket {
                difficulty_bits: key as f64 / 100.0,
                tokens,
                mean_active: per_layer.iter().sum::<f64>() / per_layer.len() as f64,
                mean_active_per_layer: per_layer,
            }
        })
        .collect();
    Ok(Evaluation {
        loss: total / batches.len() as f64,
        active_per_layer: active
            .iter()
            .map(|&a| a as f64 / tokens.max(1) as f64)
            .collect(),
        tokens,
        by_difficulty,
        by_class,
    })
}

/// The routing of the validation snippet: each token's experts and probabilities per layer.
pub(crate) fn routing_sample<B: RoutingBackend>(
    model: &MoeLanguageModel<B>,
    snippet: &Batch,
    corpus: &Corpus,
    plan: &RoutingPlan,
    step: u64,
) -> Result<RoutingSample> {
    let device = model.embed.device();
    let (inputs, _) = batch_tensors::<B>(snippet, &device);
    let output = model.forward(inputs, plan, Precision::F32)?;
    let tokens: Vec<u32> = snippet.inputs.iter().map(|&t| t as u32).collect();
    let text = tokens
        .iter()
        .map(|&t| match corpus {
            Corpus::Text(_) => printable_byte(t as u8),
            Corpus::Synthetic(_) | Corpus::Reasoning(_) | Corpus::Shards { .. } => {
                format!("#{t}")
            }
        })
        .collect();
    // The difficulty of each input token is that of the previous target.
    let difficulty = snippet.difficulty.as_ref().map(|d| {
        std::iter::once(0.0)
            .chain(d[..d.len() - 1].iter().copied())
            .collect()
    });
    let mut experts = Vec::new();
    let mut probs = Vec::new();
    for layer in output.moe {
        let p = host_f32(layer.probs)?;
        let e = p.len() / tokens.len();
        let ranked = layer.routing.ranked_experts(&p)?;
        let (mut ex, mut pr) = (Vec::new(), Vec::new());
        // The padded rank-ordered rows hold the counts too (one read-back, not two).
        for (i, row) in ranked.chunks_exact(e).enumerate() {
            let chosen: Vec<u32> = row
                .iter()
                .take_while(|&&j| j >= 0)
                .map(|&j| j as u32)
                .collect();
            pr.push(chosen.iter().map(|&j| p[i * e + j as usize]).collect());
            ex.push(chosen);
        }
        experts.push(ex);
        probs.push(pr);
    }
    Ok(RoutingSample {
        step,
        tokens,
        text,
        difficulty,
        experts,
        probs,
    })
}

/// A byte as the log shows it: printable ASCII as itself, otherwise escaped.
pub fn printable_byte(b: u8) -> String {
    match b {
        b' '..=b'~' => (b as char).to_string(),
        b'\n' => "\\n".to_string(),
        _ => format!("\\x{b:02x}"),
    }
}
