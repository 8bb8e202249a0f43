//! Compute chosen at inference time. DTop-p's threshold is a control input, so the same
//! weights can run at another mean number of active experts `T'` without retraining: the
//! threshold that gives `T'` is found on a calibration slice by bisection, since the
//! number of experts a token takes never falls as `p` rises. For Top-k the knob is `k`.

use serde::Serialize;

use super::run::TrainedRun;
use crate::error::{Error, Result};
use crate::model::{RoutingBackend, Selector};
use crate::train::{Batch, evaluate};

/// How many experts the MoE layers take.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compute {
    /// Top-k with this `k` in every layer.
    TopK(usize),
    /// Top-p at these thresholds, one per MoE layer.
    Thresholds(Vec<f64>),
}

impl Compute {
    /// One selector per MoE layer (`k_max` caps Top-p).
    pub fn selectors(&self, layers: usize, k_max: Option<usize>) -> Vec<Selector> {
        match self {
            Compute::TopK(k) => vec![Selector::TopK(*k); layers],
            Compute::Thresholds(p) => p
                .iter()
                .map(|&p| Selector::TopP {
                    threshold: p as f32,
                    k_max,
                })
                .collect(),
        }
    }

    /// A short description for tables: `k = 4`, `p = 0.4312` (the mean over layers when
    /// they differ).
    pub fn describe(&self) -> String {
        match self {
            Compute::TopK(k) => format!("k = {k}"),
            Compute::Thresholds(p) if p.windows(2).all(|w| w[0] == w[1]) => {
                format!("p = {:.4}", p[0])
            }
            Compute::Thresholds(p) => format!(
                "p = {:.4} (mean of {})",
                p.iter().sum::<f64>() / p.len() as f64,
                p.len()
            ),
        }
    }
}

/// Validation batches a target is calibrated on by default (8 batches of the tiny
/// preset put `a_t` within 0.5% of `T'` on 16 evaluated batches; 2 left it at +4.8%).
pub const CALIBRATION_BATCHES: usize = 8;

/// Bisection stops when the calibration slice's `a_t` is this close to `T'`, relative.
const CALIBRATION_TOLERANCE: f64 = 0.002;
/// Bisection steps at most (`p` to about 1e-7).
const CALIBRATION_STEPS: usize = 24;

/// The compute found for a target `T'`.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibrated {
    /// The target.
    pub target: f64,
    /// The setting that gives it.
    pub compute: Compute,
    /// Mean active experts it gives on the calibration slice.
    pub active: f64,
    /// Forward passes the search took.
    pub passes: usize,
}

