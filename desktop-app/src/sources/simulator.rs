//! The simulator: the controller on synthetic router logits, as `dtopp simulate`, with
//! fixed Top-p and Top-k stepped beside it on the same logits. Routing runs on the CPU
//! reference; a step at the default size takes about a millisecond, so the app steps it
//! between frames at a set rate.

use std::time::Instant;

use dtopp::controller::{ControllerConfig, ThresholdScope};
use dtopp::cpu::CpuReference;
use dtopp::ops::Normalization;
use dtopp::sim::{SimConfig, SimMode, Simulation, StreamConfig};
use serde::{Deserialize, Serialize};

use crate::run_data::RunData;

static CPU: CpuReference = CpuReference;

/// The simulator's settings (persisted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimSettings {
    /// `E`.
    pub experts: usize,
    /// MoE layers.
    pub layers: usize,
    /// Tokens per step and layer.
    pub tokens: usize,
    /// `T`.
    pub target: f64,
    /// Proportional gain.
    pub kp: f64,
    /// Integral gain.
    pub ki: f64,
    /// Lower clamp of `p`.
    pub p_min: f64,
    /// Upper clamp of `p`.
    pub p_max: f64,
    /// Margin of preferred experts (how peaked routing is).
    pub margin: f64,
    /// Relative growth of the margin over `horizon` steps (routers sharpening).
    pub drift: f64,
    /// Steps over which `drift` is reached.
    pub horizon: u64,
    /// Steps per second while running.
    pub steps_per_second: f64,
    /// Seed of the logit stream.
    pub seed: u64,
}

impl Default for SimSettings {
    fn default() -> Self {
        let c = ControllerConfig::new(8.0, 64);
        Self {
            experts: 64,
            layers: 4,
            tokens: 512,
            target: 8.0,
            kp: c.kp,
            ki: c.ki,
            p_min: c.p_min,
            p_max: c.p_max,
            margin: 3.0,
            drift: 1.0,
            horizon: 1000,
            steps_per_second: 60.0,
            seed: 0,
        }
    }
}

impl SimSettings {
    fn config(&self, mode: SimMode) -> SimConfig {
        let target = sim_target(self.target, mode);
        SimConfig {
            stream: StreamConfig {
                layers: self.layers,
                tokens: self.tokens,
                experts: self.experts,
                seed: self.seed,
                margin: self.margin,
                drift: self.drift,
                horizon: self.horizon,
                shock: None,
            },
            mode,
            steps: u64::MAX,
            controller: ControllerConfig {
                target,
                num_experts: self.experts,
                kp: self.kp,
                ki: self.ki,
                p_min: self.p_min,
                p_max: self.p_max,
            },
            scope: ThresholdScope::Global,
            threshold: None,
            normalization: Normalization::Drn { theta: 1.0 },
            k_max: None,
            target_change: None,
        }
    }
}

const MODES: [SimMode; 3] = [SimMode::Dtopp, SimMode::Topp, SimMode::Topk];

/// Three simulations (DTop-p, fixed Top-p, Top-k) on one logit stream.
#[derive(Debug)]
pub struct SimSource {
    settings: SimSettings,
    simulations: Vec<Simulation<'static, CpuReference>>,
    /// One run per mode, DTop-p first.
    pub runs: Vec<RunData>,
    /// Whether steps advance on their own.
    pub running: bool,
    last_advance: Option<Instant>,
    owed: f64,
}

impl SimSource {
    /// Fresh simulations of `settings`.
    pub fn new(settings: &SimSettings) -> Result<Self, String> {
        let simulations = MODES
            .iter()
            .map(|&m| Simulation::new(&CPU, &settings.config(m)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings: settings.clone(),
            simulations,
            runs: MODES
                .iter()
                .map(|m| {
                    let mut run = RunData::new(m.name());
                    run.mode = m.name().to_string();
                    run
                })
                .collect(),
            running: true,
            last_advance: None,
            owed: 0.0,
        })
    }

    /// The settings the simulations run with.
    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    /// Applies changed settings: target, gains, clamps and the stream's drift act from
    /// the next step; a new shape or seed starts over.
    pub fn apply(&mut self, new: &SimSettings) -> Result<(), String> {
        let old = &self.settings;
        let restart = (old.experts, old.layers, old.tokens, old.seed)
            != (new.experts, new.layers, new.tokens, new.seed);
        if restart {
            let running = self.running;
            *self = Self::new(new)?;
            self.running = running;
            return Ok(());
        }
        for (sim, mode) in self.simulations.iter_mut().zip(MODES) {
            let target = sim_target(new.target, mode);
            if target != sim.target() {
                sim.set_target(target).map_err(|e| e.to_string())?;
            }
            sim.set_controller(new.kp, new.ki, new.p_min, new.p_max)
                .map_err(|e| e.to_string())?;
            sim.set_stream(new.margin, new.drift, new.horizon)
                .map_err(|e| e.to_string())?;
        }
        self.settings = new.clone();
        Ok(())
    }

    /// One step of every simulation.
    pub fn step(&mut self) -> Result<(), String> {
        for (sim, run) in self.simulations.iter_mut().zip(&mut self.runs) {
            let record = sim.step().map_err(|e| e.to_string())?;
            run.push_simulation(&record);
        }
        Ok(())
    }

    /// Steps owed at the set rate since the last call (at most a few per frame, so a
    /// slow frame never stalls the UI); returns how many ran.
    pub fn advance(&mut self) -> Result<usize, String> {
        let now = Instant::now();
        let elapsed = self
            .last_advance
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last_advance = Some(now);
        if !self.running {
            self.owed = 0.0;
            return Ok(0);
        }
        self.owed = (self.owed + elapsed * self.settings.steps_per_second).min(8.0);
        let mut done = 0;
        while self.owed >= 1.0 {
            self.step()?;
            self.owed -= 1.0;
            done += 1;
        }
        Ok(done)
    }
}

fn sim_target(target: f64, mode: SimMode) -> f64 {
    if mode == SimMode::Topk {
        target.round().max(1.0)
    } else {
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtopp_tracks_a_changed_target_while_topk_follows_exactly() {
        let mut sim = SimSource::new(&SimSettings {
            tokens: 256,
            ..SimSettings::default()
        })
        .unwrap();
        for _ in 0..150 {
            sim.step().unwrap();
        }
        let mut settings = sim.settings().clone();
        settings.target = 4.0;
        sim.apply(&settings).unwrap();
        for _ in 0..150 {
            sim.step().unwrap();
        }
        let last = |run: &RunData| {
            let tail = &run.steps[run.steps.len() - 20..];
            tail.iter().map(|s| s.active).sum::<f64>() / tail.len() as f64
        };
        assert!(
            (last(&sim.runs[0]) - 4.0).abs() < 0.2,
            "{}",
            last(&sim.runs[0])
        );
        assert_eq!(last(&sim.runs[2]), 4.0);
        // Fixed Top-p ignores the target: still near the first one's operating point.
        assert!(last(&sim.runs[1]) > 5.0, "{}", last(&sim.runs[1]));
    }
}
