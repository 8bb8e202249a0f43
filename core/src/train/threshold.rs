//! The threshold side of a run: Top-k's fixed count, a fixed Top-p threshold, or the PI
//! controller(s) moving it once per optimizer step.

use super::checkpoint::PolicyState;
use super::config::TrainConfig;
use super::mode::RoutingMode;
use crate::controller::{ControllerState, ThresholdControl, ThresholdScope};
use crate::error::{Error, Result};
use crate::model::Selector;

/// How the next step's selectors are chosen.
#[derive(Debug)]
pub enum ThresholdPolicy {
    /// Top-k with this `k`.
    TopK(usize),
    /// Top-p at fixed thresholds, one per MoE layer.
    Fixed(Vec<f64>),
    /// Top-p with thresholds moved by the controller(s).
    Controlled(ThresholdControl),
}

impl ThresholdPolicy {
    /// The policy of `config`'s mode, starting from the calibrated (or configured)
    /// per-layer thresholds `initial` (global scope: all equal).
    pub fn new(config: &TrainConfig, layers: usize, initial: &[f64]) -> Result<Self> {
        let r = &config.routing;
        Ok(match r.mode {
            RoutingMode::Topk => ThresholdPolicy::TopK(r.target as usize),
            RoutingMode::Topp | RoutingMode::DrnOnly => ThresholdPolicy::Fixed(initial.to_vec()),
            RoutingMode::Dtopp | RoutingMode::DtoppNoDrn => {
                let starts = match r.scope {
                    ThresholdScope::Global => vec![initial[0]],
                    ThresholdScope::PerLayer => initial.to_vec(),
                };
                ThresholdPolicy::Controlled(ThresholdControl::new(
                    &config.controller(),
                    r.scope,
                    layers,
                    &starts,
                )?)
            }
        })
    }

    /// The state a checkpoint keeps.
    pub fn state(&self) -> PolicyState {
        match self {
            ThresholdPolicy::TopK(k) => PolicyState::TopK(*k),
            ThresholdPolicy::Fixed(p) => PolicyState::Fixed(p.clone()),
            ThresholdPolicy::Controlled(control) => PolicyState::Controlled(control.states()),
        }
    }

    /// The policy a checkpoint saved, under `config`'s controller settings.
    pub fn from_state(config: &TrainConfig, layers: usize, state: PolicyState) -> Result<Self> {
        Ok(match state {
            PolicyState::TopK(k) => ThresholdPolicy::TopK(k),
            PolicyState::Fixed(p) => ThresholdPolicy::Fixed(p),
            PolicyState::Controlled(states) => ThresholdPolicy::Controlled(
                ThresholdControl::from_states(&config.controller(), layers, states)?,
            ),
        })
    }

    /// The thresholds of the next step, one per layer (`None` for Top-k).
    pub fn thresholds(&self) -> Option<Vec<f64>> {
        match self {
            ThresholdPolicy::TopK(_) => None,
            ThresholdPolicy::Fixed(p) => Some(p.clone()),
            ThresholdPolicy::Controlled(control) => Some(control.thresholds()),
        }
    }

    /// The selectors of the next step, one per MoE layer.
    pub fn selectors(&self, layers: usize, k_max: Option<usize>) -> Vec<Selector> {
        match self {
            ThresholdPolicy::TopK(k) => vec![Selector::TopK(*k); layers],
            _ => self
                .thresholds()
                .unwrap_or_default()
                .into_iter()
                .map(|p| Selector::TopP {
                    threshold: p as f32,
                    k_max,
                })
                .collect(),
        }
    }

    /// The controller's integral after the last update (mean over controllers).
    pub fn integral(&self) -> Option<f64> {
        match self {
            ThresholdPolicy::Controlled(control) => {
                let c = control.controllers();
                Some(c.iter().map(|c| c.state().integral).sum::<f64>() / c.len() as f64)
            }
            _ => None,
        }
    }

    /// The controller(s), for a policy that has them.
    pub fn control(&self) -> Option<&ThresholdControl> {
        match self {
            ThresholdPolicy::Controlled(control) => Some(control),
            _ => None,
        }
    }

    /// Takes the controllers' states from their copy on the device
    /// ([`super::DeviceControl`]), which made the updates.
    pub fn set_states(&mut self, states: Vec<ControllerState>) -> Result<()> {
        match self {
            ThresholdPolicy::Controlled(control) => control.set_states(states),
            _ => Err(Error::param(
                "controller states",
                states.len(),
                "none: this routing mode has no controller",
            )),
        }
    }

    /// One controller update from each layer's `a_t` (nothing to do without one).
    pub fn update(&mut self, active_per_layer: &[f64]) -> Result<()> {
        match self {
            ThresholdPolicy::Controlled(control) => control.update(active_per_layer),
            _ => Ok(()),
        }
    }
}
