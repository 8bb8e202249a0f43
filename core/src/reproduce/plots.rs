//! The report's PNG plots (plotters, bitmap backend; text drawn with the Ubuntu font
//! egui ships, so no system font is needed).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use super::analysis::ModeResult;
use crate::error::{Error, Result};
use crate::train::{RoutingMode, TrainConfig};

const FONT: &str = "sans-serif";

fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // A font that fails to parse would leave plots without text, not fail the run.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// The colour of a mode in every plot.
pub fn mode_color(mode: RoutingMode) -> RGBColor {
    match mode {
        RoutingMode::Topk => RGBColor(31, 119, 180),
        RoutingMode::Topp => RGBColor(214, 39, 40),
        RoutingMode::Dtopp => RGBColor(44, 160, 44),
        RoutingMode::DtoppNoDrn => RGBColor(148, 103, 189),
        RoutingMode::DrnOnly => RGBColor(255, 127, 14),
    }
}

/// One line of a chart.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    dots: bool,
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "plot",
        message: format!("{}: {e}", path.display()),
    }
}

fn line_chart(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[Series],
    reference: Option<(f64, &str)>,
) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| plot_error(path, e);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some((r, _)) = reference {
        y0 = y0.min(r);
        y1 = y1.max(r);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .label_style((FONT, 15))
        .draw()
        .map_err(|e| err(&e))?;
    if let Some((r, label)) = reference {
        chart
            .draw_series(LineSeries::new(
                [(x0, r), (x1, r)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.6)));
    }
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        if s.dots {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

fn smooth(values: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..values.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let part = &values[from..=i];
            (
                values[i].0,
                part.iter().map(|p| p.1).sum::<f64>() / part.len() as f64,
            )
        })
        .collect()
}

