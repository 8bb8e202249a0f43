//! Inference: open a trained run directory, type a prompt and watch the continuation,
//! each token coloured by its expert count (per-layer experts on hover). A slider sets
//! the compute `T'` and the text regenerates when it is released; the run's `eval.json`,
//! when present, draws as loss against active experts.

use std::path::{Path, PathBuf};

use eframe::egui::{self, Color32, RichText, Ui, Vec2};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points, VLine};

use super::tokens::{chip, legend, token_details};
use crate::sources::inference::{ComputeChoice, InferenceSource, Request};

/// The view's inputs and its worker.
#[derive(Debug)]
pub struct InferencePanel {
    /// The run directory typed or opened.
    pub dir: String,
    /// The prompt.
    pub prompt: String,
    /// Tokens to generate.
    pub tokens: usize,
    /// Softmax temperature.
    pub temperature: f64,
    /// Sampler seed.
    pub seed: u64,
    /// Generate at `target` instead of the trained compute.
    pub use_target: bool,
    /// `T'`.
    pub target: f64,
    source: Option<InferenceSource>,
    // A generation is asked for as soon as the run has loaded.
    generate_on_load: bool,
}

impl Default for InferencePanel {
    fn default() -> Self {
        Self {
            dir: String::new(),
            prompt: "the ".into(),
            tokens: 120,
            temperature: 0.8,
            seed: 0,
            use_target: false,
            target: 4.0,
            source: None,
            generate_on_load: false,
        }
    }
}

impl InferencePanel {
    /// Opens the run in `dir` (loading in the background) and generates once it is in.
    pub fn open(&mut self, dir: &Path) {
        self.dir = dir.display().to_string();
        self.source = Some(InferenceSource::open(dir));
        self.generate_on_load = true;
    }

    /// The worker, once a run was opened.
    pub fn source(&self) -> Option<&InferenceSource> {
        self.source.as_ref()
    }

    /// Takes the worker's answers; true while work is in flight or something changed.
    pub fn poll(&mut self) -> bool {
        let Some(source) = self.source.as_mut() else {
            return false;
        };
        let changed = source.poll();
        if self.generate_on_load && source.info.is_some() {
            self.generate_on_load = false;
            self.generate();
        }
        let source = self.source.as_ref().expect("checked above");
        changed || source.pending > 0 || (source.info.is_none() && source.load_error.is_none())
    }

    /// Asks the worker for a continuation of the prompt with the current settings.
    pub fn generate(&mut self) {
        let compute = if self.use_target {
            ComputeChoice::Target(self.target)
        } else {
            ComputeChoice::Trained
        };
        let request = Request {
            prompt: self.prompt.clone(),
            tokens: self.tokens,
            temperature: self.temperature,
            seed: self.seed,
            compute,
        };
        if let Some(source) = self.source.as_mut() {
            source.request(request);
        }
    }
}

