//! What a controller run is judged by: when `a_t` locks to `T`, and how tightly it stays.

use serde::{Deserialize, Serialize};

/// The band around `T` that counts as locked: ±2%.
pub const SETTLE_BAND: f64 = 0.02;

/// Settling is judged on the running mean of `a_t` over this many steps: a single step's
/// `a_t` carries sampling noise from a finite batch (std ~0.09 for 2048 token-layers at
/// E=64, T=8) that no controller can remove, while its mean is what sets the compute.
pub const SETTLE_WINDOW: usize = 10;

/// Mean and population standard deviation (`0, 0` for no values).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Statistics of an `a_t` trajectory against its target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrackingSummary {
    /// Steps recorded.
    pub steps: usize,
    /// First step from which the running mean of `a_t` (over [`SETTLE_WINDOW`] steps)
    /// stays within ±2% of `T` to the end; `None` if never.
    pub settled_at: Option<usize>,
    /// The same judged on every single step's raw `a_t`.
    pub settled_at_raw: Option<usize>,
    /// First step of the window the statistics below cover: `settled_at`, or the second
    /// half of the run when `a_t` never settled.
    pub window_start: usize,
    /// Mean of `a_t` over the window.
    pub mean: f64,
    /// Standard deviation of `a_t` over the window.
    pub std: f64,
    /// Largest `a_t - T` after `a_t` first reached the band (0 if it never overshot).
    pub overshoot: f64,
}

impl TrackingSummary {
    /// Summarises `a_t` (`active`) against the per-step targets (`targets`, same length).
    /// Settling is judged against each step's own target, so a step change in `T` must
    /// be followed.
    pub fn of(active: &[f64], targets: &[f64]) -> Self {
        let steps = active.len();
        let smooth: Vec<f64> = (0..steps)
            .map(|t| {
                let from = (t + 1).saturating_sub(SETTLE_WINDOW);
                active[from..=t].iter().sum::<f64>() / (t + 1 - from) as f64
            })
            .collect();
        let inside = |a: &[f64], t: usize| (a[t] - targets[t]).abs() <= SETTLE_BAND * targets[t];
        let settled = |a: &[f64]| (0..steps).rev().take_while(|&t| inside(a, t)).last();
        let settled_at = settled(&smooth);
        let settled_at_raw = settled(active);
        let window_start = settled_at.unwrap_or(steps / 2);
        let (mean, std) = mean_std(&active[window_start.min(steps)..]);
        let first_reach = (0..steps).find(|&t| inside(active, t));
        let overshoot = first_reach.map_or(0.0, |t0| {
            (t0..steps)
                .map(|t| active[t] - targets[t])
                .fold(0.0f64, f64::max)
        });
        Self {
            steps,
            settled_at,
            settled_at_raw,
            window_start,
            mean,
            std,
            overshoot,
        }
    }
}
