//! `dtopp train`: a [`TrainSession`] driven to its last step, with the run directory
//! written as it goes (config, metrics, routing samples, summary) and progress lines.

use std::path::Path;

use crate::model::TrainingBackend;

use super::checkpoint::{Checkpoint, latest_checkpoint, write_checkpoint};
use super::config::TrainConfig;
use super::limit_cycle::LimitCycleWatch;
use super::loop_limit::check_loop_limits;
use super::memory_estimate::{MemoryEstimate, check_fits};
use super::session::TrainSession;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::metrics::{JsonLines, RunSummary, StepMetrics};
use crate::model::{DrnBackend, ExpertLayout, RowMovesBackend};

/// Where a run writes and how chatty it is.
#[derive(Debug)]
pub struct TrainOptions<'a> {
    /// The run directory (created; must not already hold a run).
    pub out: &'a Path,
    /// Print the progress lines (stderr).
    pub progress: bool,
    /// The name of the burn backend, for the log.
    pub backend_name: &'a str,
    /// Put before every progress line (empty: nothing), so that runs printing at the
    /// same time can be told apart.
    pub label: &'a str,
}

impl TrainOptions<'_> {
    /// Prints a progress line (when asked to).
    pub(super) fn say(&self, line: String) {
        if !self.progress {
        } else if self.label.is_empty() {
            eprintln!("{line}");
        } else {
            for part in line.lines() {
                eprintln!("[{}] {part}", self.label);
            }
        }
    }
}

/// Trains the model `config` describes on `device`, the experts' rows in `layout`.
pub fn train<B: TrainingBackend>(
    config: &TrainConfig,
    device: &B::Device,
    layout: ExpertLayout,
    options: &TrainOptions,
) -> Result<RunSummary> {
    check_backend::<B>(config, device)?;
    begin_run(config, options)?;
    let session = TrainSession::<B>::new(config, device, layout)?;
    lead(session, options)
}

/// Refuses, before anything is written, `run.precision` where the backend on `device`
/// cannot run it, a vocabulary or micro-batch whose loops would reach the device's
/// shader loop limit, and a run that cannot fit in the device's memory.
pub(super) fn check_backend<B: TrainingBackend>(
    config: &TrainConfig,
    device: &B::Device,
) -> Result<()> {
    config.run.precision.check::<B>(device, &B::name(device))?;
    check_loop_limits::<B>(config, device)?;
    check_fits::<B>(config, device).map(|_| ())
}

/// Checks `config`, creates the run directory (refusing one that holds a run) and
/// writes `config.toml`.
pub(super) fn begin_run(config: &TrainConfig, options: &TrainOptions) -> Result<()> {
    config.validate()?;
    let out = options.out;
    prepare_run_dir(out)?;
    write_atomic(&out.join("config.toml"), config.to_toml()?.as_bytes())?;
    options.say(format!(
        "model: {} parameters ({} blocks, {} MoE layers x {} experts of width {}), d_model {}",
        config.model.parameters(),
        config.model.layers,
        config.model.moe_layers(),
        config.model.experts,
        config.model.expert_hidden,
        config.model.d_model
    ));
    options.say(format!(
        "memory: {} per rank",
        MemoryEstimate::of(config, 1).describe()
    ));
    Ok(())
}

/// Logs how `session` (new, of a run begun by [`begin_run`]) routes, then drives it to
/// the end, writing the run directory.
pub(super) fn lead<B: TrainingBackend>(
    mut session: TrainSession<B>,
    options: &TrainOptions,
) -> Result<RunSummary> {
    let out = options.out;
    let say = |line: String| options.say(line);
    let config = session.config().clone();
    let (run, mode, layout) = (&config.run, config.routing.mode, session.layout());
    say(format!("data: {}", session.corpus().describe()));
    say(format!(
        "ops: attention, experts and their backward: burn {} (autodiff); router {}; dispatch/combine: {}",
        options.backend_name,
        if mode.uses_drn() {
            format!("DRN: {}", <B as DrnBackend>::drn_name())
        } else {
            "softmax: burn tensor ops".to_string()
        },
        <B as RowMovesBackend>::row_moves_name(),
    ));
    say(format!(
        "ops: {} selection and dispatch plan: {}",
        if mode.uses_threshold() {
            "Top-p"
        } else {
            "Top-k"
        },
        layout.describe_on::<B>(session.device())
    ));
    if let Some(p) = session.thresholds() {
        let how = if config.routing.threshold.is_some() {
            "configured"
        } else {
            "calibrated to T on the first batch"
        };
        say(format!(
            "routing: {mode}, T = {}, initial p = {} ({how})",
            config.routing.target,
            fmt_thresholds(&p)
        ));
    } else {
        say(format!("routing: {mode}, k = {}", config.routing.target));
    }
    say(format!(
        "step 0: val loss {:.4}",
        session.initial_val_loss()
    ));

    let mut metrics = JsonLines::create(&out.join("metrics.jsonl"))?;
    let mut samples = JsonLines::create(&out.join("routing_samples.jsonl"))?;
    if run.sample_every > 0 {
        samples.append(&session.routing_sample()?)?;
    }
    run_to_end(&mut session, out, &mut metrics, &mut samples, &say)
}

