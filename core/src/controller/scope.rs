//! One global threshold for all layers (the method), or one controller per layer (the
//! variant that fixes each layer's cost but takes away the freedom DRN gives layers).

use serde::{Deserialize, Serialize};

use super::pi::{ControllerConfig, ControllerState, PiController};
use crate::error::{Error, Result};

/// Whether layers share one threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdScope {
    /// One threshold for every layer, driven by `a_t` averaged over all layers.
    #[default]
    Global,
    /// One threshold and controller per layer, each driven by its own layer's count.
    PerLayer,
}

/// The threshold controller(s) of a model with `L` MoE layers.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdControl {
    controllers: Vec<PiController>,
    layers: usize,
    scope: ThresholdScope,
}

impl ThresholdControl {
    /// Global scope: one `p_0`. Per-layer scope: one `p_0` per layer.
    pub fn new(
        config: &ControllerConfig,
        scope: ThresholdScope,
        layers: usize,
        initial_thresholds: &[f64],
    ) -> Result<Self> {
        if layers == 0 {
            return Err(Error::param("layers", 0, "at least 1 MoE layer"));
        }
        let expected = match scope {
            ThresholdScope::Global => 1,
            ThresholdScope::PerLayer => layers,
        };
        if initial_thresholds.len() != expected {
            return Err(Error::param(
                "initial thresholds",
                initial_thresholds.len(),
                format!("{expected} value(s) for {scope:?} scope with {layers} layers"),
            ));
        }
        let controllers = initial_thresholds
            .iter()
            .map(|&p0| PiController::new(config.clone(), p0))
            .collect::<Result<_>>()?;
        Ok(Self {
            controllers,
            layers,
            scope,
        })
    }

    /// Restores from saved states (one for global scope, one per layer otherwise).
    pub fn from_states(
        config: &ControllerConfig,
        layers: usize,
        states: Vec<ControllerState>,
    ) -> Result<Self> {
        if states.len() != 1 && states.len() != layers {
            return Err(Error::Parse {
                what: "controller state",
                message: format!(
                    "{} saved controllers, expected 1 (global) or {layers} (per layer)",
                    states.len()
                ),
            });
        }
        let scope = if states.len() == 1 {
            ThresholdScope::Global
        } else {
            ThresholdScope::PerLayer
        };
        let controllers = states
            .into_iter()
            .map(|s| PiController::from_state(config.clone(), s))
            .collect::<Result<_>>()?;
        Ok(Self {
            controllers,
            layers,
            scope,
        })
    }

    /// The scope.
    pub fn scope(&self) -> ThresholdScope {
        self.scope
    }

    /// The threshold of every layer, `[L]`.
    pub fn thresholds(&self) -> Vec<f64> {
        if self.controllers.len() == 1 {
            vec![self.controllers[0].threshold(); self.layers]
        } else {
            self.controllers
                .iter()
                .map(PiController::threshold)
                .collect()
        }
    }

    /// The controllers (one, or one per layer).
    pub fn controllers(&self) -> &[PiController] {
        &self.controllers
    }

    /// Saved states, for checkpoints.
    pub fn states(&self) -> Vec<ControllerState> {
        self.controllers.iter().map(|c| c.state().clone()).collect()
    }

    /// Replaces every controller's state (the host's copy of a state kept on the device),
    /// keeping the settings.
    pub fn set_states(&mut self, states: Vec<ControllerState>) -> Result<()> {
        if states.len() != self.controllers.len() {
            return Err(Error::param(
                "controller states",
                states.len(),
                format!("{} (one per controller)", self.controllers.len()),
            ));
        }
        for (c, s) in self.controllers.iter_mut().zip(states) {
            *c = PiController::from_state(c.config().clone(), s)?;
        }
        Ok(())
    }

    /// Changes the target of every controller.
    pub fn set_target(&mut self, target: f64) -> Result<()> {
        self.controllers
            .iter_mut()
            .try_for_each(|c| c.set_target(target))
    }

    /// Changes the gains of every controller.
    pub fn set_gains(&mut self, kp: f64, ki: f64) -> Result<()> {
        self.controllers
            .iter_mut()
            .try_for_each(|c| c.set_gains(kp, ki))
    }

    /// Changes gains and clamps of every controller (its target is kept).
    pub fn set_controller(&mut self, config: &ControllerConfig) -> Result<()> {
        self.controllers
            .iter_mut()
            .try_for_each(|c| c.set_controller(config))
    }

    /// One update from the mean activated experts of each layer, `[L]`. The global
    /// controller sees their mean, i.e. the mean over all tokens of all layers.
    pub fn update(&mut self, active_per_layer: &[f64]) -> Result<()> {
        if active_per_layer.len() != self.layers {
            return Err(Error::param(
                "active experts per layer",
                active_per_layer.len(),
                format!("{} values (one per MoE layer)", self.layers),
            ));
        }
        if self.controllers.len() == 1 {
            let mean = active_per_layer.iter().sum::<f64>() / self.layers as f64;
            self.controllers[0].update(mean)?;
        } else {
            for (c, &a) in self.controllers.iter_mut().zip(active_per_layer) {
                c.update(a)?;
            }
        }
        Ok(())
    }
}
