//! Colours shared by the views: one per routing mode, one per series, and a ramp for
//! expert counts and loads.

use eframe::egui::Color32;

/// The colour of a routing mode, the same in every view.
pub fn mode_color(mode: &str) -> Color32 {
    match mode {
        "dtopp" => Color32::from_rgb(31, 119, 180),
        "topp" => Color32::from_rgb(255, 127, 14),
        "topk" => Color32::from_rgb(44, 160, 44),
        "dtopp-no-drn" => Color32::from_rgb(148, 103, 189),
        "drn-only" => Color32::from_rgb(140, 86, 75),
        _ => Color32::from_rgb(127, 127, 127),
    }
}

/// Distinct colours for layers or runs.
pub fn series_color(i: usize) -> Color32 {
    const COLORS: [Color32; 8] = [
        Color32::from_rgb(31, 119, 180),
        Color32::from_rgb(255, 127, 14),
        Color32::from_rgb(44, 160, 44),
        Color32::from_rgb(214, 39, 40),
        Color32::from_rgb(148, 103, 189),
        Color32::from_rgb(140, 86, 75),
        Color32::from_rgb(227, 119, 194),
        Color32::from_rgb(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

/// A ramp from pale yellow (`value` at `low`) to dark purple (at `high`), viridis-like.
pub fn count_color(value: f64, low: f64, high: f64) -> Color32 {
    const STOPS: [[f32; 3]; 5] = [
        [253.0, 231.0, 37.0],
        [94.0, 201.0, 98.0],
        [33.0, 145.0, 140.0],
        [59.0, 82.0, 139.0],
        [68.0, 1.0, 84.0],
    ];
    let t = if high > low {
        ((value - low) / (high - low)).clamp(0.0, 1.0) as f32
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let c = |k: usize| (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f).round() as u8;
    Color32::from_rgb(c(0), c(1), c(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_ends_and_clamps() {
        assert_eq!(count_color(1.0, 1.0, 8.0), Color32::from_rgb(253, 231, 37));
        assert_eq!(count_color(8.0, 1.0, 8.0), Color32::from_rgb(68, 1, 84));
        assert_eq!(count_color(100.0, 1.0, 8.0), count_color(8.0, 1.0, 8.0));
        assert_eq!(count_color(3.0, 3.0, 3.0), count_color(1.0, 1.0, 8.0));
    }
}
