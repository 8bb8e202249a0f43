//! The simulator's bookkeeping without the routing: which rule a step selects with, and
//! what the counts it gets back do to the controller. Whoever routes (the synchronous
//! [`super::Simulation`] on any backend, the desktop app stepping three modes on shared
//! logits, the browser awaiting WebGPU read-backs) drives the same loop:
//!
//! 1. [`ClosedLoop::logits`] of every layer, normalised by the router;
//! 2. at the first step, [`ClosedLoop::calibrate`] with those probabilities if
//!    [`ClosedLoop::needs_calibration`];
//! 3. [`ClosedLoop::begin`] gives the [`SelectionRule`], [`launch_selection`] runs it;
//! 4. [`ClosedLoop::finish`] with each layer's mean expert count.

use super::config::{SimConfig, SimMode, SimOutcome, StepRecord};
use super::summary::TrackingSummary;
use crate::controller::{ThresholdControl, ThresholdScope, calibrate_threshold};
use crate::error::{Error, Result};
use crate::ops::{Normalization, RouteShape, RoutingOps};

/// How one step selects experts, per layer.
#[derive(Clone, Debug, PartialEq)]
pub enum SelectionRule {
    /// Top-p with this threshold for each layer.
    TopP(Vec<f64>),
    /// Top-k with this `k`.
    TopK(usize),
}

/// One simulation's state between steps; routing is the caller's.
#[derive(Debug)]
pub struct ClosedLoop {
    config: SimConfig,
    shape: RouteShape,
    step: u64,
    control: Option<ThresholdControl>,
    fixed: Vec<f64>,
    active: Vec<f64>,
    targets: Vec<f64>,
    // A target set while running, overriding the configured schedule.
    target_override: Option<f64>,
    // Target and thresholds of the step between `begin` and `finish`.
    current: Option<(f64, Option<Vec<f64>>)>,
}

