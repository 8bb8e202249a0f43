//! `dtopp simulate`: the controller in closed loop on synthetic router logits. The
//! quickest way to see DTop-p lock the activated-expert count to its target.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};

use super::Backend;
use crate::controller::{
    ControllerConfig, DEFAULT_KI, DEFAULT_KP, DEFAULT_P_MAX, DEFAULT_P_MIN, ThresholdScope,
};
use crate::cpu::CpuReference;
use crate::cpu_fast::CpuFast;
use crate::error::{Error, Result};
use crate::ops::RoutingOps;
use crate::sim::{
    SETTLE_BAND, SETTLE_WINDOW, SimConfig, SimMode, SimOutcome, StepRecord, StreamConfig,
    run_simulation,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ModeArg {
    /// Top-p with the PI controller moving the threshold.
    Dtopp,
    /// Top-p with a fixed threshold (calibrated to T on the first batch unless given).
    Topp,
    /// Top-k with k = T.
    Topk,
}

#[derive(Debug, Args)]
pub(crate) struct SimulateArgs {
    /// Selection mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Dtopp)]
    mode: ModeArg,
    /// E, experts per layer.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// T, target mean activated experts per token.
    #[arg(long, default_value_t = 8.0)]
    target: f64,
    /// L, MoE layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// N, tokens per step and layer.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Steps to run.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Fixed p (topp) or initial p_0 (dtopp); default: calibrated to T on the first batch.
    #[arg(long)]
    threshold: Option<f64>,
    /// Proportional gain Kp.
    #[arg(long, default_value_t = DEFAULT_KP, allow_negative_numbers = true)]
    kp: f64,
    /// Integral gain Ki.
    #[arg(long, default_value_t = DEFAULT_KI, allow_negative_numbers = true)]
    ki: f64,
    /// Lower clamp of p.
    #[arg(long, default_value_t = DEFAULT_P_MIN)]
    p_min: f64,
    /// Upper clamp of p.
    #[arg(long, default_value_t = DEFAULT_P_MAX)]
    p_max: f64,
    /// One controller per layer instead of one global threshold.
    #[arg(long)]
    per_layer: bool,
    /// Cap on experts per token.
    #[arg(long)]
    k_max: Option<usize>,
    /// DRN scale theta applied to the synthetic logits.
    #[arg(long, default_value_t = 1.0, conflicts_with = "no_drn")]
    theta: f32,
    /// Plain softmax instead of DRN.
    #[arg(long)]
    no_drn: bool,
    /// Base margin of preferred experts (router sharpness at step 0).
    #[arg(long, default_value_t = 3.0)]
    margin: f64,
    /// Scale of the Gaussian noise on every logit (larger: flatter routing, more experts).
    #[arg(long, default_value_t = 1.0)]
    noise: f64,
    /// Relative sharpening of the routers over the run (1.0: the margin doubles).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    drift: f64,
    /// Sudden change of router sharpness: STEP:FACTOR multiplies the margin from STEP on.
    #[arg(long, value_name = "STEP:FACTOR", value_parser = parse_step_value)]
    shock: Option<(u64, f64)>,
    /// Step change of the target: STEP:T sets the target to T from STEP on.
    #[arg(long, value_name = "STEP:T", value_parser = parse_step_value)]
    target_change: Option<(u64, f64)>,
    /// Seed of the synthetic stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Print a progress line every N steps (0: about 20 lines per run).
    #[arg(long, default_value_t = 0)]
    log_every: u64,
    /// Run directory: writes config.toml, metrics.jsonl (one JSON object per step) and
    /// summary.json.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn parse_step_value(s: &str) -> std::result::Result<(u64, f64), String> {
    let (step, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected STEP:VALUE, got {s:?}"))?;
    let step = step
        .trim()
        .parse()
        .map_err(|_| format!("{step:?} is not a step number"))?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    Ok((step, value))
}

impl SimulateArgs {
    fn config(&self) -> Result<SimConfig> {
        let normalization = super::normalization(self.no_drn, self.theta)?;
        let config = SimConfig {
            stream: StreamConfig {
                layers: self.layers,
                tokens: self.tokens,
                experts: self.experts,
                seed: self.seed,
                margin: self.margin,
                noise: self.noise,
                drift: self.drift,
                horizon: self.steps,
                shock: self.shock,
            },
            mode: match self.mode {
                ModeArg::Dtopp => SimMode::Dtopp,
                ModeArg::Topp => SimMode::Topp,
                ModeArg::Topk => SimMode::Topk,
            },
            steps: self.steps,
            controller: ControllerConfig {
                target: self.target,
                num_experts: self.experts,
                kp: self.kp,
                ki: self.ki,
                p_min: self.p_min,
                p_max: self.p_max,
            },
            scope: if self.per_layer {
                ThresholdScope::PerLayer
            } else {
                ThresholdScope::Global
            },
            threshold: self.threshold,
            normalization,
            k_max: self.k_max,
            target_change: self.target_change,
        };
        config.validate()?;
        Ok(config)
    }
}

pub(crate) fn run(args: SimulateArgs) -> Result<()> {
    let config = args.config()?;
    // The backend first: if it cannot start, no run directory is created.
    match args.backend {
        Backend::Cpu => simulate_on(&CpuFast, &args, &config),
        Backend::CpuReference => simulate_on(&CpuReference, &args, &config),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => simulate_on(&super::wgpu_backend()?, &args, &config),
        Backend::Cuda => simulate_on(&super::cuda_backend()?, &args, &config),
    }
}

fn simulate_on<O: RoutingOps>(ops: &O, args: &SimulateArgs, config: &SimConfig) -> Result<()> {
    let mut metrics = match &args.out {
        Some(dir) => Some(open_run_dir(dir, config)?),
        None => None,
    };
    let log_every = if args.log_every == 0 {
        config.steps.div_ceil(20).max(1)
    } else {
        args.log_every
    };
    eprintln!(
        "simulate: mode {}, E={} T={} L={} N={} steps={} on {}",
        config.mode.name(),
        config.stream.experts,
        config.controller.target,
        config.stream.layers,
        config.stream.tokens,
        config.steps,
        args.backend.name()
    );
    let started = Instant::now();
    let on_step = |r: &StepRecord| -> Result<()> {
        if let Some((file, path)) = metrics.as_mut() {
            let line = serde_json::to_string(r)
                .map_err(|e| Error::io("cannot encode", &*path, e.into()))?;
            writeln!(file, "{line}").map_err(|e| Error::io("cannot write", &*path, e))?;
        }
        if (r.step + 1).is_multiple_of(log_every) || r.step == 0 || r.step + 1 == config.steps {
            eprintln!(
                "{}",
                progress_line(r, config.steps, started.elapsed().as_secs_f64())
            );
        }
        Ok(())
    };
    let outcome = run_simulation(ops, config, on_step)?;
    if let Some((file, path)) = metrics.as_mut() {
        file.flush()
            .map_err(|e| Error::io("cannot write", &*path, e))?;
    }
    let summary = summary_text(config, &outcome);
    println!("{summary}");
    if let Some(dir) = &args.out {
        let json = serde_json::json!({
            "mode": config.mode.name(),
            "experts": config.stream.experts,
            "target": config.controller.target,
            "steps": config.steps,
            "settle_band": SETTLE_BAND,
            "settle_window": SETTLE_WINDOW,
            "settled_at": outcome.tracking.settled_at,
            "settled_at_raw": outcome.tracking.settled_at_raw,
            "window_start": outcome.tracking.window_start,
            "mean_active_experts": outcome.tracking.mean,
            "std_active_experts": outcome.tracking.std,
            "overshoot": outcome.tracking.overshoot,
            "final_threshold": outcome.final_threshold,
        });
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        crate::io::write_atomic(&dir.join("summary.json"), text.as_bytes())?;
    }
    Ok(())
}

/// Creates the run directory, writes `config.toml`, and opens `metrics.jsonl`.
fn open_run_dir(
    dir: &std::path::Path,
    config: &SimConfig,
) -> Result<(std::io::BufWriter<std::fs::File>, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create run directory", dir, e))?;
    let toml = toml::to_string(config).map_err(|e| Error::Parse {
        what: "simulation config",
        message: e.to_string(),
    })?;
    crate::io::write_atomic(&dir.join("config.toml"), toml.as_bytes())?;
    let path = dir.join("metrics.jsonl");
    let file = std::fs::File::create(&path).map_err(|e| Error::io("cannot create", &path, e))?;
    Ok((std::io::BufWriter::new(file), path))
}

fn progress_line(r: &StepRecord, steps: u64, elapsed: f64) -> String {
    let done = r.step + 1;
    let eta = elapsed / done as f64 * (steps - done) as f64;
    let mut line = format!(
        "step {done:>6}/{steps}  a_t {:>7.3} (T {})",
        r.active_experts, r.target
    );
    if let Some(p) = r.threshold {
        line += &format!("  p {p:.4}");
    }
    if let (Some(e), Some(i)) = (r.error, r.integral) {
        line += &format!("  e {e:+.5}  I {i:+.4}");
    }
    line + &format!(
        "  {:.0} steps/s  eta {eta:.0}s",
        done as f64 / elapsed.max(1e-9)
    )
}

fn summary_text(config: &SimConfig, outcome: &SimOutcome) -> String {
    let t = &outcome.tracking;
    let band = SETTLE_BAND * 100.0;
    let settled = match t.settled_at {
        Some(s) => {
            format!("a_t ({SETTLE_WINDOW}-step mean) within ±{band:.0}% of T from step {s} on")
        }
        None => format!("a_t ({SETTLE_WINDOW}-step mean) never stayed within ±{band:.0}% of T"),
    };
    let raw = match t.settled_at_raw {
        Some(s) => format!("every single step from step {s} on"),
        None => "not every single step".to_string(),
    };
    let window = if t.settled_at.is_some() {
        "after settling"
    } else {
        "over the second half"
    };
    let threshold = outcome
        .final_threshold
        .map_or("n/a (topk)".to_string(), |p| format!("{p:.4}"));
    format!(
        "summary ({mode}, E={e}, T={target}): {settled} ({raw}); a_t {window}: mean {mean:.3}, std {std:.3}; max overshoot {over:.3}; final p {threshold}",
        mode = config.mode.name(),
        e = config.stream.experts,
        target = config.target_at(config.steps.saturating_sub(1)),
        mean = t.mean,
        std = t.std,
        over = t.overshoot,
    )
}
