//! Tokens: the routing sample's text with every token coloured by how many experts it
//! activated (in one layer or averaged over layers), expert ids and probabilities on
//! hover, and a token x layer heatmap of the same counts.

use dtopp::metrics::RoutingSample;
use eframe::egui::{self, Color32, RichText, Sense, Ui, Vec2};

use super::{TokenLayer, count_color};
use crate::run_data::RunData;

/// Draws the tokens view of the sample in force at the last revealed step.
pub fn show(ui: &mut Ui, run: &RunData, visible: Option<usize>, choice: &mut TokenLayer) {
    let steps = run.visible_steps(visible);
    let Some(sample) = run.sample_at(steps) else {
        ui.label("No routing samples in this run (training runs write routing_samples.jsonl; the simulator has no tokens).");
        return;
    };
    let layers = sample.experts.len();
    let experts = run.experts().unwrap_or_else(|| max_count(sample).max(1));
    ui.horizontal(|ui| {
        ui.label(format!(
            "routing sample after step {} ({} tokens, {} MoE layers); colour:",
            sample.step,
            sample.tokens.len(),
            layers
        ));
        ui.selectable_value(choice, TokenLayer::Average, "mean over layers");
        for l in 0..layers {
            ui.selectable_value(choice, TokenLayer::Layer(l), format!("layer {l}"));
        }
    });
    if let TokenLayer::Layer(l) = *choice
        && l >= layers
    {
        *choice = TokenLayer::Average;
    }
    let high = max_count(sample).max(2) as f64;
    legend(ui, high);
    ui.add_space(4.0);
    egui::ScrollArea::vertical()
        .max_height(ui.available_height() * 0.55)
        .id_salt("tokens-text")
        .show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.spacing_mut().item_spacing = Vec2::new(2.0, 4.0);
                for i in 0..sample.tokens.len() {
                    let k = count(sample, *choice, i);
                    let text = chip(display(&sample.text[i]), k, high);
                    ui.label(text)
                        .on_hover_ui(|ui| token_details(ui, sample, i));
                }
            });
        });
    ui.separator();
    ui.label(format!(
        "experts per token: tokens (columns) x MoE layers (rows, shallow at top); E = {experts}"
    ));
    heatmap(ui, sample, high);
}

/// `text` on the colour of `k` experts, in a text colour that stays readable on it.
pub(crate) fn chip(text: String, k: f64, high: f64) -> RichText {
    RichText::new(text)
        .monospace()
        .background_color(count_color(k, 1.0, high))
        .color(if k > high * 0.55 {
            Color32::WHITE
        } else {
            Color32::BLACK
        })
}

fn display(text: &str) -> String {
    if text == " " {
        "␣".into()
    } else {
        text.to_string()
    }
}

fn count(sample: &RoutingSample, choice: TokenLayer, token: usize) -> f64 {
    match choice {
        TokenLayer::Layer(l) => sample.experts[l][token].len() as f64,
        TokenLayer::Average => {
            let layers = sample.experts.len().max(1);
            sample.experts.iter().map(|e| e[token].len()).sum::<usize>() as f64 / layers as f64
        }
    }
}

fn max_count(sample: &RoutingSample) -> usize {
    sample
        .experts
        .iter()
        .flat_map(|l| l.iter().map(Vec::len))
        .max()
        .unwrap_or(1)
}

pub(crate) fn legend(ui: &mut Ui, high: f64) {
    ui.horizontal(|ui| {
        ui.label("experts:");
        let steps = high.round() as usize;
        for k in 1..=steps {
            ui.label(chip(format!(" {k} "), k as f64, high));
        }
    });
}

pub(crate) fn token_details(ui: &mut Ui, sample: &RoutingSample, i: usize) {
    ui.label(
        RichText::new(format!(
            "token {i}: {:?} (id {})",
            sample.text[i], sample.tokens[i]
        ))
        .strong(),
    );
    if let Some(d) = sample.difficulty.as_ref().and_then(|d| d.get(i)) {
        ui.label(format!("difficulty of its context: {d:.2} bits"));
    }
    for (l, (experts, probs)) in sample.experts.iter().zip(&sample.probs).enumerate() {
        let parts: Vec<String> = experts[i]
            .iter()
            .zip(&probs[i])
            .map(|(e, p)| format!("#{e} {p:.3}"))
            .collect();
        let mass: f32 = probs[i].iter().sum();
        ui.label(format!(
            "layer {l}: {} experts (mass {mass:.3}): {}",
            experts[i].len(),
            parts.join(", ")
        ));
    }
}

fn heatmap(ui: &mut Ui, sample: &RoutingSample, high: f64) {
    let layers = sample.experts.len();
    let tokens = sample.tokens.len();
    if layers == 0 || tokens == 0 {
        return;
    }
    let width = ui.available_width();
    let cell_h = ((ui.available_height() - 10.0) / layers as f32).clamp(8.0, 28.0);
    let (rect, response) =
        ui.allocate_exact_size(Vec2::new(width, cell_h * layers as f32), Sense::hover());
    let cell_w = width / tokens as f32;
    let painter = ui.painter_at(rect);
    for l in 0..layers {
        for t in 0..tokens {
            let k = sample.experts[l][t].len() as f64;
            let min = rect.min + Vec2::new(t as f32 * cell_w, l as f32 * cell_h);
            painter.rect_filled(
                egui::Rect::from_min_size(min, Vec2::new(cell_w.max(1.0), cell_h)),
                0.0,
                count_color(k, 1.0, high),
            );
        }
    }
    if let Some(pos) = response.hover_pos() {
        let t = (((pos.x - rect.min.x) / cell_w) as usize).min(tokens - 1);
        let l = (((pos.y - rect.min.y) / cell_h) as usize).min(layers - 1);
        response.on_hover_text(format!(
            "token {t} {:?}, layer {l}: {} experts {:?}",
            sample.text[t],
            sample.experts[l][t].len(),
            sample.experts[l][t]
        ));
    }
}
