//! Layers: theta of each layer over time, mean experts per layer (shallow vs deep) and
//! the distribution of experts per token in a chosen layer.

use eframe::egui::{self, Ui};
use egui_plot::{Bar, BarChart, Legend, Line, Plot, PlotPoints};

use super::{RECENT_STEPS, series_color};
use crate::run_data::RunData;

/// Draws the layers view; `layer` is the layer whose k histogram is shown (clamped).
pub fn show(ui: &mut Ui, run: &RunData, visible: Option<usize>, layer: &mut usize) {
    let steps = run.visible_steps(visible);
    let layers = run.layers();
    if steps.is_empty() || layers == 0 {
        ui.label("No steps yet.");
        return;
    }
    let height = ((ui.available_height() - 60.0) / 2.0).max(100.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(ui.available_width() / 2.0);
            ui.label("theta (DRN scale) per layer");
            if steps.iter().all(|s| s.theta_per_layer.is_empty()) {
                ui.label("Theta is recorded by training runs (not by the simulator).");
            } else {
                Plot::new("layers-theta")
                    .height(height)
                    .legend(Legend::default())
                    .x_axis_label("step")
                    .show(ui, |plot| {
                        for l in 0..layers {
                            let points: Vec<[f64; 2]> = steps
                                .iter()
                                .filter_map(|s| {
                                    s.theta_per_layer.get(l).map(|&t| [s.step as f64, t])
                                })
                                .collect();
                            plot.line(
                                Line::new(format!("layer {l}"), PlotPoints::from(points))
                                    .color(series_color(l)),
                            );
                        }
                    });
            }
        });
        ui.vertical(|ui| {
            ui.label(format!(
                "mean experts per token by layer (last {RECENT_STEPS} steps; shallow -> deep)"
            ));
            let means = RunData::mean_k_per_layer(steps, RECENT_STEPS);
            let target = steps.last().map_or(0.0, |s| s.target);
            Plot::new("layers-mean-k")
                .height(height)
                .x_axis_label("MoE layer")
                .show(ui, |plot| {
                    let bars = means
                        .iter()
                        .enumerate()
                        .map(|(l, &k)| {
                            Bar::new(l as f64, k)
                                .fill(series_color(l))
                                .name(format!("layer {l}: {k:.2}"))
                        })
                        .collect();
                    plot.bar_chart(BarChart::new("mean k", bars).width(0.7));
                    plot.hline(egui_plot::HLine::new("T", target).color(egui::Color32::GRAY));
                });
        });
    });
    ui.separator();
    *layer = (*layer).min(layers - 1);
    ui.horizontal(|ui| {
        ui.label("experts-per-token histogram of layer");
        ui.add(egui::Slider::new(layer, 0..=layers - 1));
    });
    let tail = &steps[steps.len().saturating_sub(RECENT_STEPS)..];
    let Some(first) = tail
        .iter()
        .find_map(|s| s.k_histogram_per_layer.get(*layer))
    else {
        ui.label("The k histogram is recorded by training runs (not by the simulator).");
        return;
    };
    let mut counts = vec![0u64; first.len()];
    for s in tail {
        if let Some(h) = s.k_histogram_per_layer.get(*layer) {
            for (c, v) in counts.iter_mut().zip(h) {
                *c += v;
            }
        }
    }
    let total = counts.iter().sum::<u64>().max(1) as f64;
    Plot::new("layers-k-histogram")
        .height(ui.available_height().max(100.0))
        .x_axis_label("experts activated (k)")
        .y_axis_label("share of tokens")
        .show(ui, |plot| {
            let bars = counts
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    Bar::new((i + 1) as f64, c as f64 / total).fill(series_color(*layer))
                })
                .collect();
            plot.bar_chart(BarChart::new(format!("layer {layer}"), bars).width(0.8));
        });
}
