//! `dtopp eval RUN_DIR... [--target T'...] [--threshold p...]`: validation loss of trained
//! runs at the compute they were trained with and at compute chosen now, as a table,
//! `eval.json` in each run directory and a plot of loss against active experts.

use std::path::PathBuf;

use clap::Args;

use super::Backend;
use super::inference_backend::{InferenceJob, on_inference_backend};
use crate::error::{Error, Result};
use crate::infer::{EvalPoint, EvalReport, SweepRequest, TrainedRun, evaluate_sweep};
use crate::io::write_atomic;
use crate::model::RoutingBackend;

#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// Run directories of `dtopp train` (each evaluated at its newest intact checkpoint).
    #[arg(value_name = "RUN_DIR", required = true)]
    runs: Vec<PathBuf>,
    /// Evaluation data in place of the run's own validation split: `synthetic`, a text
    /// file or `shards:GLOB`.
    #[arg(long, value_name = "SOURCE")]
    data: Option<String>,
    /// Targets T' (mean active experts per token) to evaluate at; each is calibrated on a
    /// slice of validation batches disjoint from the evaluated ones. Top-k runs: k.
    #[arg(long, value_name = "T", num_args = 1..)]
    target: Vec<f64>,
    /// Thresholds p (every layer) to evaluate at (Top-p runs).
    #[arg(long, value_name = "P", num_args = 1..)]
    threshold: Vec<f64>,
    /// Validation batches evaluated (default: the run's eval_batches, the batches its
    /// trainer evaluated on).
    #[arg(long, value_name = "N")]
    batches: Option<usize>,
    /// Validation batches the targets are calibrated on (after the evaluated ones; 8
    /// batches of the tiny preset put a_t within 0.5% of T' on 16 evaluated batches).
    #[arg(long, value_name = "N", default_value_t = crate::infer::CALIBRATION_BATCHES)]
    calibration_batches: usize,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// The plot of loss against active experts (default: eval.png in the first run).
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Print the reports as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: EvalArgs) -> Result<()> {
    for (flag, n) in [
        ("--batches", args.batches),
        ("--calibration-batches", Some(args.calibration_batches)),
    ] {
        if n == Some(0) {
            return Err(Error::param(flag, 0, "at least 1 batch"));
        }
    }
    let reports = on_inference_backend(args.backend, &args)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("reports serialize")
        );
    }
    #[cfg(feature = "reproduce")]
    {
        let plot = args
            .plot
            .clone()
            .unwrap_or_else(|| args.runs[0].join("eval.png"));
        let curves: Vec<_> = reports
            .iter()
            .map(|r| crate::reproduce::ComputeCurve {
                label: format!("{} ({}, T = {})", r.run.display(), r.mode, r.trained_target),
                mode: r.mode,
                points: r.points.iter().map(|p| (p.active, p.loss)).collect(),
            })
            .collect();
        crate::reproduce::draw_loss_against_compute(&plot, &curves)?;
        eprintln!("plot: {}", plot.display());
    }
    Ok(())
}

impl InferenceJob for &EvalArgs {
    type Output = Vec<EvalReport>;

    fn run<B: RoutingBackend>(
        self,
        device: &B::Device,
        name: &'static str,
    ) -> Result<Vec<EvalReport>> {
        let request = SweepRequest {
            targets: self.target.clone(),
            thresholds: self.threshold.clone(),
        };
        let mut reports = Vec::new();
        for dir in &self.runs {
            let run = TrainedRun::<B>::load(dir, device)?;
            for damaged in &run.skipped {
                eprintln!("skipping a damaged checkpoint: {damaged}");
            }
            let corpus = run.corpus(self.data.as_deref())?;
            let evaluated = self.batches.unwrap_or(run.evaluated_batches());
            let batches = run.validation_batches(&corpus, 0, evaluated)?;
            let calibration =
                run.validation_batches(&corpus, evaluated, self.calibration_batches)?;
            let data = self
                .data
                .clone()
                .unwrap_or_else(|| run.config.data.source.clone());
            if !self.json {
                println!(
                    "{}: {} run (T = {}), step {} ({}), {} on {}; {} tokens of {}",
                    dir.display(),
                    run.mode().name(),
                    run.config.routing.target,
                    run.step,
                    run.checkpoint.display(),
                    routing_name::<B>(device),
                    name,
                    evaluated * run.config.run.batch_size * run.config.model.seq_len,
                    data,
                );
                println!("{}", header(run.moe_layers()));
            }
            let quiet = self.json;
            let report = evaluate_sweep(&run, &batches, &calibration, &request, data, |p| {
                if !quiet {
                    println!("{}", row(p));
                }
            })?;
            let path = dir.join("eval.json");
            write_atomic(
                &path,
                serde_json::to_string_pretty(&report)
                    .expect("report serializes")
                    .as_bytes(),
            )?;
            if !self.json {
                println!("wrote {}\n", path.display());
            }
            reports.push(report);
        }
        Ok(reports)
    }
}

fn routing_name<B: RoutingBackend>(device: &B::Device) -> String {
    format!("routing on {}", B::routing_name(device))
}

fn header(layers: usize) -> String {
    format!(
        "{:<10} {:>18} {:>8} {:>8}  {:<w$} {:>8} {:>8} {:>12}",
        "setting",
        "compute",
        "cal a_t",
        "a_t",
        "a_t per layer",
        "loss",
        "ppl",
        "MFLOP/token",
        w = layers * 6
    )
}

fn row(p: &EvalPoint) -> String {
    let setting = match p.target {
        Some(t) => format!("T' = {t}"),
        None => p.setting.to_string(),
    };
    let per_layer: Vec<String> = p
        .active_per_layer
        .iter()
        .map(|a| format!("{a:5.2}"))
        .collect();
    let per_layer = per_layer.join(" ");
    format!(
        "{:<10} {:>18} {:>8} {:>8.3}  {:<w$} {:>8.4} {:>8.3} {:>12.3}",
        setting,
        p.compute.describe(),
        p.calibration_active
            .map_or("-".into(), |a| format!("{a:.3}")),
        p.active,
        per_layer,
        p.loss,
        p.perplexity,
        p.flops_per_token / 1e6,
        w = p.active_per_layer.len() * 6
    )
}
