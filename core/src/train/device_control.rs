//! The PI controller(s) of a DTop-p run held on the model's device
//! (`--layout padded`): the thresholds the next step routes with never pass
//! through the host, and the host reads the state when it logs a step.
//!
//! The law is [`crate::cpu::controller_update`]'s, the `f32` form of
//! [`crate::controller::PiController`] that the routing kernels share, on a `[C, 5]`
//! state (one row `[p, p_0, integral, last_error, step]` per controller: one for the
//! global scope, one per MoE layer otherwise). It is an op of burn's backends
//! ([`ControllerBackend`]): burn tensor ops by default, dtopp's `controller.wgsl` on
//! burn-wgpu's buffers.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::controller::{ControllerConfig, ControllerState, DEVICE_STATE_LEN, ThresholdControl};
use crate::error::{Error, Result};

/// A backend with the PI law as an op.
pub trait ControllerBackend: Backend {
    /// `state` `[C, 5]` after one update from `k_sum` `[L]` (each layer's experts summed
    /// over `tokens` tokens): one controller (`C = 1`) takes `a_t` over all layers, else
    /// controller l takes layer l's.
    fn controllers_update(
        state: Tensor<Self, 2>,
        k_sum: Tensor<Self, 1, Int>,
        tokens: usize,
        config: &ControllerConfig,
    ) -> Tensor<Self, 2> {
        controllers_update_ops(state, k_sum, tokens, config)
    }
}

/// What each of `controllers` reads of `layers` per-layer sums over `tokens` tokens, for
/// the kernels that update one controller per workgroup: the sums it adds and the tokens
/// they cover. One controller reads every layer's sum; otherwise controller l reads
/// layer l's.
pub fn controller_reads(controllers: usize, layers: usize, tokens: usize) -> (usize, f32) {
    if controllers == 1 {
        (layers, (layers * tokens) as f32)
    } else {
        (1, tokens as f32)
    }
}

/// [`ControllerBackend::controllers_update`] in burn tensor ops: the default, and the
/// fallback of the backends with their own kernel.
pub fn controllers_update_ops<B: Backend>(
    state: Tensor<B, 2>,
    k_sum: Tensor<B, 1, Int>,
    tokens: usize,
    config: &ControllerConfig,
) -> Tensor<B, 2> {
    let [c, _] = state.dims();
    let layers = k_sum.dims()[0];
    let active = if c == 1 {
        k_sum.sum().float().div_scalar((layers * tokens) as f32)
    } else {
        k_sum.float().div_scalar(tokens as f32)
    }
    .reshape([c, 1]);
    let column = |i: usize| state.clone().slice([0..c, i..i + 1]);
    let (p0, integral, step) = (column(1), column(2), column(4));
    let (kp, ki) = (config.kp as f32, config.ki as f32);
    let (p_min, p_max) = (config.p_min as f32, config.p_max as f32);
    let error = active
        .neg()
        .add_scalar(config.target as f32)
        .div_scalar(config.num_experts as f32);
    let integral = if ki > 0.0 {
        // The integral stays where its own term alone leaves p within the clamp.
        let low = p0
            .clone()
            .neg()
            .add_scalar(p_min)
            .div_scalar(ki)
            .clamp_max(0.0);
        let high = p0
            .clone()
            .neg()
            .add_scalar(p_max)
            .div_scalar(ki)
            .clamp_min(0.0);
        (integral + error.clone()).max_pair(low).min_pair(high)
    } else {
        integral.zeros_like()
    };
    let p = (p0.clone() + error.clone().mul_scalar(kp) + integral.clone().mul_scalar(ki))
        .clamp(p_min, p_max);
    Tensor::cat(vec![p, p0, integral, error, step.add_scalar(1.0)], 1)
}

impl ControllerBackend for burn::backend::NdArray {}

/// Without dtopp's WGSL kernels in the build, burn-wgpu updates with the default.
#[cfg(not(feature = "wgpu"))]
impl ControllerBackend for burn::backend::Wgpu {}

/// The state carries no gradient: the update runs on the inner backend.
impl<I: ControllerBackend, C: CheckpointStrategy> ControllerBackend for Autodiff<I, C> {
    fn controllers_update(
        state: Tensor<Self, 2>,
        k_sum: Tensor<Self, 1, Int>,
        tokens: usize,
        config: &ControllerConfig,
    ) -> Tensor<Self, 2> {
        Tensor::from_inner(I::controllers_update(
            state.inner(),
            k_sum.inner(),
            tokens,
            config,
        ))
    }
}

/// The controller state on the device.
#[derive(Clone, Debug)]
pub struct DeviceControl<B: ControllerBackend> {
    config: ControllerConfig,
    layers: usize,
    /// `[C, 5]`: `[p, p_0, integral, last_error, step]` per controller.
    state: Tensor<B, 2>,
}

impl<B: ControllerBackend> DeviceControl<B> {
    /// Uploads the state of `control` (its first controller's settings: every controller
    /// of a run shares them).
    pub fn upload(control: &ThresholdControl, device: &B::Device) -> Self {
        let controllers = control.controllers();
        let rows: Vec<f32> = controllers
            .iter()
            .flat_map(|c| {
                let s = c.state();
                [
                    s.threshold as f32,
                    s.initial_threshold as f32,
                    s.integral as f32,
                    s.last_error as f32,
                    s.step as f32,
                ]
            })
            .collect();
        let state = Tensor::from_data(
            TensorData::new(rows, [controllers.len(), DEVICE_STATE_LEN]),
            device,
        );
        Self {
            config: controllers[0].config().clone(),
            layers: control.thresholds().len(),
            state,
        }
    }

