//! The window: source tabs (Live, Replay, Simulator) and view tabs on top, the source's
//! controls on the left, the replay cursor and messages at the bottom, the view in the
//! middle.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use web_time::{Duration, Instant};

use dtopp::backends::WgpuOps;
use eframe::egui::{self, Color32, RichText, Ui};

use crate::fps::FrameStats;
use crate::run_data::RunData;
use crate::settings::{STORAGE_KEY, Settings};
use crate::sources::SourceKind;
#[cfg(feature = "live")]
use crate::sources::live::{Command, LiveBackend, LiveSource};
use crate::sources::replay::ReplaySource;
use crate::sources::simulator::{SimCompute, SimSource};
use crate::views::{self, View};

/// Live runs kept for the compare view after a reset.
#[cfg(feature = "live")]
const KEPT_LIVE_RUNS: usize = 4;

/// What the command line asks for at start.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// Run directories to open (the Replay source is shown first when any are given).
    pub replay_dirs: Vec<PathBuf>,
    /// Start training live at once.
    pub live: bool,
    /// Close after this many seconds and print the frame rate (for measurements).
    pub exit_after: Option<f64>,
}

type GpuSlot = Rc<RefCell<Option<Result<WgpuOps, String>>>>;

/// The GPU the simulator may route on, requested the first time it is wanted.
#[derive(Debug, Default)]
enum GpuState {
    #[default]
    NotRequested,
    Requested(GpuSlot),
    Ready(Rc<WgpuOps>),
    Unavailable(String),
}

/// The app.
#[derive(Debug)]
pub struct DesktopApp {
    settings: Settings,
    #[cfg(feature = "live")]
    live: Option<LiveSource>,
    #[cfg(feature = "live")]
    live_history: Vec<RunData>,
    // The live settings the worker was last told, to send only what changed.
    #[cfg(feature = "live")]
    live_sent: Option<crate::sources::live::LiveSettings>,
    replays: Vec<ReplaySource>,
    primary_replay: usize,
    #[cfg(feature = "live")]
    inference: views::inference::InferencePanel,
    sim: Option<SimSource>,
    gpu: GpuState,
    messages: Vec<String>,
    replay_path: String,
    playhead: Option<f64>,
    playing: bool,
    frames: FrameStats,
    started: Instant,
    exit_after: Option<f64>,
    controller_points: usize,
}

