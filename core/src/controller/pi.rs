//! The PI controller on the Top-p threshold (DESIGN.md section 1):
//!
//!   e_t = (T - a_t) / E
//!   I_t = I_{t-1} + e_t          (frozen while clamped, see below)
//!   p_{t+1} = clamp(p_0 + Kp e_t + Ki I_t, p_min, p_max)
//!
//! Raising p recruits more experts, so a positive error (too few experts) raises p.
//! No gradient ever reaches p: this is plain scalar code run once per optimizer step.
//!
//! Anti-windup by integrator clamping: the integral is kept where its own term alone
//! leaves p inside the clamp, `p_min <= p_0 + Ki I <= p_max`. While p rails at a bound
//! because the target is out of reach, the integral therefore stops growing at that
//! bound instead of winding up. The plain rule "freeze I whenever p is clamped" was
//! measured to fail here: when a large error saturates p through the P term alone (a
//! jump from 2 to 64 active experts), freezing left the integral wound up and p cycled
//! between the bounds forever; clamping the integral recovers in a few steps.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default proportional gain, chosen from measured step responses (docs/controller-gains.md).
pub const DEFAULT_KP: f64 = 0.25;
/// Default integral gain, chosen from measured step responses (docs/controller-gains.md).
pub const DEFAULT_KI: f64 = 0.5;
/// Default lower clamp of the threshold.
pub const DEFAULT_P_MIN: f64 = 0.01;
/// Default upper clamp of the threshold.
pub const DEFAULT_P_MAX: f64 = 1.0;

/// Settings of one PI controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// `T`, the target mean number of activated experts per token, in `[1, E]`.
    pub target: f64,
    /// `E`, experts per MoE layer.
    pub num_experts: usize,
    /// Proportional gain `Kp` (finite, `>= 0`).
    pub kp: f64,
    /// Integral gain `Ki` (finite, `>= 0`).
    pub ki: f64,
    /// Lower clamp `p_min`, `0 < p_min <= p_max`.
    pub p_min: f64,
    /// Upper clamp `p_max`, `p_max <= 1`.
    pub p_max: f64,
}

impl ControllerConfig {
    /// The defaults for target `T` with `E` experts.
    pub fn new(target: f64, num_experts: usize) -> Self {
        Self {
            target,
            num_experts,
            kp: DEFAULT_KP,
            ki: DEFAULT_KI,
            p_min: DEFAULT_P_MIN,
            p_max: DEFAULT_P_MAX,
        }
    }

    /// Checks every field; the error names the field and its valid range.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(Error::param("experts E", 0, "at least 1"));
        }
        let e = self.num_experts as f64;
        if !self.target.is_finite() || self.target < 1.0 {
            return Err(Error::param(
                "target T",
                self.target,
                "at least 1 (every token activates at least one expert)",
            ));
        }
        if self.target > e {
            return Err(Error::param(
                "target T",
                self.target,
                format!("at most E = {} (the number of experts)", self.num_experts),
            ));
        }
        for (name, gain) in [("Kp", self.kp), ("Ki", self.ki)] {
            if !gain.is_finite() || gain < 0.0 {
                return Err(Error::param(name, gain, "a finite gain >= 0"));
            }
        }
        if !(self.p_min.is_finite() && self.p_min > 0.0 && self.p_min <= 1.0) {
            return Err(Error::param("p_min", self.p_min, "a value in (0, 1]"));
        }
        if !(self.p_max.is_finite() && self.p_max >= self.p_min && self.p_max <= 1.0) {
            return Err(Error::param(
                "p_max",
                self.p_max,
                format!("a value in [p_min = {}, 1]", self.p_min),
            ));
        }
        Ok(())
    }
}

