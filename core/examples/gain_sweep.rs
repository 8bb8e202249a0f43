//! Measures step responses of the PI controller on the simulator for a grid of gains,
//! and prints the table docs/controller-gains.md is made from.
//!
//!   cargo run --release -p dtopp --example gain_sweep
//!
//! Three scenarios, E = 64 experts, L = 4 layers, N = 512 tokens per layer and step:
//! - target step: T goes 8 -> 12 at step 100 (static routers): settling steps (10-step
//!   mean within ±2% of T) and overshoot after the change;
//! - shock: routers sharpen 1.5x at step 100: steps to recover;
//! - drift: routers sharpen steadily (margin doubles over 600 steps): steady-state error
//!   (mean a_t - T over the second half) and std of a_t there.

use dtopp::controller::{ControllerConfig, ThresholdScope};
use dtopp::cpu::CpuReference;
use dtopp::ops::Normalization;
use dtopp::sim::{SimConfig, SimMode, StreamConfig, TrackingSummary, run_simulation};

const CHANGE: usize = 100;

fn config(
    kp: f64,
    ki: f64,
    steps: u64,
    drift: f64,
    shock: Option<(u64, f64)>,
    change: Option<(u64, f64)>,
) -> SimConfig {
    SimConfig {
        stream: StreamConfig {
            layers: 4,
            tokens: 512,
            experts: 64,
            seed: 7,
            margin: 3.0,
            noise: 1.0,
            drift,
            horizon: steps,
            shock,
        },
        mode: SimMode::Dtopp,
        steps,
        controller: ControllerConfig {
            kp,
            ki,
            ..ControllerConfig::new(8.0, 64)
        },
        scope: ThresholdScope::Global,
        threshold: None,
        normalization: Normalization::Drn { theta: 1.0 },
        k_max: None,
        target_change: change,
    }
}

/// Active experts and targets of one run.
fn trace(c: &SimConfig) -> (Vec<f64>, Vec<f64>) {
    let mut a = Vec::new();
    let mut t = Vec::new();
    run_simulation(&CpuReference, c, |r| {
        a.push(r.active_experts);
        t.push(r.target);
        Ok(())
    })
    .expect("simulation runs");
    (a, t)
}

/// Settling steps after `CHANGE` and overshoot in % of the target.
fn after_change(a: &[f64], t: &[f64]) -> (String, f64) {
    let s = TrackingSummary::of(&a[CHANGE..], &t[CHANGE..]);
    let settle = s.settled_at.map_or("never".to_string(), |x| x.to_string());
    let target = t[CHANGE];
    let over = a[CHANGE..]
        .iter()
        .map(|x| (x - target) / target * 100.0)
        .fold(0.0f64, f64::max);
    (settle, over)
}

fn main() {
    let kps = [0.0, 0.25, 0.5, 1.0, 2.0];
    let kis = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
    println!(
        "| Kp | Ki | T 8->12: settle steps | overshoot % | shock 1.5x: settle steps | drift: mean a_t - T | drift: std a_t |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &kp in &kps {
        for &ki in &kis {
            let (a, t) = trace(&config(kp, ki, 300, 0.0, None, Some((CHANGE as u64, 12.0))));
            let (step_settle, step_over) = after_change(&a, &t);
            let (a, t) = trace(&config(kp, ki, 300, 0.0, Some((CHANGE as u64, 1.5)), None));
            let (shock_settle, _) = after_change(&a, &t);
            let (a, t) = trace(&config(kp, ki, 600, 1.0, None, None));
            let half = &a[300..];
            let bias =
                half.iter().zip(&t[300..]).map(|(x, y)| x - y).sum::<f64>() / half.len() as f64;
            let mean = half.iter().sum::<f64>() / half.len() as f64;
            let std =
                (half.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / half.len() as f64).sqrt();
            println!(
                "| {kp} | {ki} | {step_settle} | {step_over:.1} | {shock_settle} | {bias:+.3} | {std:.3} |"
            );
        }
    }
}
