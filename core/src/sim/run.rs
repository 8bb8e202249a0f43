//! The closed loop without a model: logits from the synthetic stream, routed by any
//! backend, counted, and fed to the controller, step after step.

use serde::{Deserialize, Serialize};

use super::stream::StreamConfig;
use super::summary::TrackingSummary;
use crate::controller::{ControllerConfig, ThresholdControl, ThresholdScope, calibrate_threshold};
use crate::error::{Error, Result};
use crate::ops::{Normalization, RouteShape, RoutingOps};

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

/// A simulation advanced one step at a time; settings can change between steps.
#[derive(Debug)]
pub struct Simulation<'o, O: RoutingOps> {
    ops: &'o O,
    config: SimConfig,
    shape: RouteShape,
    step: u64,
    control: Option<ThresholdControl>,
    fixed: Vec<f64>,
    active: Vec<f64>,
    targets: Vec<f64>,
    // A target set while running, overriding the configured schedule.
    target_override: Option<f64>,
}

impl<'o, O: RoutingOps> Simulation<'o, O> {
    /// A simulation of `config` on `ops`, before its first step.
    pub fn new(ops: &'o O, config: &SimConfig) -> Result<Self> {
        config.validate()?;
        let s = &config.stream;
        Ok(Self {
            ops,
            config: config.clone(),
            shape: RouteShape::new(s.tokens, s.experts)?,
            step: 0,
            control: None,
            fixed: Vec::new(),
            active: Vec::new(),
            targets: Vec::new(),
            target_override: None,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The target of the next step.
    pub fn target(&self) -> f64 {
        self.target_override
            .unwrap_or_else(|| self.config.target_at(self.step))
    }

    /// Sets `T` from the next step on (the controller keeps its integral).
    pub fn set_target(&mut self, target: f64) -> Result<()> {
        let mut config = self.config.clone();
        config.controller.target = target;
        config.target_change = None;
        config.validate()?;
        self.config = config;
        self.target_override = Some(target);
        Ok(())
    }

    /// Sets the controller's gains and clamps from the next update on.
    pub fn set_controller(&mut self, kp: f64, ki: f64, p_min: f64, p_max: f64) -> Result<()> {
        let mut config = self.config.clone();
        config.controller.kp = kp;
        config.controller.ki = ki;
        config.controller.p_min = p_min;
        config.controller.p_max = p_max;
        config.validate()?;
        if let Some(c) = self.control.as_mut() {
            c.set_controller(&config.controller)?;
        }
        self.config = config;
        Ok(())
    }

    /// Replaces the logit stream's margin, drift and horizon (the shape stays).
    pub fn set_stream(&mut self, margin: f64, drift: f64, horizon: u64) -> Result<()> {
        let mut config = self.config.clone();
        config.stream.margin = margin;
        config.stream.drift = drift;
        config.stream.horizon = horizon;
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// One step: route every layer's logits, count, update the controller.
    pub fn step(&mut self) -> Result<StepRecord> {
        let (ops, shape, step) = (self.ops, self.shape, self.step);
        let target = self.target();
        let config = &self.config;
        let s = &config.stream;
        let probs: Vec<O::Floats> = (0..s.layers)
            .map(|layer| {
                let (logits, _) = s.logits(step, layer);
                ops.drn_forward(&ops.upload_floats(&logits)?, shape, config.normalization)
            })
            .collect::<Result<_>>()?;

        if step == 0 && config.mode != SimMode::Topk {
            let initial = initial_thresholds(ops, config, shape, &probs)?;
            match config.mode {
                SimMode::Dtopp => {
                    self.control = Some(ThresholdControl::new(
                        &config.controller,
                        config.scope,
                        s.layers,
                        &initial,
                    )?);
                }
                _ => self.fixed = initial,
            }
        }
        if let Some(c) = self.control.as_mut() {
            c.set_target(target)?;
        }

        let thresholds: Option<Vec<f64>> = match (&self.control, config.mode) {
            (Some(c), _) => Some(c.thresholds()),
            (None, SimMode::Topp) => Some(if self.fixed.len() == 1 {
                vec![self.fixed[0]; s.layers]
            } else {
                self.fixed.clone()
            }),
            _ => None,
        };

        let mut per_layer = Vec::with_capacity(s.layers);
        for (layer, p) in probs.iter().enumerate() {
            let selection = match &thresholds {
                Some(t) => {
                    let threshold = ops.upload_floats(&[t[layer] as f32])?;
                    ops.top_p(p, shape, &threshold, config.k_max)?
                }
                None => ops.top_k(p, shape, target as usize)?,
            };
            let counts = ops.read_ints(&selection.counts)?;
            per_layer.push(counts.iter().map(|&k| f64::from(k)).sum::<f64>() / s.tokens as f64);
        }
        let a_t = per_layer.iter().sum::<f64>() / s.layers as f64;

        if let Some(c) = self.control.as_mut() {
            c.update(&per_layer)?;
        }
        let (integral, error) = match &self.control {
            Some(c) => {
                let n = c.controllers().len() as f64;
                let states = c.states();
                (
                    Some(states.iter().map(|st| st.integral).sum::<f64>() / n),
                    Some(states.iter().map(|st| st.last_error).sum::<f64>() / n),
                )
            }
            None => (None, None),
        };
        let record = StepRecord {
            step,
            mode: config.mode.name().to_string(),
            target,
            threshold: thresholds
                .as_ref()
                .map(|t| t.iter().sum::<f64>() / t.len() as f64),
            threshold_per_layer: thresholds.filter(|_| config.scope == ThresholdScope::PerLayer),
            active_experts: a_t,
            active_experts_per_layer: per_layer,
            integral,
            error,
        };
        self.active.push(a_t);
        self.targets.push(target);
        self.step += 1;
        Ok(record)
    }

    /// Tracking so far and the current threshold.
    pub fn outcome(&self) -> SimOutcome {
        let layers = self.config.stream.layers as f64;
        let final_threshold = match (&self.control, self.config.mode) {
            (Some(c), _) => Some(c.thresholds().iter().sum::<f64>() / layers),
            (None, SimMode::Topp) if !self.fixed.is_empty() => {
                Some(self.fixed.iter().sum::<f64>() / self.fixed.len() as f64)
            }
            _ => None,
        };
        SimOutcome {
            tracking: TrackingSummary::of(&self.active, &self.targets),
            final_threshold,
        }
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

/// `p_0`: given, or calibrated on the first batch (over all layers for one global
/// threshold, per layer for the per-layer variant).
fn initial_thresholds<O: RoutingOps>(
    ops: &O,
    config: &SimConfig,
    shape: RouteShape,
    probs: &[O::Floats],
) -> Result<Vec<f64>> {
    let per_layer = config.scope == ThresholdScope::PerLayer && config.mode == SimMode::Dtopp;
    if let Some(p) = config.threshold {
        return Ok(vec![p; if per_layer { probs.len() } else { 1 }]);
    }
    let target = config.controller.target;
    let calibrated = probs
        .iter()
        .map(|p| calibrate_threshold(&ops.read_floats(p)?, shape, target))
        .collect::<Result<Vec<f64>>>()?;
    Ok(if per_layer {
        calibrated
    } else {
        vec![calibrated.iter().sum::<f64>() / calibrated.len() as f64]
    })
}