    /// `[L]` the threshold of every MoE layer, for the next forward pass.
    pub fn thresholds(&self) -> Tensor<B, 1> {
        let c = self.state.dims()[0];
        let p = self.state.clone().slice([0..c, 0..1]).reshape([c]);
        if c == self.layers {
            p
        } else {
            p.expand([self.layers])
        }
    }

    /// One update from `k_sum` `[L]`, each layer's experts summed over the step's
    /// `tokens` tokens: `a_t` is their mean per token (over all layers for the global
    /// controller), from an integer sum converted once, as the kernels compute it.
    pub fn update(&mut self, k_sum: Tensor<B, 1, Int>, tokens: usize) {
        self.state = B::controllers_update(self.state.clone(), k_sum, tokens, &self.config);
    }

    /// The state flattened, `[C * 5]`, to read with other values in one read-back.
    pub fn flat_state(&self) -> Tensor<B, 1> {
        let c = self.state.dims()[0];
        self.state.clone().reshape([c * DEVICE_STATE_LEN])
    }

    /// Controllers held (1 for the global scope, else one per MoE layer).
    pub fn controllers(&self) -> usize {
        self.state.dims()[0]
    }

    /// The states a read-back of [`Self::flat_state`] holds, for the host's mirror.
    pub fn states_from(values: &[f32]) -> Result<Vec<ControllerState>> {
        if values.is_empty() || !values.len().is_multiple_of(DEVICE_STATE_LEN) {
            return Err(Error::shape(
                "device controller state",
                format!(
                    "{} values, expected a multiple of {DEVICE_STATE_LEN}",
                    values.len()
                ),
            ));
        }
        Ok(values
            .chunks_exact(DEVICE_STATE_LEN)
            .map(|s| ControllerState {
                threshold: f64::from(s[0]),
                initial_threshold: f64::from(s[1]),
                integral: f64::from(s[2]),
                last_error: f64::from(s[3]),
                step: s[4] as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::DeviceControl;
    use crate::controller::{
        ControllerConfig, DEVICE_STATE_LEN, ThresholdControl, ThresholdScope, device_state,
    };
    use crate::cpu::controller_update;
    use crate::rng::SplitMix64;

    type B = NdArray;

    /// Random per-layer expert sums, a step response and a saturating one: the device
    /// law equals the CPU reference bit for bit.
    #[test]
    fn the_device_controller_follows_the_f32_reference_exactly() {
        let (layers, experts, tokens) = (3usize, 7usize, 40usize);
        for scope in [ThresholdScope::Global, ThresholdScope::PerLayer] {
            for (target, ki) in [(2.0, 0.5), (6.5, 0.5), (1.0, 0.0), (3.0, 4.0)] {
                let mut config = ControllerConfig::new(target, experts);
                config.ki = ki;
                let starts: Vec<f64> = match scope {
                    ThresholdScope::Global => vec![0.6],
                    ThresholdScope::PerLayer => vec![0.6, 0.3, 0.9],
                };
                let control = ThresholdControl::new(&config, scope, layers, &starts).unwrap();
                let mut device = DeviceControl::<B>::upload(&control, &Default::default());
                let mut want: Vec<Vec<f32>> = starts
                    .iter()
                    .map(|&p| device_state(p as f32).to_vec())
                    .collect();
                let mut rng = SplitMix64::new(7);
                for _ in 0..25 {
                    // Per token and layer, 1..=E experts.
                    let counts: Vec<Vec<i32>> = (0..layers)
                        .map(|_| {
                            (0..tokens)
                                .map(|_| 1 + (rng.next_u64() % experts as u64) as i32)
                                .collect()
                        })
                        .collect();
                    let k_sum: Vec<i64> = counts
                        .iter()
                        .map(|c| c.iter().map(|&k| i64::from(k)).sum())
                        .collect();
                    device.update(
                        Tensor::<B, 1, Int>::from_data(
                            TensorData::new(k_sum, [layers]),
                            &Default::default(),
                        ),
                        tokens,
                    );
                    if want.len() == 1 {
                        controller_update(&mut want[0], &counts.concat(), &config).unwrap();
                    } else {
                        for (state, c) in want.iter_mut().zip(&counts) {
                            controller_update(state, c, &config).unwrap();
                        }
                    }
                    let got: Vec<f32> = device.flat_state().into_data().to_vec().unwrap();
                    assert_eq!(got, want.concat(), "{scope:?} T={target} Ki={ki}");
                }
                let states = DeviceControl::<B>::states_from(&want.concat()).expect("whole states");
                assert_eq!(states.len(), device.controllers());
                assert_eq!(states[0].step, 25);
                let p: Vec<f32> = device.thresholds().into_data().to_vec().unwrap();
                assert_eq!(p.len(), layers);
                assert_eq!(p[0], want[0][0]);
            }
        }
        assert!(DeviceControl::<B>::states_from(&[0.5; DEVICE_STATE_LEN + 1]).is_err());
    }
}
