//! From runs to numbers: per mode, over seeds, the statistics the report and plots show.

use crate::sim::mean_std;
use crate::train::{DifficultyBucket, RoutingMode, RunSummary, StepMetrics, TrainConfig};

/// One finished run.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// Its seed.
    pub seed: u64,
    /// Every step's metrics.
    pub history: Vec<StepMetrics>,
    /// Its summary.
    pub summary: RunSummary,
}

/// One mode over all seeds.
#[derive(Clone, Debug)]
pub struct ModeResult {
    /// The mode.
    pub mode: RoutingMode,
    /// The runs, one per seed.
    pub runs: Vec<RunRecord>,
    /// Final validation loss: mean and standard deviation over seeds.
    pub val_loss: (f64, f64),
    /// Training cross-entropy over the last 10% of steps, mean over seeds.
    pub train_loss: f64,
    /// `a_t` after warm-up (the first 20% of steps): mean over seeds of the per-run mean.
    pub active_mean: f64,
    /// `a_t` after warm-up: mean over seeds of the per-run standard deviation over steps.
    pub active_std: f64,
    /// Per seed: the first step from which the 10-step running mean of `a_t` stays
    /// within ±2% of `T` (`None`: never).
    pub settled_at: Vec<Option<u64>>,
    /// Mean `k` per MoE layer at the end (last 10% of steps), mean over seeds.
    pub active_per_layer: Vec<f64>,
    /// Activated experts by token difficulty (synthetic corpus), mean over seeds.
    pub by_difficulty: Vec<DifficultyBucket>,
}

/// The first step of the warm-up-free window.
pub fn warmup_end(steps: u64) -> u64 {
    steps / 5
}

/// Aggregates one mode's runs.
pub fn summarize_mode(mode: RoutingMode, config: &TrainConfig, runs: Vec<RunRecord>) -> ModeResult {
    let from = warmup_end(config.run.steps);
    let vals: Vec<f64> = runs.iter().map(|r| r.summary.final_val_loss).collect();
    let train: Vec<f64> = runs.iter().map(|r| r.summary.final_train_loss).collect();
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    for r in &runs {
        let after: Vec<f64> = r
            .history
            .iter()
            .filter(|m| m.step > from)
            .map(|m| m.active_experts)
            .collect();
        let (m, s) = mean_std(&after);
        means.push(m);
        stds.push(s);
    }
    let layers = runs[0].summary.final_active_per_layer.len();
    let active_per_layer = (0..layers)
        .map(|l| {
            mean_std(
                &runs
                    .iter()
                    .map(|r| r.summary.final_active_per_layer[l])
                    .collect::<Vec<_>>(),
            )
            .0
        })
        .collect();
    let by_difficulty = runs[0]
        .summary
        .experts_by_difficulty
        .iter()
        .enumerate()
        .map(|(b, first)| {
            let all: Vec<&DifficultyBucket> = runs
                .iter()
                .filter_map(|r| r.summary.experts_by_difficulty.get(b))
                .collect();
            let n = all.len() as f64;
            DifficultyBucket {
                difficulty_bits: first.difficulty_bits,
                tokens: all.iter().map(|d| d.tokens).sum(),
                mean_active: all.iter().map(|d| d.mean_active).sum::<f64>() / n,
                mean_active_per_layer: (0..first.mean_active_per_layer.len())
                    .map(|l| all.iter().map(|d| d.mean_active_per_layer[l]).sum::<f64>() / n)
                    .collect(),
            }
        })
        .collect();
    ModeResult {
        mode,
        val_loss: mean_std(&vals),
        train_loss: mean_std(&train).0,
        active_mean: mean_std(&means).0,
        active_std: mean_std(&stds).0,
        // The trainer's tracking summary judges settling (an index into the run's steps).
        settled_at: runs
            .iter()
            .map(|r| r.summary.tracking.settled_at.map(|t| r.history[t].step))
            .collect(),
        active_per_layer,
        by_difficulty,
        runs,
    }
}
