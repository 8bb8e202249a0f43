//! Controller: `a_t` against `T` with the ±2% band and the settling step, the threshold
//! `p_t`, and the controller's error and integral, growing as steps arrive.

use dtopp::sim::SETTLE_BAND;
use eframe::egui::{Color32, RichText, Ui};
use egui_plot::{FilledArea, Legend, Line, Plot, PlotPoints, VLine};

use super::mode_color;
use crate::run_data::{RunData, StepPoint};

/// Draws the controller view of `run`'s first `visible` steps; returns the number of
/// points in the `a_t` series.
pub fn show(ui: &mut Ui, run: &RunData, visible: Option<usize>) -> usize {
    let steps = run.visible_steps(visible);
    let color = mode_color(&run.mode);
    summary_line(ui, run, steps);
    if steps.is_empty() {
        ui.label("No steps yet.");
        return 0;
    }
    let tracking = RunData::tracking(steps);
    let settled = tracking
        .as_ref()
        .and_then(|t| t.settled_at)
        .map(|i| steps[i].step as f64);
    let height = ((ui.available_height() - 3.0 * ui.spacing().item_spacing.y) / 3.0).max(80.0);
    let xs: Vec<f64> = steps.iter().map(|s| s.step as f64).collect();

    let series = |f: &dyn Fn(&StepPoint) -> Option<f64>| -> Vec<[f64; 2]> {
        steps
            .iter()
            .filter_map(|s| f(s).map(|v| [s.step as f64, v]))
            .collect()
    };
    let active = series(&|s| Some(s.active));
    let points = active.len();
    Plot::new("controller-active")
        .height(height)
        .legend(Legend::default())
        .link_axis("controller-x", [true, false])
        .y_axis_label("experts / token")
        .show(ui, |plot| {
            let lower: Vec<f64> = steps
                .iter()
                .map(|s| s.target * (1.0 - SETTLE_BAND))
                .collect();
            let upper: Vec<f64> = steps
                .iter()
                .map(|s| s.target * (1.0 + SETTLE_BAND))
                .collect();
            plot.add(
                FilledArea::new("±2% band", &xs, &lower, &upper)
                    .fill_color(Color32::from_rgba_unmultiplied(120, 120, 120, 50)),
            );
            plot.line(
                Line::new("T", PlotPoints::from(series(&|s| Some(s.target))))
                    .color(Color32::GRAY)
                    .width(1.5),
            );
            plot.line(Line::new("a_t", PlotPoints::from(active)).color(color));
            if let Some(x) = settled {
                plot.vline(VLine::new("settled", x).color(Color32::from_rgb(200, 60, 60)));
            }
        });
    Plot::new("controller-threshold")
        .height(height)
        .legend(Legend::default())
        .link_axis("controller-x", [true, false])
        .y_axis_label("threshold p")
        .show(ui, |plot| {
            plot.line(Line::new("p_t", PlotPoints::from(series(&|s| s.threshold))).color(color));
        });
    Plot::new("controller-terms")
        .height(height)
        .legend(Legend::default())
        .link_axis("controller-x", [true, false])
        .x_axis_label("step")
        .y_axis_label("error, integral")
        .show(ui, |plot| {
            plot.line(
                Line::new(
                    "error (T - a_t) / E",
                    PlotPoints::from(series(&|s| s.error)),
                )
                .color(Color32::from_rgb(214, 39, 40)),
            );
            plot.line(
                Line::new("integral I_t", PlotPoints::from(series(&|s| s.integral)))
                    .color(Color32::from_rgb(148, 103, 189)),
            );
        });
    points
}

fn summary_line(ui: &mut Ui, run: &RunData, steps: &[StepPoint]) {
    ui.horizontal_wrapped(|ui| {
        ui.label(RichText::new(&run.label).strong());
        ui.label(format!(
            "mode {}",
            if run.mode.is_empty() { "?" } else { &run.mode }
        ));
        ui.label(format!("{} steps", steps.len()));
        if let Some(last) = steps.last() {
            ui.label(format!("a_t {:.3} / T {}", last.active, last.target));
            if let Some(p) = last.threshold {
                ui.label(format!("p {p:.4}"));
            }
        }
        if let Some(t) = RunData::tracking(steps) {
            match t.settled_at {
                Some(i) => ui.label(format!(
                    "settled (±2%, {}-step mean) at step {}; a_t {:.3} ± {:.3} since",
                    dtopp::sim::SETTLE_WINDOW,
                    steps[i].step,
                    t.mean,
                    t.std
                )),
                None => ui.label(format!(
                    "not settled within ±2%; a_t {:.3} ± {:.3} over the second half",
                    t.mean, t.std
                )),
            };
        }
    });
}
