//! The device-resident controller's update on the CPU: the PI law of
//! `controller::PiController` in `f32`, on the state layout the kernels share.

use crate::controller::{ControllerConfig, DEVICE_STATE_LEN};
use crate::error::{Error, Result};

/// `state = [p, p_0, integral, last_error, step]`; `a_t` is the mean of `counts`.
pub fn controller_update(
    state: &mut [f32],
    counts: &[i32],
    config: &ControllerConfig,
) -> Result<()> {
    config.validate()?;
    if state.len() < DEVICE_STATE_LEN {
        return Err(Error::shape(
            "controller_update",
            format!(
                "state has {} values, expected {DEVICE_STATE_LEN}",
                state.len()
            ),
        ));
    }
    if counts.is_empty() {
        return Err(Error::shape("controller_update", "no expert counts"));
    }
    // Integer sum first (exact), then one conversion, as the kernels do.
    let total: u32 = counts.iter().map(|&k| k.max(0) as u32).sum();
    let active = total as f32 / counts.len() as f32;
    let (kp, ki) = (config.kp as f32, config.ki as f32);
    let (p_min, p_max) = (config.p_min as f32, config.p_max as f32);
    let error = (config.target as f32 - active) / config.num_experts as f32;
    let p0 = state[1];
    let integral = if ki > 0.0 {
        let low = ((p_min - p0) / ki).min(0.0);
        let high = ((p_max - p0) / ki).max(0.0);
        (state[2] + error).clamp(low, high)
    } else {
        0.0
    };
    state[0] = (p0 + kp * error + ki * integral).clamp(p_min, p_max);
    state[2] = integral;
    state[3] = error;
    state[4] += 1.0;
    Ok(())
}