impl DesktopApp {
    /// The app with settings restored from eframe's storage.
    pub fn new(cc: &eframe::CreationContext<'_>, options: StartOptions) -> Self {
        let settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, STORAGE_KEY))
            .unwrap_or_default();
        Self::with_settings(settings, options)
    }

    /// The Inference view's inputs and worker.
    #[cfg(feature = "live")]
    pub fn inference_mut(&mut self) -> &mut views::inference::InferencePanel {
        &mut self.inference
    }

    /// The app with the given settings (tests, and the first start).
    pub fn with_settings(settings: Settings, options: StartOptions) -> Self {
        let mut app = Self {
            settings,
            #[cfg(feature = "live")]
            live: None,
            #[cfg(feature = "live")]
            live_history: Vec::new(),
            #[cfg(feature = "live")]
            live_sent: None,
            replays: Vec::new(),
            primary_replay: 0,
            #[cfg(feature = "live")]
            inference: Default::default(),
            sim: None,
            gpu: GpuState::NotRequested,
            messages: Vec::new(),
            replay_path: String::new(),
            playhead: None,
            playing: false,
            frames: FrameStats::default(),
            started: Instant::now(),
            exit_after: options.exit_after,
            controller_points: 0,
        };
        if app.settings.playback_speed <= 0.0 {
            app.settings.playback_speed = 60.0;
        }
        let dirs: Vec<PathBuf> = if options.replay_dirs.is_empty() {
            app.settings.replay_dirs.iter().map(PathBuf::from).collect()
        } else {
            app.settings.source = SourceKind::Replay;
            options.replay_dirs.clone()
        };
        for dir in dirs {
            app.open_run(&dir);
        }
        if options.live {
            app.settings.source = SourceKind::Live;
            #[cfg(feature = "live")]
            {
                app.start_live();
                if let Some(live) = app.live.as_mut() {
                    live.send(Command::Run);
                }
            }
            #[cfg(not(feature = "live"))]
            app.message("live training is not in this build (feature `live`)".into());
        }
        if !SourceKind::all().contains(&app.settings.source) {
            app.settings.source = SourceKind::fallback();
        }
        app
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The settings, to change from outside (tests).
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }

    /// Messages shown in the window, oldest first.
    pub fn messages(&self) -> &[String] {
        &self.messages
    }

    /// Points the controller view drew in its `a_t` series in the last frame.
    pub fn controller_points(&self) -> usize {
        self.controller_points
    }

    /// The followed run directories.
    pub fn replays(&self) -> &[ReplaySource] {
        &self.replays
    }

    /// The live run, when one was started.
    #[cfg(feature = "live")]
    pub fn live(&self) -> Option<&LiveSource> {
        self.live.as_ref()
    }

    /// The simulator, once started.
    pub fn simulator(&self) -> Option<&SimSource> {
        self.sim.as_ref()
    }

    /// The simulator, to run or pause from outside (the browser page's controls).
    pub fn simulator_mut(&mut self) -> Option<&mut SimSource> {
        self.sim.as_mut()
    }

    /// The frame statistics.
    pub fn frame_stats(&self) -> &FrameStats {
        &self.frames
    }

    /// Opens a run directory in the Replay source; a failure becomes a message.
    pub fn open_run(&mut self, dir: &Path) {
        if self.replays.iter().any(|r| r.dir() == dir) {
            return;
        }
        match ReplaySource::open(dir) {
            Ok(source) => {
                self.replays.push(source);
                let dirs: Vec<String> = self
                    .replays
                    .iter()
                    .map(|r| r.dir().display().to_string())
                    .collect();
                self.settings.replay_dirs = dirs;
            }
            Err(e) => self.message(e),
        }
    }

    fn message(&mut self, text: String) {
        if !self.messages.contains(&text) {
            self.messages.push(text);
        }
    }

    #[cfg(feature = "live")]
    fn start_live(&mut self) {
        if let Some(old) = self.live.take()
            && !old.run.steps.is_empty()
        {
            let mut run = old.run.clone();
            run.label = format!("{} #{}", run.label, self.live_history.len() + 1);
            self.live_history.push(run);
            if self.live_history.len() > KEPT_LIVE_RUNS {
                self.live_history.remove(0);
            }
        }
        self.live = Some(LiveSource::start(&self.settings.live));
        self.live_sent = Some(self.settings.live.clone());
    }

    /// Sends the worker the mode, target and gains changed since it was last told.
    #[cfg(feature = "live")]
    fn sync_live(&mut self) {
        use dtopp::train::RoutingMode;
        let (Some(live), Some(sent)) = (self.live.as_mut(), self.live_sent.as_mut()) else {
            return;
        };
        let wanted = &mut self.settings.live;
        if wanted.mode == RoutingMode::Topk {
            wanted.target = wanted.target.round();
        }
        if wanted.mode != sent.mode {
            live.send(Command::SetMode(wanted.mode));
        }
        if wanted.target != sent.target {
            live.send(Command::SetTarget(wanted.target));
        }
        if (wanted.kp, wanted.ki) != (sent.kp, sent.ki) {
            live.send(Command::SetGains(wanted.kp, wanted.ki));
        }
        *sent = wanted.clone();
    }

    /// Starts the simulator over (the next frame builds it from the settings).
    pub fn reset_simulator(&mut self) {
        self.sim = None;
        self.playhead = None;
    }

    /// Builds the simulator, or brings it up to date with changed settings and the GPU
    /// state (every frame while it is shown).
    pub fn sync_simulator(&mut self) {
        let compute = self.sim_compute();
        if let Some(sim) = self.sim.as_mut() {
            sim.set_compute(compute);
            let wanted = &self.settings.sim;
            if sim.settings() != wanted
                && let Err(e) = sim.apply(wanted)
            {
                self.settings.sim = sim.settings().clone();
                self.message(format!("simulator: {e}"));
            }
            return;
        }
        match SimSource::new(&self.settings.sim, compute) {
            Ok(sim) => self.sim = Some(sim),
            Err(e) => self.message(format!("simulator: {e}")),
        }
    }

    /// Where the simulator routes now: the GPU when asked for and ready, else the CPU
    /// reference. The first request for the GPU asks for an adapter (asynchronously in
    /// the browser; the CPU routes until it has answered).
    fn sim_compute(&mut self) -> SimCompute {
        if !self.settings.sim.gpu {
            return SimCompute::Cpu;
        }
        if matches!(self.gpu, GpuState::NotRequested) {
            let slot: GpuSlot = Rc::default();
            let filled = slot.clone();
            crate::spawn::spawn_local(async move {
                let ops = WgpuOps::request().await.map_err(|e| e.to_string());
                *filled.borrow_mut() = Some(ops);
            });
            self.gpu = GpuState::Requested(slot);
        }
        if let GpuState::Requested(slot) = &self.gpu {
            let answer = slot.borrow_mut().take();
            match answer {
                Some(Ok(ops)) => self.gpu = GpuState::Ready(Rc::new(ops)),
                Some(Err(e)) => {
                    self.message(format!("simulator: no GPU, routing on the CPU: {e}"));
                    self.gpu = GpuState::Unavailable(e);
                }
                None => {}
            }
        }
        match &self.gpu {
            GpuState::Ready(ops) => SimCompute::Gpu(ops.clone()),
            _ => SimCompute::Cpu,
        }
    }

    /// What the simulator routes on, in words (the badge).
    pub fn sim_routing_label(&self) -> String {
        match (
            self.settings.sim.gpu,
            self.sim.as_ref().map(SimSource::compute),
        ) {
            (false, _) => "CPU reference".into(),
            (true, Some(SimCompute::Gpu(ops))) => format!("GPU: {}", ops.adapter_name()),
            (true, _) => match &self.gpu {
                GpuState::Requested(_) => "CPU reference (GPU adapter requested)".into(),
                GpuState::Unavailable(e) => format!("CPU reference (no GPU: {e})"),
                GpuState::NotRequested | GpuState::Ready(_) => "CPU reference".into(),
            },
        }
    }

    /// Brings every source up to date; returns whether something is moving (so the UI
    /// keeps repainting).
    fn update_sources(&mut self) -> bool {
        let mut moving = false;
        for replay in &mut self.replays {
            replay.poll_if_due();
        }
        #[cfg(feature = "live")]
        self.sync_live();
        #[cfg(feature = "live")]
        if let Some(live) = self.live.as_mut() {
            live.drain();
            moving |= live.running;
        }
        #[cfg(feature = "live")]
        {
            moving |= self.inference.poll();
        }
        if self.settings.source == SourceKind::Simulator {
            self.sync_simulator();
            if let Some(sim) = self.sim.as_mut() {
                if let Err(e) = sim.advance() {
                    sim.running = false;
                    self.messages.push(format!("simulator: {e}"));
                }
                moving |= sim.running;
            }
        }
        moving
    }

    /// The runs of the current source; the first is the one the single-run views show.
    fn runs(&self) -> Vec<&RunData> {
        match self.settings.source {
            #[cfg(feature = "live")]
            SourceKind::Live => self
                .live
                .iter()
                .map(|l| &l.run)
                .chain(self.live_history.iter().rev())
                .collect(),
            #[cfg(not(feature = "live"))]
            SourceKind::Live => Vec::new(),
            SourceKind::Replay => {
                let mut runs: Vec<&RunData> = self.replays.iter().map(|r| &r.run).collect();
                if self.primary_replay < runs.len() {
                    let primary = runs.remove(self.primary_replay);
                    runs.insert(0, primary);
                }
                runs
            }
            SourceKind::Simulator => self.sim.iter().flat_map(|s| s.runs.iter()).collect(),
        }
    }

    fn longest_run(&self) -> usize {
        self.runs().iter().map(|r| r.steps.len()).max().unwrap_or(0)
    }

    fn visible(&self) -> Option<usize> {
        self.playhead.map(|p| p.floor() as usize)
    }

    /// One frame of the whole UI.
    pub fn draw(&mut self, ui: &mut Ui) {
        self.frames.frame();
        let moving = self.update_sources();
        if self.playing {
            let dt = f64::from(ui.ctx().input(|i| i.stable_dt)).min(0.1);
            let end = self.longest_run() as f64;
            let next = self.playhead.unwrap_or(0.0) + dt * self.settings.playback_speed;
            if next >= end {
                self.playhead = None;
                self.playing = false;
            } else {
                self.playhead = Some(next);
            }
        }
        if moving || self.playing {
            ui.ctx().request_repaint();
        } else {
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
        if let Some(limit) = self.exit_after
            && self.started.elapsed().as_secs_f64() >= limit
        {
            self.report_frames();
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
            self.exit_after = None;
        }

        egui::Panel::top("tabs").show(ui, |ui| self.tabs(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status(ui));
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(270.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.controls(ui));
            });
        egui::CentralPanel::default().show(ui, |ui| self.view(ui));
    }

    /// Prints the frame rate since start (used with `--exit-after`).
    pub fn report_frames(&self) {
        let (fps, longest, frames) = self.frames.overall();
        #[allow(unused_mut)]
        let mut training = String::new();
        #[cfg(feature = "live")]
        if let Some(live) = &self.live {
            let steps = &live.run.steps;
            let rate = steps.iter().filter_map(|s| s.tokens_per_sec).sum::<f64>()
                / steps.len().max(1) as f64;
            training = format!("; live training: {} steps, {rate:.0} tokens/s", steps.len());
        }
        eprintln!(
            "frames: {frames} in {:.1} s = {fps:.1} fps mean, longest gap {:.0} ms{training}",
            self.started.elapsed().as_secs_f64(),
            longest.as_secs_f64() * 1000.0
        );
    }

    fn tabs(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.label(RichText::new("dtopp").strong());
            ui.separator();
            for kind in SourceKind::all() {
                ui.selectable_value(&mut self.settings.source, kind, kind.label());
            }
            ui.separator();
            for view in View::ALL.into_iter().filter(|v| v.available()) {
                ui.selectable_value(&mut self.settings.view, view, view.label());
            }
        });
    }

    fn status(&mut self, ui: &mut Ui) {
        let longest = self.longest_run();
        ui.horizontal(|ui| {
            let label = if self.playing {
                "⏸ Pause replay"
            } else {
                "▶ Animate"
            };
            if ui.button(label).clicked() {
                if self.playing {
                    self.playing = false;
                } else {
                    if self.playhead.is_none() {
                        self.playhead = Some(0.0);
                    }
                    self.playing = true;
                }
            }
            if ui.button("Show all").clicked() {
                self.playhead = None;
                self.playing = false;
            }
            let mut shown = self.playhead.unwrap_or(longest as f64);
            let slider = egui::Slider::new(&mut shown, 0.0..=longest.max(1) as f64)
                .text("steps shown")
                .integer();
            if ui.add(slider).changed() {
                self.playhead = if shown >= longest as f64 {
                    None
                } else {
                    Some(shown)
                };
            }
            ui.add(
                egui::DragValue::new(&mut self.settings.playback_speed)
                    .range(1.0..=5000.0)
                    .suffix(" steps/s"),
            );
            if !self.settings.hide_frame_rate {
                ui.separator();
                ui.label(format!("{:.0} fps", self.frames.fps()));
            }
        });
        let problems: Vec<String> = self
            .replays
            .iter()
            .flat_map(|r| r.problems.iter().cloned())
            .collect();
        #[cfg(feature = "live")]
        let problems: Vec<String> = problems
            .into_iter()
            .chain(self.live.iter().flat_map(|l| l.problems.iter().cloned()))
            .collect();
        let mut dismiss = false;
        for text in self.messages.iter().chain(&problems).rev().take(4) {
            ui.colored_label(Color32::from_rgb(220, 80, 60), format!("⚠ {text}"));
        }
        if !self.messages.is_empty() && ui.small_button("dismiss messages").clicked() {
            dismiss = true;
        }
        if dismiss {
            self.messages.clear();
        }
    }

    fn controls(&mut self, ui: &mut Ui) {
        match self.settings.source {
            SourceKind::Live => self.live_controls(ui),
            SourceKind::Replay => self.replay_controls(ui),
            SourceKind::Simulator => self.sim_controls(ui),
        }
    }

    #[cfg(not(feature = "live"))]
    fn live_controls(&mut self, ui: &mut Ui) {
        ui.label("Live training is not part of this build.");
    }

    #[cfg(feature = "live")]
    fn live_controls(&mut self, ui: &mut Ui) {
        use dtopp::train::RoutingMode;
        ui.heading("Live training");
        ui.label("The tiny preset (d_model 64, 2 blocks, 16 experts) on the synthetic corpus.");
        let running = self.live.as_ref().is_some_and(|l| l.running);
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!running, egui::Button::new("▶ Start"))
                .clicked()
            {
                if self.live.is_none() {
                    self.start_live();
                }
                if let Some(l) = self.live.as_mut() {
                    l.send(Command::Run);
                }
            }
            if ui
                .add_enabled(running, egui::Button::new("⏸ Pause"))
                .clicked()
                && let Some(l) = self.live.as_mut()
            {
                l.send(Command::Pause);
            }
            if ui
                .add_enabled(!running, egui::Button::new("Step"))
                .clicked()
            {
                if self.live.is_none() {
                    self.start_live();
                }
                if let Some(l) = self.live.as_mut() {
                    l.send(Command::Step);
                }
            }
            if ui.button("⟲ Reset").clicked() {
                self.start_live();
            }
        });
        let live = &mut self.settings.live;
        egui::Grid::new("live-settings")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("mode");
                egui::ComboBox::from_id_salt("live-mode")
                    .selected_text(live.mode.name())
                    .show_ui(ui, |ui| {
                        for mode in [
                            RoutingMode::Dtopp,
                            RoutingMode::Topp,
                            RoutingMode::Topk,
                            RoutingMode::DtoppNoDrn,
                            RoutingMode::DrnOnly,
                        ] {
                            ui.selectable_value(&mut live.mode, mode, mode.name());
                        }
                    });
                ui.end_row();
                ui.label("target T");
                let step = if live.mode == RoutingMode::Topk {
                    1.0
                } else {
                    0.25
                };
                ui.add(egui::Slider::new(&mut live.target, 1.0..=16.0).step_by(step));
                ui.end_row();
                ui.label("Kp");
                ui.add(egui::Slider::new(&mut live.kp, 0.0..=5.0).logarithmic(true));
                ui.end_row();
                ui.label("Ki");
                ui.add(egui::Slider::new(&mut live.ki, 0.0..=5.0).logarithmic(true));
                ui.end_row();
                ui.label("steps");
                ui.add(egui::DragValue::new(&mut live.steps).range(1..=100_000));
                ui.end_row();
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut live.seed));
                ui.end_row();
                ui.label("backend");
                egui::ComboBox::from_id_salt("live-backend")
                    .selected_text(live.backend.name())
                    .show_ui(ui, |ui| {
                        for b in [LiveBackend::Cpu, LiveBackend::Wgpu] {
                            ui.selectable_value(&mut live.backend, b, b.name());
                        }
                    });
                ui.end_row();
            });
        let pending = |s: &crate::sources::live::LiveSettings| (s.steps, s.seed, s.backend);
        if self
            .live_sent
            .as_ref()
            .is_some_and(|sent| pending(sent) != pending(&self.settings.live))
        {
            ui.label("Steps, seed and backend apply at the next Reset.");
        }
        ui.separator();
        if let Some(l) = &self.live {
            for line in &l.description {
                ui.small(line);
            }
            if l.description.is_empty() {
                ui.small("building the model…");
            }
            if l.finished {
                ui.label("Reached the last step; Reset to train again.");
            }
        }
    }

    fn replay_controls(&mut self, ui: &mut Ui) {
        ui.heading("Run directories");
        ui.label("A directory written by `dtopp train` or `dtopp simulate --out`, local or mounted from a server; it is followed while it grows.");
        let response = ui.text_edit_singleline(&mut self.replay_path);
        let enter = response.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.button("Open").clicked() || enter) && !self.replay_path.trim().is_empty() {
            let path = PathBuf::from(self.replay_path.trim());
            self.open_run(&path);
        }
        ui.separator();
        let mut remove = None;
        for (i, replay) in self.replays.iter().enumerate() {
            ui.horizontal(|ui| {
                ui.radio_value(&mut self.primary_replay, i, "");
                ui.label(format!(
                    "{} ({}, {} steps)",
                    replay.run.label,
                    if replay.run.mode.is_empty() {
                        "?"
                    } else {
                        &replay.run.mode
                    },
                    replay.run.steps.len()
                ))
                .on_hover_text(replay.dir().display().to_string());
                if ui.small_button("🗙").clicked() {
                    remove = Some(i);
                }
            });
        }
        if let Some(i) = remove {
            self.replays.remove(i);
            self.primary_replay = self
                .primary_replay
                .min(self.replays.len().saturating_sub(1));
            self.settings.replay_dirs = self
                .replays
                .iter()
                .map(|r| r.dir().display().to_string())
                .collect();
        }
        if self.replays.is_empty() {
            ui.label("No run open. Train one with `dtopp train --preset tiny --out runs/tiny`.");
        } else {
            ui.small("The selected run fills the single-run views; Compare overlays all.");
        }
    }

    fn sim_controls(&mut self, ui: &mut Ui) {
        ui.heading("Simulator");
        ui.label("The controller on synthetic router logits (as `dtopp simulate`), with fixed Top-p and Top-k on the same logits.");
        let running = self.sim.as_ref().is_some_and(|s| s.running);
        ui.horizontal(|ui| {
            if ui
                .button(if running { "⏸ Pause" } else { "▶ Run" })
                .clicked()
                && let Some(s) = self.sim.as_mut()
            {
                s.running = !running;
            }
            if ui
                .add_enabled(!running, egui::Button::new("Step"))
                .clicked()
                && let Some(s) = self.sim.as_mut()
                && let Err(e) = s.step()
            {
                self.messages.push(format!("simulator: {e}"));
            }
            if ui.button("⟲ Reset").clicked() {
                self.reset_simulator();
            }
        });
        let (target, experts) = (self.settings.sim.target, self.settings.sim.experts);
        let stepped = step_change(target, experts);
        if ui
            .button(format!("step change: T {target} to {stepped}"))
            .on_hover_text("Moves T at once, to watch the controller follow.")
            .clicked()
        {
            self.settings.sim.target = stepped;
        }
        let s = &mut self.settings.sim;
        egui::Grid::new("sim-settings")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("target T");
                ui.add(egui::Slider::new(&mut s.target, 1.0..=s.experts as f64).step_by(0.25));
                ui.end_row();
                ui.label("Kp");
                ui.add(egui::Slider::new(&mut s.kp, 0.0..=5.0).logarithmic(true));
                ui.end_row();
                ui.label("Ki");
                ui.add(egui::Slider::new(&mut s.ki, 0.0..=5.0).logarithmic(true));
                ui.end_row();
                ui.label("p_min");
                ui.add(egui::Slider::new(&mut s.p_min, 0.0..=1.0));
                ui.end_row();
                ui.label("p_max");
                ui.add(egui::Slider::new(&mut s.p_max, 0.0..=1.0));
                ui.end_row();
                ui.label("margin");
                ui.add(egui::Slider::new(&mut s.margin, 0.0..=8.0));
                ui.end_row();
                ui.label("noise");
                ui.add(egui::Slider::new(&mut s.noise, 0.1..=4.0));
                ui.end_row();
                ui.label("drift");
                ui.add(egui::Slider::new(&mut s.drift, -0.9..=4.0));
                ui.end_row();
                ui.label("steps / s");
                ui.add(egui::Slider::new(&mut s.steps_per_second, 1.0..=500.0).logarithmic(true));
                ui.end_row();
                ui.label("experts E");
                ui.add(egui::DragValue::new(&mut s.experts).range(2..=512));
                ui.end_row();
                ui.label("layers");
                ui.add(egui::DragValue::new(&mut s.layers).range(1..=32));
                ui.end_row();
                ui.label("tokens / step");
                ui.add(egui::DragValue::new(&mut s.tokens).range(1..=65536));
                ui.end_row();
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut s.seed));
                ui.end_row();
            });
        s.p_max = s.p_max.max(s.p_min);
        s.target = s.target.min(s.experts as f64);
        ui.separator();
        ui.checkbox(
            &mut self.settings.sim.gpu,
            "route on the GPU (WGSL kernels)",
        );
        let badge = self.sim_routing_label();
        let colour = if badge.starts_with("GPU") {
            Color32::from_rgb(60, 160, 90)
        } else {
            Color32::from_rgb(120, 120, 130)
        };
        ui.label(
            RichText::new(format!("routing: {badge}"))
                .color(Color32::WHITE)
                .background_color(colour),
        );
    }

    fn view(&mut self, ui: &mut Ui) {
        let visible = self.visible();
        let view = self.settings.view;
        let mut layer = self.settings.histogram_layer;
        let mut token_layer = self.settings.token_layer;
        let hint = match self.settings.source {
            SourceKind::Live => "Press Start to train the tiny model here.",
            SourceKind::Replay => "Open a run directory on the left.",
            SourceKind::Simulator => "Starting the simulator…",
        };
        if view == View::Inference {
            #[cfg(feature = "live")]
            {
                if self.inference.source().is_none()
                    && self.inference.dir.is_empty()
                    && let Some(replay) = self.replays.get(self.primary_replay)
                {
                    self.inference.dir = replay.dir().display().to_string();
                }
                views::inference::show(ui, &mut self.inference);
            }
            #[cfg(not(feature = "live"))]
            ui.label("Inference needs the model, which this build leaves out.");
            return;
        }
        let runs = self.runs();
        let points = match (runs.first(), view) {
            (None, _) => {
                ui.label(hint);
                Some(0)
            }
            (Some(run), View::Controller) => Some(views::controller::show(ui, run, visible)),
            (Some(run), View::Layers) => {
                views::layers::show(ui, run, visible, &mut layer);
                None
            }
            (Some(run), View::Tokens) => {
                views::tokens::show(ui, run, visible, &mut token_layer);
                None
            }
            (Some(run), View::Experts) => {
                views::experts::show(ui, run, visible);
                None
            }
            (Some(_), View::Compare) => {
                views::compare::show(ui, &runs, visible);
                None
            }
            (Some(_), View::Inference) => unreachable!("drawn above"),
        };
        if let Some(points) = points {
            self.controller_points = points;
        }
        self.settings.histogram_layer = layer;
        self.settings.token_layer = token_layer;
    }
}

/// The target a step change moves `t` to: double it while that stays within a quarter
/// of the experts, else halve it (so two presses come back), on a 0.25 grid.
pub fn step_change(t: f64, experts: usize) -> f64 {
    let to = if 2.0 * t <= experts as f64 / 4.0 {
        2.0 * t
    } else {
        t / 2.0
    };
    ((to * 4.0).round() / 4.0).clamp(1.0, experts as f64)
}

impl eframe::App for DesktopApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.draw(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, STORAGE_KEY, &self.settings);
    }
}