impl ClosedLoop {
    /// The loop of `config`, before its first step.
    pub fn new(config: &SimConfig) -> Result<Self> {
        config.validate()?;
        let s = &config.stream;
        Ok(Self {
            config: config.clone(),
            shape: RouteShape::new(s.tokens, s.experts)?,
            step: 0,
            control: None,
            fixed: Vec::new(),
            active: Vec::new(),
            targets: Vec::new(),
            target_override: None,
            current: None,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Steps finished.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The routing settings: shape, normalization and cap on experts per token.
    pub fn routing(&self) -> (RouteShape, Normalization, Option<usize>) {
        (self.shape, self.config.normalization, self.config.k_max)
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

    /// Replaces the logit stream's margin, noise, drift and horizon (the shape stays).
    pub fn set_stream(&mut self, margin: f64, noise: f64, drift: f64, horizon: u64) -> Result<()> {
        let mut config = self.config.clone();
        config.stream.margin = margin;
        config.stream.noise = noise;
        config.stream.drift = drift;
        config.stream.horizon = horizon;
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Logits `[N, E]` of `layer` for the next step.
    pub fn logits(&self, layer: usize) -> Vec<f32> {
        self.config.stream.logits(self.step, layer).0
    }

    /// Whether the next step needs [`ClosedLoop::calibrate`] first: the first step of a
    /// Top-p mode without a given threshold.
    pub fn needs_calibration(&self) -> bool {
        self.step == 0
            && self.config.mode != SimMode::Topk
            && self.config.threshold.is_none()
            && self.control.is_none()
            && self.fixed.is_empty()
    }

    /// `p_0` from the first step's normalised probabilities, one `[N, E]` per layer (over
    /// all layers for one global threshold, per layer for the per-layer variant).
    pub fn calibrate(&mut self, probs: &[Vec<f32>]) -> Result<()> {
        let layers = self.config.stream.layers;
        if probs.len() != layers {
            return Err(Error::shape(
                "calibrate",
                format!(
                    "needs the probabilities of all {layers} layers, got {}",
                    probs.len()
                ),
            ));
        }
        let target = self.config.controller.target;
        let calibrated = probs
            .iter()
            .map(|p| calibrate_threshold(p, self.shape, target))
            .collect::<Result<Vec<f64>>>()?;
        let initial = if self.per_layer() {
            calibrated
        } else {
            vec![calibrated.iter().sum::<f64>() / calibrated.len() as f64]
        };
        self.install(initial)
    }

    fn per_layer(&self) -> bool {
        self.config.scope == ThresholdScope::PerLayer && self.config.mode == SimMode::Dtopp
    }

    fn install(&mut self, initial: Vec<f64>) -> Result<()> {
        match self.config.mode {
            SimMode::Dtopp => {
                self.control = Some(ThresholdControl::new(
                    &self.config.controller,
                    self.config.scope,
                    self.config.stream.layers,
                    &initial,
                )?);
            }
            SimMode::Topp => self.fixed = initial,
            SimMode::Topk => {}
        }
        Ok(())
    }

    /// Starts the next step: the rule every layer selects with.
    pub fn begin(&mut self) -> Result<SelectionRule> {
        let layers = self.config.stream.layers;
        if self.step == 0 && self.config.mode != SimMode::Topk {
            if let Some(p) = self.config.threshold {
                if self.control.is_none() && self.fixed.is_empty() {
                    self.install(vec![p; if self.per_layer() { layers } else { 1 }])?;
                }
            } else if self.needs_calibration() {
                return Err(Error::shape(
                    "begin",
                    "the first step needs calibrate() with the first batch's probabilities",
                ));
            }
        }
        let target = self.target();
        if let Some(c) = self.control.as_mut() {
            c.set_target(target)?;
        }
        let thresholds: Option<Vec<f64>> = match (&self.control, self.config.mode) {
            (Some(c), _) => Some(c.thresholds()),
            (None, SimMode::Topp) => Some(if self.fixed.len() == 1 {
                vec![self.fixed[0]; layers]
            } else {
                self.fixed.clone()
            }),
            _ => None,
        };
        let rule = match &thresholds {
            Some(t) => SelectionRule::TopP(t.clone()),
            None => SelectionRule::TopK(target as usize),
        };
        self.current = Some((target, thresholds));
        Ok(rule)
    }

    /// Ends the step begun last with each layer's mean experts per token: updates the
    /// controller and returns the step's record.
    pub fn finish(&mut self, per_layer: Vec<f64>) -> Result<StepRecord> {
        let layers = self.config.stream.layers;
        if per_layer.len() != layers {
            return Err(Error::shape(
                "finish",
                format!(
                    "needs the counts of all {layers} layers, got {}",
                    per_layer.len()
                ),
            ));
        }
        let (target, thresholds) = self
            .current
            .take()
            .ok_or_else(|| Error::shape("finish", "called without begin()"))?;
        let a_t = per_layer.iter().sum::<f64>() / layers as f64;
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
            step: self.step,
            mode: self.config.mode.name().to_string(),
            target,
            threshold: thresholds
                .as_ref()
                .map(|t| t.iter().sum::<f64>() / t.len() as f64),
            threshold_per_layer: thresholds
                .filter(|_| self.config.scope == ThresholdScope::PerLayer),
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

/// Launches `rule` on every layer's normalised probabilities; returns each layer's
/// experts-per-token counts `[N]`, still on the backend (read them when convenient).
pub fn launch_selection<O: RoutingOps>(
    ops: &O,
    shape: RouteShape,
    probs: &[O::Floats],
    rule: &SelectionRule,
    k_max: Option<usize>,
) -> Result<Vec<O::Ints>> {
    probs
        .iter()
        .enumerate()
        .map(|(layer, p)| {
            let selection = match rule {
                SelectionRule::TopP(t) => {
                    let threshold = ops.upload_floats(&[t[layer] as f32])?;
                    ops.top_p(p, shape, &threshold, k_max)?
                }
                SelectionRule::TopK(k) => ops.top_k(p, shape, *k)?,
            };
            Ok(selection.counts)
        })
        .collect()
}

/// Mean experts per token of one layer's counts.
pub fn mean_count(counts: &[i32]) -> f64 {
    counts.iter().map(|&k| f64::from(k)).sum::<f64>() / counts.len().max(1) as f64
}
