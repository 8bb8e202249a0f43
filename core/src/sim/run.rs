//! The closed loop without a model: logits from the synthetic stream, routed by any
//! backend, counted, and fed to the controller, step after step.

use super::closed_loop::{ClosedLoop, launch_selection, mean_count};
use super::config::{SimConfig, SimOutcome, StepRecord};
use crate::error::Result;
use crate::ops::RoutingOps;

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
