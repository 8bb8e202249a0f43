//! Live: a small model trained in a background thread (never on the UI thread), with
//! start / pause / single step / reset, and the target, gains and routing mode changed
//! between steps. The worker sends every step's metrics and routing samples back.

use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;

use dtopp::metrics::{RoutingSample, StepMetrics};
use dtopp::model::ExpertLayout;
use dtopp::train::{Preset, RoutingMode, TrainConfig, TrainSession};
use serde::{Deserialize, Serialize};

use crate::run_data::RunData;

/// Where the model trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveBackend {
    /// burn's ndarray backend and the CPU routing reference.
    Cpu,
    /// burn's wgpu backend and the dtopp WGSL routing kernels on its buffers.
    Wgpu,
}

impl LiveBackend {
    /// For the UI.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "CPU (ndarray + CPU reference)",
            Self::Wgpu => "GPU (burn wgpu + WGSL kernels)",
        }
    }
}

/// The live run's settings (persisted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LiveSettings {
    /// Routing mode.
    pub mode: RoutingMode,
    /// `T`.
    pub target: f64,
    /// Proportional gain.
    pub kp: f64,
    /// Integral gain.
    pub ki: f64,
    /// Steps of the learning-rate schedule (training stops there).
    pub steps: u64,
    /// Seed of weights and data.
    pub seed: u64,
    /// Backend.
    pub backend: LiveBackend,
}

impl Default for LiveSettings {
    fn default() -> Self {
        let config = Preset::Tiny.config();
        Self {
            mode: RoutingMode::Dtopp,
            target: config.routing.target,
            kp: config.routing.kp,
            ki: config.routing.ki,
            steps: 1000,
            seed: 0,
            backend: LiveBackend::Cpu,
        }
    }
}

impl LiveSettings {
    /// The `tiny` preset with these settings; every step samples the routing.
    pub fn config(&self) -> TrainConfig {
        let mut c = Preset::Tiny.config();
        c.routing.mode = self.mode;
        c.routing.target = self.target;
        c.routing.kp = self.kp;
        c.routing.ki = self.ki;
        c.run.steps = self.steps;
        c.run.seed = self.seed;
        c.run.sample_every = 5;
        c.run.eval_every = 25;
        c
    }
}

/// What the UI asks of the worker.
#[derive(Clone, Debug)]
pub enum Command {
    /// Train continuously.
    Run,
    /// Stop after the current step.
    Pause,
    /// Train one step, then pause.
    Step,
    /// Change `T` from the next step on.
    SetTarget(f64),
    /// Change the controller's gains.
    SetGains(f64, f64),
    /// Change the routing mode from the next step on.
    SetMode(RoutingMode),
}

/// What the worker reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// The model is built; lines describing it.
    Ready(Vec<String>),
    /// One step's metrics.
    Step(Box<StepMetrics>),
    /// A routing sample.
    Sample(Box<RoutingSample>),
    /// A setting was refused or training failed; the message says why.
    Error(String),
    /// `steps` reached; training stopped.
    Finished,
}

/// The background training thread and its channels.
#[derive(Debug)]
pub struct LiveSource {
    commands: Sender<Command>,
    events: Receiver<Event>,
    worker: Option<JoinHandle<()>>,
    /// The run as trained so far.
    pub run: RunData,
    /// Whether the worker is training continuously.
    pub running: bool,
    /// The worker's description of the model, once built.
    pub description: Vec<String>,
    /// Errors reported by the worker, newest last.
    pub problems: Vec<String>,
    /// Whether the run reached its last step.
    pub finished: bool,
}

impl LiveSource {
    /// Starts a worker that builds the model of `settings` and waits for commands.
    pub fn start(settings: &LiveSettings) -> Self {
        let (commands, command_rx) = channel();
        let (event_tx, events) = channel();
        let config = settings.config();
        let backend = settings.backend;
        let worker = std::thread::Builder::new()
            .name("dtopp-live-training".into())
            .spawn(move || worker(config, backend, command_rx, event_tx))
            .expect("spawning the training thread");
        Self {
            commands,
            events,
            worker: Some(worker),
            run: RunData::new(format!("live {}", settings.mode.name())),
            running: false,
            description: Vec::new(),
            problems: Vec::new(),
            finished: false,
        }
    }

    /// Sends a command (a worker that stopped has reported why already).
    pub fn send(&mut self, command: Command) {
        match command {
            Command::Run => self.running = true,
            Command::Pause | Command::Step => self.running = false,
            _ => {}
        }
        if self.commands.send(command).is_err() && self.problems.is_empty() {
            self.problems
                .push("the training thread has stopped; press Reset".into());
        }
    }

