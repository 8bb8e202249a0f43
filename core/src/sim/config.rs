//! What a simulation is asked to do and what it records: the types the closed loop
//! ([`super::closed_loop`]) and its runner ([`super::run`]) share.

use serde::{Deserialize, Serialize};

use super::stream::StreamConfig;
use super::summary::TrackingSummary;
use crate::controller::{ControllerConfig, ThresholdScope};
use crate::error::{Error, Result};
use crate::ops::Normalization;

/// How experts are selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimMode {
    /// Top-p with the PI controller moving the threshold.
    Dtopp,
    /// Top-p with a fixed threshold.
    Topp,
    /// Top-k with `k = T`.
    Topk,
}

impl SimMode {
    /// The name used on the command line and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Dtopp => "dtopp",
            Self::Topp => "topp",
            Self::Topk => "topk",
        }
    }
}

/// Everything one simulation needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The logit stream.
    pub stream: StreamConfig,
    /// Selection mode.
    pub mode: SimMode,
    /// Steps to run.
    pub steps: u64,
    /// Controller settings (target, gains, clamps); the target also sets Top-k's `k`.
    pub controller: ControllerConfig,
    /// One threshold for all layers or one per layer.
    pub scope: ThresholdScope,
    /// Fixed `p` (topp) or `p_0` (dtopp); `None`: calibrated on the first batch.
    pub threshold: Option<f64>,
    /// Router normalization (DRN with its theta, or plain softmax).
    pub normalization: Normalization,
    /// Optional cap on experts per token.
    pub k_max: Option<usize>,
    /// A step change of the target: from this step on, `T` becomes the value.
    pub target_change: Option<(u64, f64)>,
}

impl SimConfig {
    /// Checks the combination of settings.
    pub fn validate(&self) -> Result<()> {
        self.stream.validate()?;
        if self.controller.num_experts != self.stream.experts {
            return Err(Error::param(
                "controller experts",
                self.controller.num_experts,
                format!("the stream's E = {}", self.stream.experts),
            ));
        }
        self.controller.validate()?;
        if let Some(p) = self.threshold
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(Error::param("threshold p", p, "a value in (0, 1]"));
        }
        crate::ops::check_k_max(self.k_max, self.stream.experts)?;
        if let Some((_, t)) = self.target_change {
            ControllerConfig {
                target: t,
                ..self.controller.clone()
            }
            .validate()?;
        }
        if self.mode == SimMode::Topk {
            for t in [
                Some(self.controller.target),
                self.target_change.map(|c| c.1),
            ]
            .into_iter()
            .flatten()
            {
                if t.fract() != 0.0 {
                    return Err(Error::param(
                        "target T",
                        t,
                        "a whole number of experts for topk (k = T)",
                    ));
                }
            }
        }
        if self.steps == 0 {
            return Err(Error::param("steps", 0, "at least 1"));
        }
        Ok(())
    }

    /// The target in force at a step.
    pub fn target_at(&self, step: u64) -> f64 {
        match self.target_change {
            Some((at, t)) if step >= at => t,
            _ => self.controller.target,
        }
    }
}

/// One step of a simulation, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step index, from 0.
    pub step: u64,
    /// `dtopp`, `topp` or `topk`.
    pub mode: String,
    /// `T` in force at this step.
    pub target: f64,
    /// The threshold this step was routed with (mean over layers for the per-layer
    /// variant); `null` for topk.
    pub threshold: Option<f64>,
    /// Per-layer thresholds (only for the per-layer variant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_per_layer: Option<Vec<f64>>,
    /// `a_t`: mean activated experts over all tokens and layers.
    pub active_experts: f64,
    /// Mean activated experts of each layer.
    pub active_experts_per_layer: Vec<f64>,
    /// The controller's integral after this step's update (`null` without controller;
    /// mean over layers for the per-layer variant).
    pub integral: Option<f64>,
    /// The normalised error `(T - a_t) / E` of this step (`null` without controller).
    pub error: Option<f64>,
}

/// The result of a simulation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimOutcome {
    /// Tracking of `a_t` against `T`.
    pub tracking: TrackingSummary,
    /// The threshold after the last step (`None` for topk).
    pub final_threshold: Option<f64>,
}
