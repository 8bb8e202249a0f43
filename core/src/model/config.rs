//! The shape of the MoE language model, validated before anything is allocated.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Sizes of the decoder-only MoE transformer. Every field is validated by
/// [`ModelConfig::validate`] with a message naming the field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size (256 for byte-level text; the synthetic language's own size).
    pub vocab: usize,
    /// Model width `D`.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads; `d_model / heads` must be even (RoPE rotates pairs).
    pub heads: usize,
    /// Longest sequence (RoPE table size).
    pub seq_len: usize,
    /// `E`, experts per MoE layer.
    pub experts: usize,
    /// `F`, hidden width of each SwiGLU expert.
    pub expert_hidden: usize,
    /// Every `moe_every`-th block (counting from the first) has an MoE feed-forward; the
    /// others a dense SwiGLU of width `dense_hidden`. 1: MoE in every block.
    pub moe_every: usize,
    /// Hidden width of the dense feed-forward blocks (unused when `moe_every = 1`).
    pub dense_hidden: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Standard deviation of the normal initialisation of weight matrices.
    pub init_std: f64,
}

impl ModelConfig {
    /// Checks every size, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("model.vocab", self.vocab),
            ("model.d_model", self.d_model),
            ("model.layers", self.layers),
            ("model.heads", self.heads),
            ("model.seq_len", self.seq_len),
            ("model.experts", self.experts),
            ("model.expert_hidden", self.expert_hidden),
            ("model.moe_every", self.moe_every),
        ] {
            if value == 0 {
                return Err(Error::param(name, 0, "at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.heads)
            || !(self.d_model / self.heads).is_multiple_of(2)
        {
            return Err(Error::param(
                "model.heads",
                self.heads,
                format!(
                    "a divisor of d_model = {} leaving an even head width (RoPE rotates pairs)",
                    self.d_model
                ),
            ));
        }
        if self.moe_every > 1 && self.dense_hidden == 0 {
            return Err(Error::param(
                "model.dense_hidden",
                0,
                "at least 1 when moe_every > 1 (dense blocks need a width)",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(Error::param(
                "model.rope_theta",
                self.rope_theta,
                "a finite base above 1 (10000 is usual)",
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(Error::param(
                "model.init_std",
                self.init_std,
                "a finite standard deviation above 0 (0.02 is usual)",
            ));
        }
        Ok(())
    }

    /// Whether block `index` (0-based) has an MoE feed-forward.
    pub fn is_moe_block(&self, index: usize) -> bool {
        index.is_multiple_of(self.moe_every)
    }

    /// Number of MoE blocks.
    pub fn moe_layers(&self) -> usize {
        (0..self.layers).filter(|&l| self.is_moe_block(l)).count()
    }

    /// Total parameters (every expert counted).
    pub fn parameters(&self) -> usize {
        let (d, v) = (self.d_model, self.vocab);
        let attention = 4 * d * d + 2 * d;
        let moe = d * self.experts + 1 + 3 * self.experts * d * self.expert_hidden;
        let dense = 3 * d * self.dense_hidden;
        let blocks: usize = (0..self.layers)
            .map(|l| attention + if self.is_moe_block(l) { moe } else { dense })
            .sum();
        2 * v * d + d + blocks
    }

    /// Model FLOPs of one training token (forward and backward) when it activates
    /// `active` experts per MoE layer on average: `6 N + 12 L d S` (PaLM's definition),
    /// `N` the parameters of the matrix products the token passes through (attention,
    /// dense and active expert matrices, routers, the output head; not the embedding
    /// lookup, norms or theta), `L` blocks, `d` d_model, `S` seq_len (attention scores
    /// and values, counted over the whole window as is customary).
    pub fn training_flops_per_token(&self, active: f64) -> f64 {
        let (d, l) = (self.d_model as f64, self.layers as f64);
        let lookups_and_norms = self.vocab as f64 * d + (2.0 * l + 1.0) * d;
        let thetas = self.moe_layers() as f64;
        let matmul = self.active_parameters(active) - lookups_and_norms - thetas;
        6.0 * matmul + 12.0 * l * d * self.seq_len as f64
    }

    /// Model FLOPs of one token's forward pass at inference, a third of
    /// [`Self::training_flops_per_token`]: `2 N + 4 L d S`.
    pub fn inference_flops_per_token(&self, active: f64) -> f64 {
        self.training_flops_per_token(active) / 3.0
    }

    /// Parameters one token uses when it activates `active` experts per MoE layer on
    /// average (all attention, dense and embedding parameters, `active / E` of each MoE
    /// layer's experts, the whole router).
    pub fn active_parameters(&self, active: f64) -> f64 {
        let experts = 3 * self.experts * self.d_model * self.expert_hidden;
        let moe_blocks = (0..self.layers).filter(|&l| self.is_moe_block(l)).count();
        let unused = experts as f64 * (1.0 - active / self.experts as f64);
        self.parameters() as f64 - moe_blocks as f64 * unused
    }
}
