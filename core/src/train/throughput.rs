//! `dtopp bench train`: training throughput of a config on a backend — tokens/s, model
//! FLOPs utilisation and peak memory — measured on real optimizer steps (forward,
//! backward, AdamW, controller), nothing written to disk.

use std::time::Instant;

use crate::model::TrainingBackend;
use serde::Serialize;

use super::config::TrainConfig;
use super::memory_estimate::MemoryEstimate;
use super::session::TrainSession;
use crate::error::{Error, Result};
use crate::host_reads;
use crate::model::{ExpertLayout, PaddedUsage};

/// What a throughput run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Routing mode.
    pub mode: String,
    /// Total parameters.
    pub parameters: usize,
    /// Tokens per optimizer step.
    pub tokens_per_step: usize,
    /// Timed steps (after the warm-up).
    pub steps: usize,
    /// Median wall time of a step, seconds.
    pub median_step_s: f64,
    /// Tokens per second at the median step.
    pub tokens_per_sec: f64,
    /// Mean activated experts per token over the timed steps (`a_t`).
    pub active_experts: f64,
    /// Model FLOPs per token at that `a_t` ([`crate::model::ModelConfig::training_flops_per_token`]).
    pub flops_per_token: f64,
    /// Achieved model TFLOP/s.
    pub model_tflops: f64,
    /// `model_tflops / peak`, when a peak was given.
    pub mfu: Option<f64>,
    /// Peak memory in bytes and what it is (process RSS, device memory in use).
    pub peak_memory_bytes: Option<u64>,
    /// How `peak_memory_bytes` was measured.
    pub peak_memory_kind: String,
    /// What the run was estimated to need before it started
    /// ([`super::MemoryEstimate::total`]), bytes: compare with the measured peak.
    pub memory_estimate_bytes: f64,
    /// Final training loss (sanity: the steps really trained).
    pub last_loss: f64,
    /// Reads of the backend's results by the host per timed optimizer step, counted
    /// ([`crate::host_reads`]): each is a wait for the device.
    pub host_reads_per_step: f64,
    /// The layout of the experts' rows (`exact`, `padded`, `grouped`).
    pub layout: String,
    /// Expert rows the experts' products computed per route, warm-up included: 1.00 is
    /// no padding computed (the exact and grouped layouts), `E C / routes` padded.
    pub expert_rows_per_route: f64,
    /// In the padded layout (`--layout padded`): micro-batches run again
    /// because their step outgrew its buffers, and rows computed per route (warm-up
    /// included).
    pub padded: Option<PaddedUsage>,
}

/// How a throughput run is timed.
#[derive(Clone, Copy, Debug)]
pub struct ThroughputPlan {
    /// Untimed steps first (compilation, autotuning, allocator growth).
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// The device's peak TFLOP/s, to turn the achieved FLOP rate into MFU.
    pub peak_tflops: Option<f64>,
}

/// How peak memory is read on a backend.
pub struct MemoryProbe<'a> {
    /// What the number is (process RSS, device memory in use, not measured).
    pub kind: &'a str,
    /// Bytes now, or `None` where the backend cannot tell.
    pub sample: &'a dyn Fn() -> Option<u64>,
}

impl std::fmt::Debug for MemoryProbe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind)
    }
}

/// Measures the optimizer steps `plan` asks for on `config`. `memory` is sampled after
/// every step and the largest value kept.
pub fn measure_throughput<B: TrainingBackend>(
    config: &TrainConfig,
    device: &B::Device,
    layout: ExpertLayout,
    plan: ThroughputPlan,
    memory: MemoryProbe,
    progress: &dyn Fn(String),
) -> Result<Throughput> {
    let ThroughputPlan {
        warmup,
        steps,
        peak_tflops,
    } = plan;
    if steps == 0 {
        return Err(Error::param("--steps", 0, "at least 1 timed step"));
    }
    if let Some(peak) = peak_tflops
        && !(peak.is_finite() && peak > 0.0)
    {
        return Err(Error::param("--peak-tflops", peak, "a finite value > 0"));
    }
    let mut config = config.clone();
    // Every step is a training step: no evaluation, samples or checkpoints in between.
    // One step more than are run: the run's last step also evaluates, which no timed
    // step should.
    config.run.steps = (warmup + steps + 1) as u64;
    config.run.eval_every = 0;
    config.run.eval_batches = 1;
    config.run.sample_every = 0;
    config.validate()?;
    super::trainer::check_backend::<B>(&config, device)?;
    let mut session = TrainSession::<B>::new(&config, device, layout)?;
    let mut times = Vec::with_capacity(steps);
    let mut reads = 0;
    let (mut active, mut last_loss, mut peak_memory) = (0.0, f64::NAN, (memory.sample)());
    for i in 0..warmup + steps {
        let start = Instant::now();
        let reads_before = host_reads::total();
        // The step reads its losses back, so it has finished on the device when it returns.
        let output = session.step()?;
        let elapsed = start.elapsed().as_secs_f64();
        let step_reads = host_reads::total() - reads_before;
        peak_memory = peak_memory.max((memory.sample)());
        let timed = i >= warmup;
        if timed {
            times.push(elapsed);
            reads += step_reads;
            active += output.metrics.active_experts / steps as f64;
        }
        last_loss = output.metrics.loss;
        progress(format!(
            "{} step {}/{}: {elapsed:.3} s, loss {:.4}, a_t {:.3}",
            if timed { "timed" } else { "warm-up" },
            i + 1,
            warmup + steps,
            output.metrics.loss,
            output.metrics.active_experts
        ));
    }
    times.sort_by(f64::total_cmp);
    let median_step_s = times[times.len() / 2];
    let tokens_per_step = config.tokens_per_step();
    let tokens_per_sec = tokens_per_step as f64 / median_step_s;
    let flops_per_token = config.model.training_flops_per_token(active);
    let model_tflops = flops_per_token * tokens_per_sec / 1e12;
    Ok(Throughput {
        mode: config.routing.mode.name().to_string(),
        parameters: config.model.parameters(),
        tokens_per_step,
        steps,
        median_step_s,
        tokens_per_sec,
        active_experts: active,
        flops_per_token,
        model_tflops,
        mfu: peak_tflops.map(|peak| model_tflops / peak),
        peak_memory_bytes: peak_memory,
        peak_memory_kind: memory.kind.to_string(),
        memory_estimate_bytes: MemoryEstimate::of(&config, 1).total(),
        last_loss,
        host_reads_per_step: reads as f64 / steps as f64,
        layout: layout.name().to_string(),
        expert_rows_per_route: session
            .padded_usage()
            .and_then(|u| u.rows_per_route())
            .unwrap_or(1.0),
        padded: session.padded_usage(),
    })
}

/// The process's peak resident memory (`VmHWM`, Linux), in bytes.
pub fn process_peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
