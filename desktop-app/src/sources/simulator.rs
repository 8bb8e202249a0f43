//! The simulator: the controller on synthetic router logits, as `dtopp simulate`, with
//! fixed Top-p and Top-k stepped beside it on the same logits. Each step's logits are
//! generated and normalised once and selected three times (one rule per mode), on the
//! CPU reference or on the WGSL kernels (WebGPU in the browser). GPU results are read
//! back asynchronously: a step is launched, and finished on a later frame once its
//! counts have arrived (on native the read-back completes at once).

use std::cell::RefCell;
use std::rc::Rc;

use dtopp::backends::{DeviceArray, WgpuOps};
use dtopp::controller::{ControllerConfig, ThresholdScope};
use dtopp::cpu::CpuReference;
use dtopp::ops::{Normalization, RoutingOps};
use dtopp::sim::{ClosedLoop, SimConfig, SimMode, StreamConfig, launch_selection, mean_count};
use serde::{Deserialize, Serialize};
use web_time::Instant;

use crate::run_data::RunData;

static CPU: CpuReference = CpuReference;

/// Where the simulator routes.
#[derive(Clone, Debug)]
pub enum SimCompute {
    /// The CPU reference.
    Cpu,
    /// The WGSL kernels on a GPU (WebGPU in the browser).
    Gpu(Rc<WgpuOps>),
}

impl SimCompute {
    /// `cpu` or `gpu`.
    pub fn kind(&self) -> &'static str {
        match self {
            SimCompute::Cpu => "cpu",
            SimCompute::Gpu(_) => "gpu",
        }
    }
}

type CountsSlot = Rc<RefCell<Option<Result<Vec<Vec<i32>>, String>>>>;

/// A step whose GPU counts are on their way back.
#[derive(Debug)]
struct InFlight {
    counts: CountsSlot,
    backend: &'static str,
}

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
    /// Scale of the noise on every logit (how spread routing is).
    pub noise: f64,
    /// Relative growth of the margin over `horizon` steps (routers sharpening).
    pub drift: f64,
    /// Steps over which `drift` is reached.
    pub horizon: u64,
    /// Steps per second while running.
    pub steps_per_second: f64,
    /// Seed of the logit stream.
    pub seed: u64,
    /// Route on the GPU (WGSL kernels) when one is available.
    pub gpu: bool,
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
            noise: 1.0,
            drift: 1.0,
            horizon: 1000,
            steps_per_second: 60.0,
            seed: 0,
            gpu: false,
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
                noise: self.noise,
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
    loops: Vec<ClosedLoop>,
    /// One run per mode, DTop-p first.
    pub runs: Vec<RunData>,
    /// Whether steps advance on their own.
    pub running: bool,
    last_advance: Option<Instant>,
    owed: f64,
    compute: SimCompute,
    in_flight: Option<InFlight>,
    /// `cpu` or `gpu`: what routed the last finished step.
    pub last_backend: Option<&'static str>,
}