/// Draws the view.
pub fn show(ui: &mut Ui, panel: &mut InferencePanel) {
    ui.horizontal(|ui| {
        ui.label("run directory:");
        let edit = ui.add(egui::TextEdit::singleline(&mut panel.dir).desired_width(360.0));
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        if (ui.button("Open").clicked() || enter) && !panel.dir.trim().is_empty() {
            let dir = PathBuf::from(panel.dir.trim());
            panel.open(&dir);
        }
    });
    let Some(source) = panel.source.as_ref() else {
        ui.label("Open a run directory written by `dtopp train` (it needs a checkpoint; every finished run has one).");
        return;
    };
    if let Some(error) = &source.load_error {
        ui.colored_label(Color32::from_rgb(200, 40, 40), error);
        return;
    }
    let Some(info) = source.info.clone() else {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("loading the checkpoint…");
        });
        return;
    };
    ui.label(format!(
        "{}: {} run, step {}, E = {}, trained at T = {} ({})",
        info.dir.display(),
        info.mode,
        info.step,
        info.experts,
        info.target,
        info.trained
    ));
    let mut regenerate = false;
    ui.horizontal(|ui| {
        ui.label("prompt:");
        let edit = ui.add(egui::TextEdit::singleline(&mut panel.prompt).desired_width(320.0));
        regenerate |= edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        ui.label("tokens");
        ui.add(egui::DragValue::new(&mut panel.tokens).range(1..=2000));
        ui.label("temperature");
        ui.add(
            egui::DragValue::new(&mut panel.temperature)
                .range(0.0..=5.0)
                .speed(0.05),
        );
        ui.label("seed");
        ui.add(egui::DragValue::new(&mut panel.seed));
        regenerate |= ui.button("Generate").clicked();
    });
    ui.horizontal(|ui| {
        ui.label("compute:");
        regenerate |= ui
            .radio_value(&mut panel.use_target, false, "as trained")
            .clicked();
        regenerate |= ui
            .radio_value(&mut panel.use_target, true, "target T'")
            .clicked();
        let step = if info.mode == "topk" { 1.0 } else { 0.25 };
        let slider = ui.add_enabled(
            panel.use_target,
            egui::Slider::new(&mut panel.target, 1.0..=info.experts as f64).step_by(step),
        );
        // Calibrating a new T' runs the model a few dozen times: on release, not per frame.
        regenerate |= slider.drag_stopped() || (slider.changed() && !slider.dragged());
    });
    if regenerate {
        panel.generate();
    }
    let source = panel.source.as_ref().expect("opened above");
    if source.pending > 0 {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("generating…");
        });
    }
    match &source.latest {
        None => {}
        Some(Err(e)) => {
            ui.colored_label(Color32::from_rgb(200, 40, 40), e);
        }
        Some(Ok(generated)) => {
            let sample = &generated.sample;
            let high = (info.experts as f64)
                .min(2.0 * info.target.max(1.0))
                .max(2.0);
            // The speed on hover: it changes from run to run, the snapshot must not.
            ui.label(format!(
                "{}: {:.2} experts per generated token (mean over layers)",
                generated.compute, generated.active
            ))
            .on_hover_text(format!(
                "{:.0} tokens/s generated (KV cache, CPU)",
                generated.tokens_per_second
            ));
            legend(ui, high);
            egui::ScrollArea::vertical()
                .max_height(ui.available_height() * 0.55)
                .id_salt("inference-text")
                .show(ui, |ui| {
                    ui.horizontal_wrapped(|ui| {
                        ui.spacing_mut().item_spacing = Vec2::new(2.0, 4.0);
                        for i in 0..sample.tokens.len() {
                            let layers = sample.experts.len().max(1);
                            let k = sample.experts.iter().map(|l| l[i].len()).sum::<usize>() as f64
                                / layers as f64;
                            let text = if sample.text[i] == " " {
                                "␣".to_string()
                            } else {
                                sample.text[i].clone()
                            };
                            let mut text = chip(text, k, high);
                            if i < generated.prompt_tokens {
                                text = text.underline();
                            }
                            ui.label(text)
                                .on_hover_ui(|ui| token_details(ui, sample, i));
                        }
                    });
                });
        }
    }
    if !info.eval_points.is_empty() {
        ui.separator();
        ui.label(RichText::new("loss against compute (eval.json)").strong());
        let current = match &source.latest {
            Some(Ok(g)) => Some(g.active),
            _ => None,
        };
        Plot::new("inference-eval")
            .height(ui.available_height().max(120.0))
            .legend(Legend::default())
            .x_axis_label("mean active experts per token")
            .y_axis_label("validation loss")
            .show(ui, |plot| {
                let points: Vec<[f64; 2]> = info.eval_points.iter().map(|&(x, y)| [x, y]).collect();
                plot.line(Line::new("eval.json", PlotPoints::from(points.clone())));
                plot.points(Points::new("", PlotPoints::from(points)).radius(3.0));
                if let Some(a) = current {
                    plot.vline(VLine::new("this generation", a));
                }
            });
    }
}