/// Continues the run in `dir` from its newest intact checkpoint up to `steps` (default:
/// the `run.steps` it was started with). Metrics and routing samples written after that
/// checkpoint (by a process that then crashed) are dropped, so on the CPU backend the
/// continued run's losses equal those of an uninterrupted run exactly.
pub fn resume<B: TrainingBackend>(
    dir: &Path,
    steps: Option<u64>,
    device: &B::Device,
    layout: ExpertLayout,
    options: &TrainOptions,
) -> Result<RunSummary> {
    let point = ResumePoint::prepare(dir, steps, 1, options)?;
    check_backend::<B>(&point.config, device)?;
    let session = TrainSession::<B>::restore(
        &point.config,
        device,
        layout,
        &point.checkpoint,
        point.history,
        None,
    )?;
    continue_run(session, dir, options)
}

/// Where a resumed run continues from, with the run directory made consistent with it.
pub(super) struct ResumePoint {
    /// The run's config (with the new `run.steps`).
    pub config: TrainConfig,
    /// The newest intact checkpoint.
    pub checkpoint: Checkpoint,
    /// The metrics of steps `1..=checkpoint step`.
    pub history: Vec<StepMetrics>,
}

impl ResumePoint {
    /// Reads the run in `dir`, checks it was trained on `devices` devices, finds its
    /// newest intact checkpoint and drops the metrics and samples written after it.
    pub(super) fn prepare(
        dir: &Path,
        steps: Option<u64>,
        devices: usize,
        options: &TrainOptions,
    ) -> Result<Self> {
        let point = Self::read(dir, steps, devices, 1, options)?;
        point.commit(dir)?;
        Ok(point)
    }

    /// [`ResumePoint::prepare`] without writing anything: what every node of a
    /// multi-node run reads (node 0 then commits).
    pub(super) fn read(
        dir: &Path,
        steps: Option<u64>,
        devices: usize,
        nodes: usize,
        options: &TrainOptions,
    ) -> Result<Self> {
        let say = |line: String| options.say(line);
        let mut config = read_run_config(dir)?;
        if let Some(steps) = steps {
            config.run.steps = steps;
        }
        config.validate()?;
        for (flag, given, trained, noun, field) in [
            (
                "--devices",
                devices,
                config.run.devices,
                "device(s)",
                "run.devices, all nodes together",
            ),
            ("--nodes", nodes, config.run.nodes, "node(s)", "run.nodes"),
        ] {
            if given != trained {
                return Err(Error::param(
                    flag,
                    given,
                    format!(
                        "the {trained} {noun} the run in {} was trained on ({field}): resume with the same count",
                        dir.display()
                    ),
                ));
            }
        }
        let (checkpoint, path, skipped) = latest_checkpoint(dir)?;
        for damaged in &skipped {
            say(format!("skipping a damaged checkpoint: {damaged}"));
        }
        let step = checkpoint.header.step;
        if step >= config.run.steps {
            return Err(Error::param(
                "--steps",
                config.run.steps,
                format!("more than the {step} steps the run has already taken"),
            ));
        }
        say(format!(
            "resuming {} from {} (step {step} of {})",
            dir.display(),
            path.display(),
            config.run.steps
        ));
        let metrics_path = dir.join("metrics.jsonl");
        let history: Vec<StepMetrics> = lines_up_to(&metrics_path, step)?
            .iter()
            .map(|line| {
                serde_json::from_str(line).map_err(|e| Error::Parse {
                    what: "metrics.jsonl",
                    message: format!("{}: {e}", metrics_path.display()),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            checkpoint,
            history,
        })
    }

    /// Makes the run directory `dir` agree with this point: the metrics and routing
    /// samples after its step dropped, `config.toml` with the new `run.steps`.
    pub(super) fn commit(&self, dir: &Path) -> Result<()> {
        let step = self.checkpoint.header.step;
        for name in ["metrics.jsonl", "routing_samples.jsonl"] {
            let path = dir.join(name);
            let kept = lines_up_to(&path, step)?;
            let mut bytes = kept.join("\n").into_bytes();
            if !kept.is_empty() {
                bytes.push(b'\n');
            }
            write_atomic(&path, &bytes)?;
        }
        write_atomic(&dir.join("config.toml"), self.config.to_toml()?.as_bytes())
    }
}

/// Drives a restored `session` to the end, appending to the run directory `dir`.
pub(super) fn continue_run<B: TrainingBackend>(
    mut session: TrainSession<B>,
    dir: &Path,
    options: &TrainOptions,
) -> Result<RunSummary> {
    let mut metrics = JsonLines::open_append(&dir.join("metrics.jsonl"))?;
    let mut samples = JsonLines::open_append(&dir.join("routing_samples.jsonl"))?;
    run_to_end(&mut session, dir, &mut metrics, &mut samples, &|line| {
        options.say(line)
    })
}

/// Steps a session that is not the leader of its data-parallel run to the end: it takes
/// part in every all-reduce and writes nothing.
pub(super) fn follow<B: TrainingBackend>(mut session: TrainSession<B>) -> Result<()> {
    while !session.finished() {
        session.step()?;
    }
    Ok(())
}

/// The lines of a JSON-lines file whose `step` is at most `step` (none if the file is
/// missing).
fn lines_up_to(path: &Path, step: u64) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("cannot read", path, e)),
    };
    Ok(text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .map(str::to_string)
        .collect())
}

