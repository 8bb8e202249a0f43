//! `dtopp eval`: a trained run's validation loss at the compute it was trained with and at
//! other compute settings (targets `T'`, found by calibration, or given thresholds).

use std::path::PathBuf;

use serde::Serialize;

use super::compute::{Compute, calibrate};
use super::run::TrainedRun;
use crate::error::{Error, Result};
use crate::model::RoutingBackend;
use crate::train::{Batch, RoutingMode, evaluate};

/// What to evaluate beside the trained setting.
#[derive(Clone, Debug, Default)]
pub struct SweepRequest {
    /// Targets `T'` (mean active experts per token), each calibrated.
    pub targets: Vec<f64>,
    /// Thresholds `p` applied to every layer (Top-p runs only).
    pub thresholds: Vec<f64>,
}

/// One compute setting, evaluated.
#[derive(Clone, Debug, Serialize)]
pub struct EvalPoint {
    /// `trained`, `target` or `threshold`.
    pub setting: &'static str,
    /// `T'` where the point was calibrated to one.
    pub target: Option<f64>,
    /// Top-k's `k` or the thresholds.
    pub compute: Compute,
    /// Mean active experts per token on the calibration slice (targets only).
    pub calibration_active: Option<f64>,
    /// Mean active experts per token over the MoE layers, on the evaluation tokens.
    pub active: f64,
    /// The same per MoE layer.
    pub active_per_layer: Vec<f64>,
    /// Mean cross-entropy (nats per token).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Model FLOPs of one token's forward pass at this compute.
    pub flops_per_token: f64,
}

/// `eval.json`: one run's evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The run directory.
    pub run: PathBuf,
    /// The checkpoint evaluated.
    pub checkpoint: PathBuf,
    /// Its step.
    pub step: u64,
    /// The run's routing mode.
    pub mode: RoutingMode,
    /// The run's training target `T`.
    pub trained_target: f64,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Where the evaluation tokens came from.
    pub data: String,
    /// Tokens evaluated per point.
    pub tokens: u64,
    /// Tokens of the calibration slice (disjoint from the evaluation tokens).
    pub calibration_tokens: u64,
    /// The trained setting first, then the sweep in the order asked.
    pub points: Vec<EvalPoint>,
}

/// Evaluates `run` on `batches` at its trained compute and at each setting of `request`,
/// calibrating targets on `calibration`. `progress` hears each point as it is done.
pub fn evaluate_sweep<B: RoutingBackend>(
    run: &TrainedRun<B>,
    batches: &[Batch],
    calibration: &[Batch],
    request: &SweepRequest,
    data: String,
    mut progress: impl FnMut(&EvalPoint),
) -> Result<EvalReport> {
    if !request.thresholds.is_empty() && !run.mode().uses_threshold() {
        return Err(Error::param(
            "--threshold",
            request.thresholds[0],
            "a Top-p run: this run routes Top-k (vary k with --target)",
        ));
    }
    for &p in &request.thresholds {
        crate::ops::check_threshold(p as f32)
            .map_err(|_| Error::param("--threshold", p, "a threshold p in (0, 1]"))?;
    }
    let device = run.model.embed.device();
    let point = |setting, target, calibration_active, compute: Compute| -> Result<EvalPoint> {
        let eval = evaluate(&run.model, batches, &run.plan(&compute), &device)?;
        let active = eval.mean_active();
        Ok(EvalPoint {
            setting,
            target,
            calibration_active,
            flops_per_token: run.config.model.inference_flops_per_token(active),
            compute,
            active,
            active_per_layer: eval.active_per_layer,
            perplexity: eval.loss.exp(),
            loss: eval.loss,
        })
    };
    let mut points = Vec::new();
    let mut push = |p: EvalPoint| {
        progress(&p);
        points.push(p);
    };
    push(point("trained", None, None, run.trained_compute())?);
    for &target in &request.targets {
        let found = calibrate(run, calibration, target)?;
        push(point(
            "target",
            Some(target),
            Some(found.active),
            found.compute,
        )?);
    }
    for &p in &request.thresholds {
        push(point(
            "threshold",
            None,
            None,
            Compute::Thresholds(vec![p; run.moe_layers()]),
        )?);
    }
    let tokens = |b: &[Batch]| b.iter().map(|b| (b.batch * b.seq_len) as u64).sum();
    Ok(EvalReport {
        run: run.dir.clone(),
        checkpoint: run.checkpoint.clone(),
        step: run.step,
        mode: run.mode(),
        trained_target: run.config.routing.target,
        experts: run.config.model.experts,
        data,
        tokens: tokens(batches),
        calibration_tokens: tokens(calibration),
        points,
    })
}