    /// Takes what the worker reported since the last call; returns whether anything
    /// arrived.
    pub fn drain(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    changed = true;
                    match event {
                        Event::Ready(lines) => self.description = lines,
                        Event::Step(m) => self.run.push_training(&m),
                        Event::Sample(s) => self.run.samples.push(*s),
                        Event::Error(e) => {
                            self.problems.push(e);
                            self.running = false;
                        }
                        Event::Finished => {
                            self.finished = true;
                            self.running = false;
                        }
                    }
                }
                Err(TryRecvError::Empty) => return changed,
                Err(TryRecvError::Disconnected) => {
                    if self.worker.as_ref().is_some_and(|w| w.is_finished()) {
                        if let Some(Err(panic)) = self.worker.take().map(JoinHandle::join) {
                            let message = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            self.problems
                                .push(format!("the training thread crashed: {message}"));
                        }
                        self.running = false;
                    }
                    return changed;
                }
            }
        }
    }
}

impl Drop for LiveSource {
    fn drop(&mut self) {
        // Dropping the sender ends the worker after its current step; it is not joined,
        // so closing the window never waits for a step to finish.
        let (dead, _) = channel();
        self.commands = dead;
    }
}

fn worker(
    config: TrainConfig,
    backend: LiveBackend,
    commands: Receiver<Command>,
    events: Sender<Event>,
) {
    let result = match backend {
        LiveBackend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            train_loop::<Autodiff<NdArray>>(
                &config,
                &Default::default(),
                "ndarray (CPU)",
                &commands,
                &events,
            )
        }
        LiveBackend::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            use burn::backend::{Autodiff, Wgpu};
            // burn's device set up so that dtopp's WGSL kernels route on its own buffers.
            let device = WgpuDevice::DefaultDevice;
            match dtopp::model::wgpu_routing::setup(&device) {
                Ok(_) => train_loop::<Autodiff<Wgpu>>(&config, &device, "wgpu", &commands, &events),
                Err(e) => Err(format!(
                    "no GPU for live training ({e}); choose the CPU backend"
                )),
            }
        }
    };
    if let Err(e) = result {
        let _ = events.send(Event::Error(e));
    }
}

fn train_loop<B: dtopp::model::TrainingBackend>(
    config: &TrainConfig,
    device: &B::Device,
    backend_name: &str,
    commands: &Receiver<Command>,
    events: &Sender<Event>,
) -> Result<(), String> {
    // The backend's preferred layout: exact on the CPU, padded on a GPU.
    let layout = ExpertLayout::preferred_on::<B>();
    let mut session = TrainSession::<B>::new(config, device, layout).map_err(|e| e.to_string())?;
    let sample = session.routing_sample().map_err(|e| e.to_string())?;
    let ready = vec![
        format!(
            "tiny model: {} parameters, {} MoE layers x {} experts",
            config.model.parameters(),
            session.moe_layers(),
            config.model.experts
        ),
        format!(
            "training: burn {backend_name}; routing: {}",
            layout.describe_on::<B>(session.device())
        ),
        format!("data: {}", session.corpus().describe()),
    ];
    if events.send(Event::Ready(ready)).is_err()
        || events.send(Event::Sample(Box::new(sample))).is_err()
    {
        return Ok(());
    }
    let mut running = false;
    let mut single = false;
    loop {
        // Block while paused; otherwise only look at what is queued.
        let next = if running || single {
            match commands.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        } else {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return Ok(()),
            }
        };
        if let Some(command) = next {
            let refused = match command {
                Command::Run => {
                    running = true;
                    Ok(())
                }
                Command::Pause => {
                    running = false;
                    Ok(())
                }
                Command::Step => {
                    running = false;
                    single = true;
                    Ok(())
                }
                Command::SetTarget(t) => session.set_target(t),
                Command::SetGains(kp, ki) => session.set_gains(kp, ki),
                Command::SetMode(m) => session.set_mode(m),
            };
            if let Err(e) = refused {
                let _ = events.send(Event::Error(e.to_string()));
            }
            continue;
        }
        if session.finished() {
            running = false;
            single = false;
            let _ = events.send(Event::Finished);
            continue;
        }
        let output = session.step().map_err(|e| e.to_string())?;
        single = false;
        if events.send(Event::Step(Box::new(output.metrics))).is_err() {
            return Ok(());
        }
        if let Some(sample) = output.sample
            && events.send(Event::Sample(Box::new(sample))).is_err()
        {
            return Ok(());
        }
    }
}