/// Steps `session` to its last step, appending metrics and samples, writing
/// checkpoints when due, then the summary.
fn run_to_end<B: TrainingBackend>(
    session: &mut TrainSession<B>,
    out: &Path,
    metrics: &mut JsonLines,
    samples: &mut JsonLines,
    say: &dyn Fn(String),
) -> Result<RunSummary> {
    let run = session.config().run.clone();
    let routing = session.config().routing.clone();
    let mut cycle = LimitCycleWatch::default();
    while !session.finished() {
        let output = session.step()?;
        metrics.append(&output.metrics)?;
        if routing.mode.uses_controller()
            && let Some(warning) = cycle.observe(
                output.metrics.active_experts,
                routing.target,
                routing.kp,
                routing.ki,
            )
        {
            say(format!("step {}: {warning}", output.metrics.step));
        }
        if let Some(sample) = &output.sample {
            samples.append(sample)?;
        }
        let m = &output.metrics;
        if m.step == 1 || m.step.is_multiple_of(run.log_every) || m.step == run.steps {
            say(progress_line(
                m,
                run.steps,
                session.last_val_loss(),
                m.elapsed_s,
            ));
        }
        // Every K steps, and always at the end (what `dtopp export` and a later
        // `--resume --steps N` start from).
        if (run.checkpoint_every > 0 && m.step.is_multiple_of(run.checkpoint_every))
            || m.step == run.steps
        {
            let path = write_checkpoint(out, &session.checkpoint()?, run.keep_checkpoints)?;
            say(format!("checkpoint: {}", path.display()));
        }
    }

    let summary = session.summary()?;
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Parse {
        what: "run summary",
        message: e.to_string(),
    })?;
    write_atomic(&out.join("summary.json"), &json)?;
    say(format!(
        "done: {} steps in {:.1} s, {:.0} tokens/s; val loss {:.4} -> {:.4}; a_t {:.3} +- {:.3} (T = {}) over the second half",
        run.steps,
        summary.elapsed_s,
        summary.tokens_per_sec,
        summary.initial_val_loss,
        summary.final_val_loss,
        summary.active_mean_second_half,
        summary.active_std_second_half,
        summary.target
    ));
    for c in &summary.by_class {
        say(format!(
            "  {:<8} {:>6} validation tokens: loss {:.4}, experts {:.3} (per layer {})",
            c.class,
            c.tokens,
            c.loss,
            c.mean_active,
            c.mean_active_per_layer
                .iter()
                .map(|a| format!("{a:.2}"))
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    if let Some(usage) = session.padded_usage() {
        say(usage.describe(session.layout().name()));
    }
    Ok(summary)
}

fn prepare_run_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io("cannot create run directory", out, e))?;
    let metrics = out.join("metrics.jsonl");
    if metrics.exists() {
        return Err(Error::io(
            "refusing to overwrite the run in",
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it already holds metrics.jsonl; choose another --out or delete that run",
            ),
        ));
    }
    Ok(())
}

fn fmt_thresholds(p: &[f64]) -> String {
    if p.windows(2).all(|w| w[0] == w[1]) {
        format!("{:.4}", p[0])
    } else {
        let parts: Vec<String> = p.iter().map(|v| format!("{v:.4}")).collect();
        format!("[{}]", parts.join(", "))
    }
}

fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn progress_line(m: &StepMetrics, steps: u64, last_val: f64, elapsed: f64) -> String {
    let p = m
        .threshold
        .map_or_else(|| "p -    ".to_string(), |p| format!("p {p:.4}"));
    let eta = elapsed / m.step as f64 * (steps - m.step) as f64;
    format!(
        "step {:>w$}/{steps} | loss {:.4} (ce {:.4}) | val {:.4} | {p} | a_t {:.3} / T {} | lr {:.2e} | {:.0} tok/s | ETA {}",
        m.step,
        m.loss,
        m.ce_loss,
        last_val,
        m.active_experts,
        m.target,
        m.lr,
        m.tokens_per_sec,
        fmt_duration(eta),
        w = steps.to_string().len()
    )
}

/// The `config.toml` of the run in `dir`, as `dtopp train` wrote it (not yet validated).
pub fn read_run_config(dir: &Path) -> Result<TrainConfig> {
    let config_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::io("cannot read the run's config", &config_path, e))?;
    toml::from_str(&text).map_err(|e| Error::Parse {
        what: "run config.toml",
        message: format!("{}: {e}", config_path.display()),
    })
}
