//! Experts: the load of every expert in every layer over the recent steps, as a share
//! of a perfectly balanced load (1.0), with each layer's imbalance.

use eframe::egui::{self, Sense, Ui, Vec2};

use super::{RECENT_STEPS, count_color};
use crate::run_data::RunData;

/// Draws the experts view.
pub fn show(ui: &mut Ui, run: &RunData, visible: Option<usize>) {
    let steps = run.visible_steps(visible);
    let tail = &steps[steps.len().saturating_sub(RECENT_STEPS)..];
    let Some(shape) = tail
        .last()
        .map(|s| &s.expert_load_per_layer)
        .filter(|l| !l.is_empty())
    else {
        ui.label("Expert loads are recorded by training runs (not by the simulator).");
        return;
    };
    let (layers, experts) = (shape.len(), shape[0].len());
    let mut load = vec![vec![0u64; experts]; layers];
    for s in tail {
        for (sum, step) in load.iter_mut().zip(&s.expert_load_per_layer) {
            for (a, b) in sum.iter_mut().zip(step) {
                *a += b;
            }
        }
    }
    // Relative load: 1.0 is a perfectly even share of the layer's routes.
    let relative: Vec<Vec<f64>> = load
        .iter()
        .map(|row| {
            let mean = row.iter().sum::<u64>() as f64 / experts as f64;
            row.iter()
                .map(|&c| if mean > 0.0 { c as f64 / mean } else { 0.0 })
                .collect()
        })
        .collect();
    let high = relative.iter().flatten().copied().fold(1.0, f64::max);
    ui.label(format!(
        "load per expert (columns) and MoE layer (rows), over the last {} steps, relative to an even share (1.0); darker = more routes; max {:.2}",
        tail.len(),
        high
    ));
    for (l, row) in relative.iter().enumerate() {
        let max = row.iter().copied().fold(0.0, f64::max);
        let min = row.iter().copied().fold(f64::INFINITY, f64::min);
        ui.label(format!("layer {l}: max/even {max:.2}, min/even {min:.2}"));
    }
    let width = ui.available_width();
    let cell_w = width / experts as f32;
    let cell_h = ((ui.available_height() - 10.0) / layers as f32).clamp(10.0, 60.0);
    let (rect, response) =
        ui.allocate_exact_size(Vec2::new(width, cell_h * layers as f32), Sense::hover());
    let painter = ui.painter_at(rect);
    for (l, row) in relative.iter().enumerate() {
        for (e, &v) in row.iter().enumerate() {
            let min = rect.min + Vec2::new(e as f32 * cell_w, l as f32 * cell_h);
            painter.rect_filled(
                egui::Rect::from_min_size(min, Vec2::new((cell_w - 1.0).max(1.0), cell_h - 1.0)),
                0.0,
                count_color(v, 0.0, high),
            );
        }
    }
    if let Some(pos) = response.hover_pos() {
        let e = (((pos.x - rect.min.x) / cell_w) as usize).min(experts - 1);
        let l = (((pos.y - rect.min.y) / cell_h) as usize).min(layers - 1);
        response.on_hover_text(format!(
            "layer {l}, expert {e}: {} routes ({:.2} x an even share)",
            load[l][e], relative[l][e]
        ));
    }
}