/// Everything the controller remembers; part of every checkpoint. Restoring it continues
/// the run exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControllerState {
    /// `p_0`, the operating point the P and I terms move around.
    pub initial_threshold: f64,
    /// `p_t`, the threshold to route the next step with.
    pub threshold: f64,
    /// `I_t`, the integral of the normalised error.
    pub integral: f64,
    /// `e_t` of the last update (0 before the first).
    pub last_error: f64,
    /// `t`, the number of updates so far.
    pub step: u64,
}

/// One PI controller: one threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct PiController {
    config: ControllerConfig,
    state: ControllerState,
}

impl PiController {
    /// A controller starting at `p_0 = initial_threshold` (clamped to `[p_min, p_max]`).
    pub fn new(config: ControllerConfig, initial_threshold: f64) -> Result<Self> {
        config.validate()?;
        check_probability("initial threshold p_0", initial_threshold)?;
        let threshold = initial_threshold.clamp(config.p_min, config.p_max);
        Ok(Self {
            config,
            state: ControllerState {
                initial_threshold,
                threshold,
                integral: 0.0,
                last_error: 0.0,
                step: 0,
            },
        })
    }

    /// Restores a controller from saved state (for resume); checks both.
    pub fn from_state(config: ControllerConfig, state: ControllerState) -> Result<Self> {
        config.validate()?;
        check_probability("saved initial threshold", state.initial_threshold)?;
        check_probability("saved threshold", state.threshold)?;
        if !state.integral.is_finite() {
            return Err(Error::param(
                "saved integral",
                state.integral,
                "a finite value",
            ));
        }
        Ok(Self { config, state })
    }

    /// The threshold `p_t` to route with now.
    pub fn threshold(&self) -> f64 {
        self.state.threshold
    }

    /// The saved state.
    pub fn state(&self) -> &ControllerState {
        &self.state
    }

    /// The settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Changes the target `T` while running (the integral is kept, so the change is bumpless).
    pub fn set_target(&mut self, target: f64) -> Result<()> {
        let config = ControllerConfig {
            target,
            ..self.config.clone()
        };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Changes the gains while running.
    pub fn set_gains(&mut self, kp: f64, ki: f64) -> Result<()> {
        let config = ControllerConfig {
            kp,
            ki,
            ..self.config.clone()
        };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Changes gains and clamps while running (the target is kept); a threshold outside
    /// the new clamps is moved into them.
    pub fn set_controller(&mut self, config: &ControllerConfig) -> Result<()> {
        let config = ControllerConfig {
            target: self.config.target,
            num_experts: self.config.num_experts,
            ..config.clone()
        };
        config.validate()?;
        self.state.threshold = self.state.threshold.clamp(config.p_min, config.p_max);
        self.config = config;
        Ok(())
    }

    /// One update after an optimizer step with measured mean activated experts `a_t`;
    /// returns `p_{t+1}`.
    pub fn update(&mut self, active_experts: f64) -> Result<f64> {
        if !active_experts.is_finite() || active_experts < 0.0 {
            return Err(Error::param(
                "active experts a_t",
                active_experts,
                "a finite mean count >= 0",
            ));
        }
        let c = &self.config;
        let s = &mut self.state;
        let error = (c.target - active_experts) / c.num_experts as f64;
        s.integral = if c.ki > 0.0 {
            let low = (c.p_min - s.initial_threshold) / c.ki;
            let high = (c.p_max - s.initial_threshold) / c.ki;
            (s.integral + error).clamp(low.min(0.0), high.max(0.0))
        } else {
            // Without an I term there is nothing to accumulate (and nothing to wind up
            // if Ki is raised later).
            0.0
        };
        let raw = s.initial_threshold + c.kp * error + c.ki * s.integral;
        s.threshold = raw.clamp(c.p_min, c.p_max);
        s.last_error = error;
        s.step += 1;
        Ok(s.threshold)
    }
}

fn check_probability(name: &'static str, p: f64) -> Result<()> {
    if p.is_finite() && p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(Error::param(name, p, "a value in (0, 1]"))
    }
}