/// The compute that activates `target` experts per token on average over the MoE layers
/// of `run` on `batches`: `k = T'` for a Top-k run (a whole number), otherwise one
/// threshold for every layer, by bisection. A target outside `[1, E]` (or above the
/// run's `k_max`) or one that `p = 1` cannot reach is an error saying so.
pub fn calibrate<B: RoutingBackend>(
    run: &TrainedRun<B>,
    batches: &[Batch],
    target: f64,
) -> Result<Calibrated> {
    let experts = run.config.model.experts;
    let cap = run.config.routing.k_max.unwrap_or(experts);
    if !(target.is_finite() && (1.0..=cap as f64).contains(&target)) {
        return Err(Error::param(
            "--target",
            target,
            format!(
                "a mean number of active experts in [1, {cap}] ({})",
                if cap < experts {
                    format!("the run's k_max = {cap}")
                } else {
                    format!("E = {experts}")
                }
            ),
        ));
    }
    let device = run.model.embed.device();
    let active_at = |compute: &Compute| -> Result<f64> {
        let plan = run.plan(compute);
        let eval = evaluate(&run.model, batches, &plan, &device)?;
        Ok(eval.mean_active())
    };
    if !run.mode().uses_threshold() {
        if target.fract() != 0.0 {
            return Err(Error::param(
                "--target",
                target,
                "a whole number of experts for a Top-k run (its compute knob is k)",
            ));
        }
        let compute = Compute::TopK(target as usize);
        return Ok(Calibrated {
            target,
            active: active_at(&compute)?,
            compute,
            passes: 1,
        });
    }
    let layers = run.moe_layers();
    let at = |p: f64| Compute::Thresholds(vec![p; layers]);
    let top = active_at(&at(1.0))?;
    let close = |a: f64| (a - target).abs() <= CALIBRATION_TOLERANCE * target;
    if top < target && !close(top) {
        return Err(Error::param(
            "--target",
            target,
            format!(
                "at most {top:.3} active experts, which is what p = 1 gives this model: its routing puts the rest of the mass below f32's resolution"
            ),
        ));
    }
    // The best of the points tried, by distance to the target.
    let mut best = (1.0, top);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut passes = 1;
    while passes <= CALIBRATION_STEPS && !close(best.1) {
        let p = 0.5 * (lo + hi);
        let a = active_at(&at(p))?;
        passes += 1;
        if (a - target).abs() < (best.1 - target).abs() {
            best = (p, a);
        }
        if a < target {
            lo = p;
        } else {
            hi = p;
        }
    }
    Ok(Calibrated {
        target,
        compute: at(best.0),
        active: best.1,
        passes,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::backend::NdArray;
    use burn::module::Param;
    use burn::tensor::Tensor;

    use super::{Compute, calibrate};
    use crate::infer::TrainedRun;
    use crate::model::{ModelConfig, MoeLanguageModel};
    use crate::rng::SplitMix64;
    use crate::train::{Batch, PolicyState, Preset, RoutingMode};

    type B = NdArray;

    fn run(mode: RoutingMode) -> TrainedRun<B> {
        let mut config = Preset::Tiny.config();
        config.model = ModelConfig {
            vocab: 50,
            d_model: 16,
            layers: 2,
            heads: 2,
            seq_len: 16,
            experts: 9,
            expert_hidden: 8,
            moe_every: 1,
            dense_hidden: 8,
            rope_theta: 10_000.0,
            init_std: 0.5,
        };
        config.data.synthetic.vocab = 50;
        config.routing.mode = mode;
        let device = Default::default();
        TrainedRun {
            dir: PathBuf::from("test-run"),
            model: MoeLanguageModel::new(&config.model, 5, &device).unwrap(),
            config,
            checkpoint: PathBuf::from("test-run/checkpoints/step-00000001.ckpt"),
            step: 1,
            skipped: Vec::new(),
            policy: PolicyState::Fixed(vec![0.5, 0.5]),
        }
    }

    fn batches() -> Vec<Batch> {
        let mut rng = SplitMix64::new(3);
        let tokens = |rng: &mut SplitMix64| (0..4 * 16).map(|_| rng.below(50) as i64).collect();
        vec![Batch {
            batch: 4,
            seq_len: 16,
            inputs: tokens(&mut rng),
            targets: tokens(&mut rng),
            difficulty: None,
            classes: None,
        }]
    }

    #[test]
    fn bisection_finds_each_target_and_top_k_sets_k() {
        let dtopp = run(RoutingMode::Dtopp);
        for target in [1.0, 2.5, 4.0, 7.0] {
            let found = calibrate(&dtopp, &batches(), target).unwrap();
            assert!(
                (found.active - target).abs() <= 0.02 * target,
                "T' = {target}: {found:?}"
            );
            assert!(matches!(found.compute, Compute::Thresholds(ref p) if p.len() == 2));
        }
        let topk = run(RoutingMode::Topk);
        let found = calibrate(&topk, &batches(), 3.0).unwrap();
        assert_eq!((found.compute, found.active), (Compute::TopK(3), 3.0));
        let err = calibrate(&topk, &batches(), 2.5).unwrap_err().to_string();
        assert!(err.contains("whole number"), "{err}");
        for bad in [0.5, 10.0, f64::NAN] {
            let err = calibrate(&dtopp, &batches(), bad).unwrap_err().to_string();
            assert!(err.contains("[1, 9]"), "{err}");
        }
    }

    #[test]
    fn a_target_p_cannot_reach_is_refused() {
        // theta = 1000 makes every router row one-hot in f32: p = 1 takes one expert.
        let mut peaked = run(RoutingMode::Dtopp);
        let device = Default::default();
        for block in &mut peaked.model.blocks {
            if let Some(moe) = block.moe.as_mut() {
                moe.theta = Param::from_tensor(Tensor::<B, 1>::from_floats([1000.0], &device));
            }
        }
        let err = calibrate(&peaked, &batches(), 3.0).unwrap_err().to_string();
        assert!(err.contains("what p = 1 gives"), "{err}");
    }
}