impl SimSource {
    /// Fresh simulations of `settings`, routed on `compute`.
    pub fn new(settings: &SimSettings, compute: SimCompute) -> Result<Self, String> {
        let loops = MODES
            .iter()
            .map(|&m| ClosedLoop::new(&settings.config(m)).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings: settings.clone(),
            loops,
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
            compute,
            in_flight: None,
            last_backend: None,
        })
    }

    /// The settings the simulations run with.
    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    /// Where the next step routes.
    pub fn compute(&self) -> &SimCompute {
        &self.compute
    }

    /// Routes the next steps on `compute` (a step in flight still finishes).
    pub fn set_compute(&mut self, compute: SimCompute) {
        self.compute = compute;
    }

    /// Whether a step waits for its GPU counts.
    pub fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Applies changed settings: target, gains, clamps and the stream's drift act from
    /// the next step; a new shape or seed starts over.
    pub fn apply(&mut self, new: &SimSettings) -> Result<(), String> {
        let old = &self.settings;
        let restart = (old.experts, old.layers, old.tokens, old.seed)
            != (new.experts, new.layers, new.tokens, new.seed);
        if restart {
            let running = self.running;
            *self = Self::new(new, self.compute.clone())?;
            self.running = running;
            return Ok(());
        }
        for (sim, mode) in self.loops.iter_mut().zip(MODES) {
            let target = sim_target(new.target, mode);
            if target != sim.target() {
                sim.set_target(target).map_err(|e| e.to_string())?;
            }
            sim.set_controller(new.kp, new.ki, new.p_min, new.p_max)
                .map_err(|e| e.to_string())?;
            sim.set_stream(new.margin, new.noise, new.drift, new.horizon)
                .map_err(|e| e.to_string())?;
        }
        self.settings = new.clone();
        Ok(())
    }

    /// One step of every simulation (or, with a GPU step in flight, its completion when
    /// its counts are back); returns how many steps finished.
    pub fn step(&mut self) -> Result<usize, String> {
        if self.in_flight.is_some() {
            return self.collect();
        }
        self.launch()?;
        self.collect()
    }

    /// Starts the next step: logits and normalisation once, one selection per mode.
    fn launch(&mut self) -> Result<(), String> {
        let err = |e: dtopp::Error| e.to_string();
        let (shape, normalization, k_max) = self.loops[0].routing();
        // Every mode steps in lockstep on the same stream: one set of logits serves all.
        let logits: Vec<Vec<f32>> = (0..self.settings.layers)
            .map(|layer| self.loops[0].logits(layer))
            .collect();
        let cpu_probs = || {
            logits
                .iter()
                .map(|z| CPU.drn_forward(z, shape, normalization))
                .collect::<dtopp::Result<Vec<_>>>()
        };
        if self.loops.iter().any(ClosedLoop::needs_calibration) {
            // p_0 is an initial guess, calibrated on the CPU whatever routes the steps.
            let probs = cpu_probs().map_err(err)?;
            for l in self.loops.iter_mut().filter(|l| l.needs_calibration()) {
                l.calibrate(&probs).map_err(err)?;
            }
        }
        let rules = self
            .loops
            .iter_mut()
            .map(ClosedLoop::begin)
            .collect::<dtopp::Result<Vec<_>>>()
            .map_err(err)?;
        let slot: CountsSlot = Rc::default();
        match &self.compute {
            SimCompute::Cpu => {
                let probs = cpu_probs().map_err(err)?;
                let mut counts = Vec::new();
                for rule in &rules {
                    counts.extend(launch_selection(&CPU, shape, &probs, rule, k_max).map_err(err)?);
                }
                *slot.borrow_mut() = Some(Ok(counts));
            }
            SimCompute::Gpu(ops) => {
                let probs = logits
                    .iter()
                    .map(|z| ops.drn_forward(&ops.upload_floats(z)?, shape, normalization))
                    .collect::<dtopp::Result<Vec<_>>>()
                    .map_err(err)?;
                let mut arrays: Vec<DeviceArray> = Vec::new();
                for rule in &rules {
                    arrays
                        .extend(launch_selection(&**ops, shape, &probs, rule, k_max).map_err(err)?);
                }
                let (ops, filled) = (ops.clone(), slot.clone());
                crate::spawn::spawn_local(async move {
                    let refs: Vec<&DeviceArray> = arrays.iter().collect();
                    let counts = ops.read_ints_async(&refs).await.map_err(err);
                    *filled.borrow_mut() = Some(counts);
                });
            }
        }
        self.in_flight = Some(InFlight {
            counts: slot,
            backend: self.compute.kind(),
        });
        Ok(())
    }

    /// Finishes the step in flight if its counts are back; returns 1 if it did.
    fn collect(&mut self) -> Result<usize, String> {
        let Some(flight) = &self.in_flight else {
            return Ok(0);
        };
        let Some(result) = flight.counts.borrow_mut().take() else {
            return Ok(0);
        };
        let backend = flight.backend;
        self.in_flight = None;
        let counts = result?;
        let layers = self.settings.layers;
        for ((l, run), chunk) in self
            .loops
            .iter_mut()
            .zip(&mut self.runs)
            .zip(counts.chunks(layers))
        {
            let per_layer = chunk.iter().map(|c| mean_count(c)).collect();
            let record = l.finish(per_layer).map_err(|e| e.to_string())?;
            run.push_simulation(&record);
        }
        self.last_backend = Some(backend);
        Ok(1)
    }

    /// Steps owed at the set rate since the last call (at most a few per frame, so a
    /// slow frame never stalls the UI; one GPU step in flight at a time); returns how
    /// many finished.
    pub fn advance(&mut self) -> Result<usize, String> {
        let mut done = self.collect()?;
        let now = Instant::now();
        let elapsed = self
            .last_advance
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        self.last_advance = Some(now);
        if !self.running {
            self.owed = 0.0;
            return Ok(done);
        }
        self.owed = (self.owed + elapsed * self.settings.steps_per_second).min(8.0);
        while self.owed >= 1.0 && self.in_flight.is_none() {
            self.launch()?;
            self.owed -= 1.0;
            done += self.collect()?;
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
        let mut sim = SimSource::new(
            &SimSettings {
                tokens: 256,
                ..SimSettings::default()
            },
            SimCompute::Cpu,
        )
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
