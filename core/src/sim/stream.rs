//! A synthetic stream of router logits for the closed-loop simulator.
//!
//! Each token has a difficulty `d` in `[0, 1)` and a few preferred experts (1 to 4).
//! Its logits are unit Gaussian noise plus a margin on the preferred experts that
//! shrinks with difficulty:
//!
//!   z_ij = s n_ij + m_l(t) (1 - d_i) [j preferred by i],  n_ij ~ N(0, 1)
//!
//! with noise scale `s` (1 by default; larger spreads every token's mass).
//! so easy tokens put their mass on a few experts and hard tokens spread it. The margin
//! differs by layer (shallow layers sharper) and grows over the run, as routers sharpen
//! while training; an optional shock multiplies it at one step. A fixed threshold then
//! activates fewer and fewer experts; the controller has to follow. Logits of step `t`
//! and layer `l` come from their own random sub-stream, so every mode sees the same data.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Settings of the logit stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// `L`, MoE layers.
    pub layers: usize,
    /// `N`, tokens per step and layer.
    pub tokens: usize,
    /// `E`, experts per layer.
    pub experts: usize,
    /// Seed of all randomness.
    pub seed: u64,
    /// Margin of preferred experts at step 0 in the middle layer.
    pub margin: f64,
    /// Scale `s` of the Gaussian noise on every logit.
    #[serde(default = "unit_noise")]
    pub noise: f64,
    /// Relative growth of the margin over `horizon` steps (1.0: it doubles).
    pub drift: f64,
    /// Steps over which `drift` is reached (growth continues linearly past it).
    pub horizon: u64,
    /// At this step, the margin is multiplied by the factor from then on.
    pub shock: Option<(u64, f64)>,
}

impl StreamConfig {
    /// Checks sizes and rates.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("layers", self.layers),
            ("tokens", self.tokens),
            ("experts", self.experts),
        ] {
            if v == 0 {
                return Err(Error::param(name, v, "at least 1"));
            }
        }
        if !(self.margin.is_finite() && self.margin >= 0.0) {
            return Err(Error::param("margin", self.margin, "a finite value >= 0"));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(Error::param("noise", self.noise, "a finite value >= 0"));
        }
        if !(self.drift.is_finite() && self.drift > -1.0) {
            return Err(Error::param("drift", self.drift, "a finite value > -1"));
        }
        if let Some((_, factor)) = self.shock
            && !(factor.is_finite() && factor > 0.0)
        {
            return Err(Error::param("shock factor", factor, "a finite value > 0"));
        }
        Ok(())
    }

    /// The margin `m_l(t)` of layer `l` at step `t`.
    pub fn margin_at(&self, step: u64, layer: usize) -> f64 {
        // Shallow layers sharper: from 1.25x (first) to 0.75x (last) of the base margin.
        let depth = if self.layers > 1 {
            layer as f64 / (self.layers - 1) as f64
        } else {
            0.5
        };
        let growth = 1.0 + self.drift * step as f64 / self.horizon.max(1) as f64;
        let shock = match self.shock {
            Some((at, factor)) if step >= at => factor,
            _ => 1.0,
        };
        self.margin * (1.25 - 0.5 * depth) * growth.max(0.0) * shock
    }

    /// Logits of layer `l` at step `t`, `[N, E]`, and each token's difficulty `[N]`.
    pub fn logits(&self, step: u64, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::substream(self.seed, step, layer as u64);
        let margin = self.margin_at(step, layer);
        let e = self.experts;
        let mut logits = vec![0.0f32; self.tokens * e];
        let mut difficulty = vec![0.0f32; self.tokens];
        for (row, d_out) in logits.chunks_exact_mut(e).zip(difficulty.iter_mut()) {
            let d = rng.uniform();
            *d_out = d as f32;
            for z in row.iter_mut() {
                *z = (self.noise * rng.normal()) as f32;
            }
            let preferred = 1 + rng.below(4);
            for _ in 0..preferred {
                let j = rng.below(e);
                row[j] += (margin * (1.0 - d)) as f32;
            }
        }
        (logits, difficulty)
    }
}

fn unit_noise() -> f64 {
    1.0
}
