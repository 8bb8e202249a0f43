//! The threshold controller of DTop-p: a PI loop that moves the Top-p threshold so the
//! mean number of activated experts tracks a target.

mod calibrate;
mod pi;
mod scope;

pub use calibrate::calibrate_threshold;
pub use pi::{
    ControllerConfig, ControllerState, DEFAULT_KI, DEFAULT_KP, DEFAULT_P_MAX, DEFAULT_P_MIN,
    PiController,
};
pub use scope::{ThresholdControl, ThresholdScope};

/// Length of a device-resident controller state: `[p, p_0, integral, last_error, step]`.
pub const DEVICE_STATE_LEN: usize = 5;

/// The initial device-resident controller state for `p_0`: `[p_0, p_0, 0, 0, 0]`.
pub fn device_state(initial_threshold: f32) -> [f32; DEVICE_STATE_LEN] {
    [initial_threshold, initial_threshold, 0.0, 0.0, 0.0]
}