/// Every plot of the report, into `out`.
pub fn draw_all(out: &Path, config: &TrainConfig, results: &[ModeResult]) -> Result<()> {
    let target = config.routing.target;
    fn first(r: &ModeResult) -> &[crate::train::StepMetrics] {
        &r.runs[0].history
    }
    let per_mode = |f: &dyn Fn(&ModeResult) -> Vec<(f64, f64)>, dots: bool| -> Vec<Series> {
        results
            .iter()
            .map(|r| Series {
                label: r.mode.name().to_string(),
                color: mode_color(r.mode),
                points: f(r),
                dots,
            })
            .collect()
    };
    line_chart(
        &out.join("active_experts.png"),
        "activated experts per token a_t (seed 0)",
        ("optimizer step", "a_t"),
        &per_mode(
            &|r| {
                first(r)
                    .iter()
                    .map(|m| (m.step as f64, m.active_experts))
                    .collect()
            },
            false,
        ),
        Some((target, "target T")),
    )?;
    line_chart(
        &out.join("train_loss.png"),
        "training cross-entropy (seed 0, 10-step mean)",
        ("optimizer step", "nats / token"),
        &per_mode(
            &|r| {
                let raw: Vec<(f64, f64)> = first(r)
                    .iter()
                    .map(|m| (m.step as f64, m.ce_loss))
                    .collect();
                smooth(&raw, 10)
            },
            false,
        ),
        None,
    )?;
    line_chart(
        &out.join("val_loss.png"),
        "validation cross-entropy (seed 0)",
        ("optimizer step", "nats / token"),
        &per_mode(
            &|r| {
                first(r)
                    .iter()
                    .filter_map(|m| m.val_loss.map(|v| (m.step as f64, v)))
                    .collect()
            },
            true,
        ),
        None,
    )?;
    line_chart(
        &out.join("k_per_layer.png"),
        "mean activated experts per MoE layer at the end",
        ("MoE layer (0 = shallowest)", "mean k"),
        &per_mode(
            &|r| {
                r.active_per_layer
                    .iter()
                    .enumerate()
                    .map(|(l, &k)| (l as f64, k))
                    .collect()
            },
            true,
        ),
        Some((target, "target T")),
    )?;
    let mut theta = Vec::new();
    for r in results.iter().filter(|r| r.mode.uses_drn()) {
        let layers = first(r)[0].theta_per_layer.len();
        for l in 0..layers {
            let mut color = mode_color(r.mode);
            let shade = 1.0 - 0.5 * l as f64 / layers.max(2) as f64;
            color = RGBColor(
                (color.0 as f64 * shade) as u8,
                (color.1 as f64 * shade) as u8,
                (color.2 as f64 * shade) as u8,
            );
            theta.push(Series {
                label: format!("{} layer {l}", r.mode.name()),
                color,
                points: first(r)
                    .iter()
                    .map(|m| (m.step as f64, m.theta_per_layer[l]))
                    .collect(),
                dots: false,
            });
        }
    }
    line_chart(
        &out.join("theta.png"),
        "DRN scale theta per layer (seed 0)",
        ("optimizer step", "theta"),
        &theta,
        None,
    )?;
    if results.iter().any(|r| !r.by_difficulty.is_empty()) {
        line_chart(
            &out.join("experts_by_difficulty.png"),
            "activated experts by difficulty of the predicted token (validation)",
            ("difficulty (bits)", "mean activated experts"),
            &per_mode(
                &|r| {
                    r.by_difficulty
                        .iter()
                        .map(|b| (b.difficulty_bits, b.mean_active))
                        .collect()
                },
                true,
            ),
            Some((target, "target T")),
        )?;
    }
    if let Some(dtopp) = results
        .iter()
        .find(|r| r.mode == RoutingMode::Dtopp && !r.by_class.is_empty())
    {
        // Where DTop-p spends its experts: one line per class of the predicted token.
        const CLASS_COLORS: [RGBColor; 4] = [
            RGBColor(120, 120, 120),
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(214, 39, 40),
        ];
        let series: Vec<Series> = dtopp
            .by_class
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                label: c.class.clone(),
                color: CLASS_COLORS[i % CLASS_COLORS.len()],
                points: c
                    .active_per_layer
                    .iter()
                    .enumerate()
                    .map(|(l, &k)| (l as f64, k))
                    .collect(),
                dots: true,
            })
            .collect();
        line_chart(
            &out.join("experts_by_class.png"),
            "dtopp: activated experts per layer by class of the predicted token (validation)",
            ("MoE layer (0 = shallowest)", "mean activated experts"),
            &series,
            Some((target, "target T")),
        )?;
    }
    Ok(())
}

/// One run's curve in [`draw_loss_against_compute`]: its label, mode and
/// `(mean active experts, validation loss)` points.
#[derive(Clone, Debug)]
pub struct ComputeCurve {
    /// The legend's text.
    pub label: String,
    /// The run's routing mode (its colour).
    pub mode: RoutingMode,
    /// `(active experts, loss)`, in any order.
    pub points: Vec<(f64, f64)>,
}

/// `dtopp eval`'s plot: validation loss against mean active experts per token, one curve
/// per run (two runs of one mode get darker shades of its colour).
pub fn draw_loss_against_compute(path: &Path, curves: &[ComputeCurve]) -> Result<()> {
    let mut seen: Vec<RoutingMode> = Vec::new();
    let series: Vec<Series> = curves
        .iter()
        .map(|c| {
            let repeats = seen.iter().filter(|&&m| m == c.mode).count();
            seen.push(c.mode);
            let RGBColor(r, g, b) = mode_color(c.mode);
            let shade = |v: u8| (f64::from(v) * 0.7f64.powi(repeats as i32)) as u8;
            let mut points = c.points.clone();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: c.label.clone(),
                color: RGBColor(shade(r), shade(g), shade(b)),
                points,
                dots: true,
            }
        })
        .collect();
    line_chart(
        path,
        "Validation loss against compute chosen at inference",
        ("mean active experts per token", "validation loss (nats)"),
        &series,
        None,
    )
}
