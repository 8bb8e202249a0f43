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
