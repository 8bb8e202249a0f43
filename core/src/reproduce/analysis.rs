//! From runs to numbers: per mode, over seeds, the statistics the report and plots show.

use crate::sim::mean_std;
use crate::train::{
    ClassBucket, DifficultyBucket, RoutingMode, RunSummary, StepMetrics, TrainConfig,
};

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
    /// The same per layer: standard deviation over seeds.
    pub active_per_layer_std: Vec<f64>,
    /// On `synthetic:reasoning`: validation loss and experts per token class, over seeds.
    pub by_class: Vec<ClassResult>,
    /// Activated experts by token difficulty (synthetic corpus), mean over seeds.
    pub by_difficulty: Vec<DifficultyBucket>,
}

/// One token class of `synthetic:reasoning` in one mode, over seeds.
#[derive(Clone, Debug)]
pub struct ClassResult {
    /// The class's name.
    pub class: String,
    /// Validation positions of the class, per seed (the same windows in every mode).
    pub tokens: u64,
    /// Validation loss of the class: mean and standard deviation over seeds.
    pub loss: (f64, f64),
    /// Activated experts per token over all MoE layers: mean and std over seeds.
    pub active: (f64, f64),
    /// Activated experts per MoE layer, mean over seeds.
    pub active_per_layer: Vec<f64>,
}

/// A per-seed difference between two modes trained on the same weights and windows
/// (or two quantities of one run): its mean and standard error over seeds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    /// Mean of the per-seed differences.
    pub mean: f64,
    /// Standard error of that mean (sample standard deviation / sqrt(n)); `NaN` for
    /// fewer than two seeds.
    pub se: f64,
    /// Seeds paired.
    pub n: usize,
}

/// Where a paired difference stands against zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Beyond 2 standard errors, on the side the claim predicts.
    Reproduced,
    /// Beyond 2 standard errors, on the other side.
    Refuted,
    /// Within 2 standard errors of zero, or fewer than two seeds.
    Undetermined,
}

impl Paired {
    /// Pairs `diffs` (one per seed).
    pub fn of(diffs: &[f64]) -> Self {
        let n = diffs.len();
        let mean = diffs.iter().sum::<f64>() / n.max(1) as f64;
        let se = if n < 2 {
            f64::NAN
        } else {
            let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        };
        Self { mean, se, n }
    }

    /// `a(run) - b(run)` for every seed both modes ran.
    pub fn between(a: &ModeResult, b: &ModeResult, f: impl Fn(&RunRecord) -> f64) -> Self {
        let diffs: Vec<f64> = a
            .runs
            .iter()
            .filter_map(|ra| {
                let rb = b.runs.iter().find(|rb| rb.seed == ra.seed)?;
                Some(f(ra) - f(rb))
            })
            .collect();
        Self::of(&diffs)
    }

    /// The verdict on a claim that predicts a positive difference. A difference of
    /// exactly zero in every seed (identical runs) proves nothing either way.
    pub fn verdict(&self) -> Verdict {
        if self.n < 2 || !self.se.is_finite() || (self.se == 0.0 && self.mean == 0.0) {
            Verdict::Undetermined
        } else if self.mean > 2.0 * self.se {
            Verdict::Reproduced
        } else if self.mean < -2.0 * self.se {
            Verdict::Refuted
        } else {
            Verdict::Undetermined
        }
    }

    /// `+0.0123 ± 0.0040 (n = 3)`.
    pub fn text(&self) -> String {
        if self.se.is_finite() {
            format!("{:+.4} ± {:.4} (SE, n = {})", self.mean, self.se, self.n)
        } else {
            format!("{:+.4} (n = {}, no spread)", self.mean, self.n)
        }
    }
}

/// A run's validation bucket of one class, if it has one.
fn class_bucket<'a>(run: &'a RunRecord, class: &str) -> Option<&'a ClassBucket> {
    run.summary.by_class.iter().find(|c| c.class == class)
}

/// A run's validation loss of one class (`NaN` if the run has no such class).
pub fn class_loss(run: &RunRecord, class: &str) -> f64 {
    class_bucket(run, class).map_or(f64::NAN, |c| c.loss)
}

/// A run's activated experts per token of one class (`NaN` if it has no such class).
pub fn class_active(run: &RunRecord, class: &str) -> f64 {
    class_bucket(run, class).map_or(f64::NAN, |c| c.mean_active)
}

/// A run's mean `k` of its deeper half of MoE layers minus its shallower half (the
/// middle layer of an odd count in neither).
pub fn depth_gradient(run: &RunRecord) -> f64 {
    let k = &run.summary.final_active_per_layer;
    let half = k.len() / 2;
    if half == 0 {
        return f64::NAN;
    }
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    mean(&k[k.len() - half..]) - mean(&k[..half])
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
    let (active_per_layer, active_per_layer_std) = (0..layers)
        .map(|l| {
            mean_std(
                &runs
                    .iter()
                    .map(|r| r.summary.final_active_per_layer[l])
                    .collect::<Vec<_>>(),
            )
        })
        .unzip();
    let by_class = runs[0]
        .summary
        .by_class
        .iter()
        .map(|first| {
            let of =
                |f: &dyn Fn(&RunRecord) -> f64| mean_std(&runs.iter().map(f).collect::<Vec<_>>());
            ClassResult {
                class: first.class.clone(),
                tokens: first.tokens,
                loss: of(&|r| class_loss(r, &first.class)),
                active: of(&|r| class_active(r, &first.class)),
                active_per_layer: (0..first.mean_active_per_layer.len())
                    .map(|l| {
                        of(&|r| {
                            class_bucket(r, &first.class)
                                .map_or(f64::NAN, |c| c.mean_active_per_layer[l])
                        })
                        .0
                    })
                    .collect(),
            }
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
        active_per_layer_std,
        by_class,
        by_difficulty,
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_differences_judge_at_two_standard_errors() {
        // Mean 0.02, sample std 0.01, n = 3: SE = 0.00577, 2 SE = 0.0115.
        let p = Paired::of(&[0.01, 0.02, 0.03]);
        assert!((p.mean - 0.02).abs() < 1e-12);
        assert!((p.se - 0.01 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(p.verdict(), Verdict::Reproduced);
        assert_eq!(
            Paired::of(&[-0.01, -0.02, -0.03]).verdict(),
            Verdict::Refuted
        );
        // Mean 0.01 against SE 0.0173: inside 2 SE.
        assert_eq!(
            Paired::of(&[-0.01, 0.0, 0.04]).verdict(),
            Verdict::Undetermined
        );
        // One seed has no spread; identical runs prove nothing.
        assert_eq!(Paired::of(&[0.5]).verdict(), Verdict::Undetermined);
        assert!(Paired::of(&[0.5]).text().contains("no spread"));
        assert_eq!(Paired::of(&[0.0, 0.0]).verdict(), Verdict::Undetermined);
        // The same difference in every seed is beyond any spread.
        assert_eq!(Paired::of(&[0.1, 0.1]).verdict(), Verdict::Reproduced);
    }
}
