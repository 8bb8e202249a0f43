//! Compare: several runs (modes, seeds, servers) overlaid: `a_t` against `T`, the
//! threshold, and the losses; a table of how each tracked its target.

use eframe::egui::{self, Color32, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::{mode_color, series_color};
use crate::run_data::{RunData, StepPoint};

/// Draws every run in `runs` (their first `visible` steps) over each other.
pub fn show(ui: &mut Ui, runs: &[&RunData], visible: Option<usize>) {
    if runs.is_empty() {
        ui.label("No runs to compare: open run directories (Replay), or run the simulator.");
        return;
    }
    // Runs of one mode each get their mode's colour; otherwise one colour per run.
    let distinct_modes = {
        let mut modes: Vec<&str> = runs.iter().map(|r| r.mode.as_str()).collect();
        modes.sort_unstable();
        modes.dedup();
        modes.len() == runs.len()
    };
    let color = |i: usize, run: &RunData| {
        if distinct_modes {
            mode_color(&run.mode)
        } else {
            series_color(i)
        }
    };
    egui::Grid::new("compare-table")
        .striped(true)
        .show(ui, |ui| {
            for h in [
                "run",
                "mode",
                "steps",
                "settled (±2%)",
                "a_t mean ± std",
                "final p",
                "val loss",
            ] {
                ui.strong(h);
            }
            ui.end_row();
            for (i, run) in runs.iter().enumerate() {
                let steps = run.visible_steps(visible);
                ui.colored_label(color(i, run), &run.label);
                ui.label(&run.mode);
                ui.label(steps.len().to_string());
                let tracking = RunData::tracking(steps);
                ui.label(
                    tracking
                        .as_ref()
                        .and_then(|t| t.settled_at)
                        .map_or("never".into(), |s| format!("step {}", steps[s].step)),
                );
                ui.label(tracking.map_or("-".into(), |t| format!("{:.3} ± {:.3}", t.mean, t.std)));
                ui.label(
                    steps
                        .last()
                        .and_then(|s| s.threshold)
                        .map_or("-".into(), |p| format!("{p:.4}")),
                );
                ui.label(
                    steps
                        .iter()
                        .rev()
                        .find_map(|s| s.val_loss)
                        .map_or("-".into(), |v| format!("{v:.4}")),
                );
                ui.end_row();
            }
        });
    let has_loss = runs
        .iter()
        .any(|r| r.steps.iter().any(|s| s.ce_loss.is_some()));
    let plots = if has_loss { 3.0 } else { 2.0 };
    let height = ((ui.available_height() - 10.0) / plots).max(80.0);
    let overlay = |ui: &mut Ui, id: &str, y: &str, f: &dyn Fn(&StepPoint) -> Option<f64>| {
        Plot::new(id)
            .height(height)
            .legend(Legend::default())
            .link_axis("compare-x", [true, false])
            .y_axis_label(y)
            .show(ui, |plot| {
                for (i, run) in runs.iter().enumerate() {
                    let points: Vec<[f64; 2]> = run
                        .visible_steps(visible)
                        .iter()
                        .filter_map(|s| f(s).map(|v| [s.step as f64, v]))
                        .collect();
                    plot.line(
                        Line::new(run.label.clone(), PlotPoints::from(points)).color(color(i, run)),
                    );
                }
                if id == "compare-active"
                    && let Some(run) = runs.first()
                {
                    let target: Vec<[f64; 2]> = run
                        .visible_steps(visible)
                        .iter()
                        .map(|s| [s.step as f64, s.target])
                        .collect();
                    plot.line(Line::new("T", PlotPoints::from(target)).color(Color32::GRAY));
                }
            });
    };
    overlay(ui, "compare-active", "experts / token", &|s| Some(s.active));
    overlay(ui, "compare-threshold", "threshold p", &|s| s.threshold);
    if has_loss {
        overlay(ui, "compare-loss", "train CE (nats)", &|s| s.ce_loss);
    }
}
