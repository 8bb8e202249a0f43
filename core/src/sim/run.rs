//! The closed loop without a model: logits from the synthetic stream, routed by any
//! backend, counted, and fed to the controller, step after step.

use serde::{Deserialize, Serialize};

use super::closed_loop::{ClosedLoop, launch_selection, mean_count};
use super::stream::StreamConfig;
use super::summary::TrackingSummary;
use crate::controller::{ControllerConfig, ThresholdScope};
use crate::error::{Error, Result};
use crate::ops::{Normalization, RoutingOps};

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
        crate::cpu::check_k_max(self.k_max, self.stream.experts)?;
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

/// A simulation advanced one step at a time on one routing backend; settings can change
/// between steps. The bookkeeping is [`ClosedLoop`]'s; this adds the routing.
#[derive(Debug)]
pub struct Simulation<'o, O: RoutingOps> {
    ops: &'o O,
    inner: ClosedLoop,
}

impl<'o, O: RoutingOps> Simulation<'o, O> {
    /// A simulation of `config` on `ops`, before its first step.
    pub fn new(ops: &'o O, config: &SimConfig) -> Result<Self> {
        Ok(Self {
            ops,
            inner: ClosedLoop::new(config)?,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &SimConfig {
        self.inner.config()
    }

    /// Steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.inner.steps_taken()
    }

    /// The target of the next step.
    pub fn target(&self) -> f64 {
        self.inner.target()
    }

    /// Sets `T` from the next step on (the controller keeps its integral).
    pub fn set_target(&mut self, target: f64) -> Result<()> {
        self.inner.set_target(target)
    }

    /// Sets the controller's gains and clamps from the next update on.
    pub fn set_controller(&mut self, kp: f64, ki: f64, p_min: f64, p_max: f64) -> Result<()> {
        self.inner.set_controller(kp, ki, p_min, p_max)
    }

    /// Replaces the logit stream's margin, noise, drift and horizon (the shape stays).
    pub fn set_stream(&mut self, margin: f64, noise: f64, drift: f64, horizon: u64) -> Result<()> {
        self.inner.set_stream(margin, noise, drift, horizon)
    }

    /// One step: route every layer's logits, count, update the controller.
    pub fn step(&mut self) -> Result<StepRecord> {
        let ops = self.ops;
        let (shape, normalization, k_max) = self.inner.routing();
        let probs: Vec<O::Floats> = (0..self.inner.config().stream.layers)
            .map(|layer| {
                let logits = self.inner.logits(layer);
                ops.drn_forward(&ops.upload_floats(&logits)?, shape, normalization)
            })
            .collect::<Result<_>>()?;
        if self.inner.needs_calibration() {
            let host = probs
                .iter()
                .map(|p| ops.read_floats(p))
                .collect::<Result<Vec<_>>>()?;
            self.inner.calibrate(&host)?;
        }
        let rule = self.inner.begin()?;
        let per_layer = launch_selection(ops, shape, &probs, &rule, k_max)?
            .iter()
            .map(|counts| Ok(mean_count(&ops.read_ints(counts)?)))
            .collect::<Result<Vec<f64>>>()?;
        self.inner.finish(per_layer)
    }

    /// Tracking so far and the current threshold.
    pub fn outcome(&self) -> SimOutcome {
        self.inner.outcome()
    }
}

/// Runs the closed loop on `ops`, calling `on_step` after every step.
pub fn run_simulation<O: RoutingOps>(
    ops: &O,
    config: &SimConfig,
    mut on_step: impl FnMut(&StepRecord) -> Result<()>,
) -> Result<SimOutcome> {
    let mut simulation = Simulation::new(ops, config)?;
    for _ in 0..config.steps {
        on_step(&simulation.step()?)?;
    }
    Ok(simulation.outcome())
}
