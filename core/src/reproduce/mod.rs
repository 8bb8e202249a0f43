//! `dtopp reproduce`: the same model on the same tokens with the same seeds under every
//! routing mode, then a report that sets the paper's claims beside what the runs measured
//! (feature `reproduce`).

mod analysis;
mod plots;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crate::model::TrainingBackend;

pub use analysis::{ModeResult, RunRecord, summarize_mode};
pub use plots::{ComputeCurve, draw_loss_against_compute};

use crate::error::{Error, Result};
use crate::model::ExpertLayout;
use crate::train::{Preset, RoutingMode, StepMetrics, TrainConfig, TrainOptions, train};

/// How big the reproduction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Scale {
    /// A smoke run of minutes (60 steps of a narrower batch): used by the test suite.
    Ci,
    /// The `tiny` preset, 300 steps per run: at most 30 minutes on a 2-core CPU.
    Default,
    /// Six MoE layers, 3000 steps per run, 3 seeds: about 1.5 hours on 2 CPU cores
    /// (two runs at a time), enough to tell the modes apart on `synthetic:reasoning`.
    CpuLong,
    /// About 100M parameters, the paper's 64 experts with T = 8, and a token budget
    /// sized to one H200-day for the five modes (not run in CI; see docs/reproduction).
    #[cfg_attr(feature = "cli", value(alias = "small"))]
    Gpu,
}

/// Tokens per optimizer step at the `gpu` scale (64 sequences of 512).
const GPU_TOKENS_PER_STEP: u64 = 64 * 512;
/// Training tokens per run at the `gpu` scale: five runs fill one H200-day at the
/// throughput docs/reproduction/gpu.md assumes (about 60k tokens/s).
const GPU_TOKENS_PER_RUN: u64 = 1_000_000_000;

impl Scale {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scale::Ci => "ci",
            Scale::Default => "default",
            Scale::CpuLong => "cpu-long",
            Scale::Gpu => "gpu",
        }
    }

    /// The config every mode starts from.
    pub fn config(self) -> TrainConfig {
        let mut c = match self {
            Scale::Ci | Scale::Default | Scale::CpuLong => Preset::Tiny.config(),
            Scale::Gpu => Preset::Small.config(),
        };
        match self {
            Scale::Ci => {
                c.run.steps = 60;
                c.run.batch_size = 8;
                c.run.eval_every = 20;
                c.run.eval_batches = 2;
                c.run.sample_every = 0;
                c.run.log_every = 1000;
                c.optimizer.warmup_steps = 10;
            }
            Scale::Default => {
                c.run.eval_every = 25;
                c.run.sample_every = 100;
                c.run.log_every = 50;
            }
            Scale::CpuLong => {
                // Depth is what the per-layer claim needs; the tiny width keeps a run
                // on one core near 5k tokens/s, so 15 runs fit the 2-hour budget.
                c.model.layers = 6;
                c.run.steps = 3000;
                c.run.eval_every = 250;
                // 16,384 validation positions: about 600 per determined class and seed.
                c.run.eval_batches = 16;
                c.run.sample_every = 500;
                c.run.log_every = 250;
                c.optimizer.warmup_steps = 100;
                // At this depth the routers sharpen until p sits near 1, where a_t
                // answers p steeply: the default gains (0.25, 0.5) fall into a period-2
                // limit cycle by step 300, (0.1, 0.2) by step 1600
                // (docs/controller-gains.md, "In training").
                c.routing.kp = 0.05;
                c.routing.ki = 0.1;
            }
            Scale::Gpu => {
                c.run.batch_size = 64;
                c.model.seq_len = 512;
                c.run.steps = GPU_TOKENS_PER_RUN / GPU_TOKENS_PER_STEP;
                c.run.eval_every = 1000;
                c.run.eval_batches = 16;
                c.run.sample_every = 2000;
                c.run.log_every = 50;
                c.run.checkpoint_every = 1000;
                c.optimizer.warmup_steps = 1000;
            }
        }
        c
    }

    /// Seeds when `--seeds` is not given.
    pub fn default_seeds(self) -> usize {
        match self {
            Scale::Default => 2,
            Scale::CpuLong => 3,
            Scale::Ci | Scale::Gpu => 1,
        }
    }
}

/// What to reproduce and where.
#[derive(Clone, Debug)]
pub struct ReproduceOptions {
    /// The size of the runs.
    pub scale: Scale,
    /// `"synthetic"` or a text file.
    pub data: String,
    /// Seeds per mode (`0..seeds`).
    pub seeds: usize,
    /// Output directory: `runs/<mode>-seed<s>/`, `report.md`, `*.png`.
    pub out: PathBuf,
    /// The burn backend's name, for the log and the report.
    pub backend_name: String,
    /// The command line, recorded in the report.
    pub command: String,
    /// Runs trained at the same time (threads). Results do not depend on it.
    pub jobs: usize,
    /// Train nothing: read the finished runs already in `out/runs/` and write the report
    /// and plots again (after a change to the report, or to look at a partial set).
    pub report_only: bool,
    /// Optimizer steps per run instead of the scale's.
    pub steps: Option<u64>,
    /// A TOML file laid over the scale's config (before `data` and `steps`).
    pub config: Option<PathBuf>,
}

/// Trains every mode for every seed, then writes `report.md` and the plots.
pub fn reproduce<B: TrainingBackend>(
    options: &ReproduceOptions,
    device: &B::Device,
    layout: ExpertLayout,
) -> Result<Vec<ModeResult>> {
    if options.seeds == 0 {
        return Err(Error::param("--seeds", 0, "at least 1"));
    }
    let runs_dir = options.out.join("runs");
    let mut base = options.scale.config();
    if let Some(path) = &options.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("cannot read the config", path, e))?;
        base = base.overlay_toml(&text)?;
    }
    base.data.source = options.data.clone();
    if let Some(steps) = options.steps {
        base.run.steps = steps;
    }
    base.validate()?;
    if options.report_only {
        let results = RoutingMode::ALL
            .into_iter()
            .map(|mode| {
                let runs = (0..options.seeds as u64)
                    .map(|seed| read_run(&runs_dir, &base, options.scale, mode, seed))
                    .collect::<Result<Vec<_>>>()?;
                Ok(summarize_mode(mode, &base, runs))
            })
            .collect::<Result<Vec<_>>>()?;
        plots::draw_all(&options.out, &base, &results)?;
        report::write(&options.out, options, &base, &results, None)?;
        eprintln!(
            "report written from the runs: {}",
            options.out.join("report.md").display()
        );
        return Ok(results);
    }
    if runs_dir.exists() {
        return Err(Error::io(
            "refusing to overwrite the reproduction in",
            &options.out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it already holds runs/; choose another --out or delete it",
            ),
        ));
    }
    if options.jobs == 0 {
        return Err(Error::param("--jobs", 0, "at least 1"));
    }
    let started = Instant::now();
    let tasks: Vec<(RoutingMode, u64)> = RoutingMode::ALL
        .into_iter()
        .flat_map(|mode| (0..options.seeds as u64).map(move |seed| (mode, seed)))
        .collect();
    let jobs = options.jobs.min(tasks.len());
    eprintln!(
        "reproduction: {} runs ({} modes x {} seeds), {jobs} at a time, into {}",
        tasks.len(),
        RoutingMode::ALL.len(),
        options.seeds,
        options.out.display()
    );
    let run_one = |(mode, seed): (RoutingMode, u64)| -> Result<RunRecord> {
        let mut config = base.clone();
        config.routing.mode = mode;
        config.run.seed = seed;
        let label = format!("{mode} seed {seed}");
        let dir = runs_dir.join(format!("{}-seed{seed}", mode.name()));
        let summary = train::<B>(
            &config,
            device,
            layout,
            &TrainOptions {
                out: &dir,
                progress: true,
                backend_name: &options.backend_name,
                // One run at a time needs no label; several interleave their lines.
                label: if jobs > 1 { &label } else { "" },
            },
        )?;
        Ok(RunRecord {
            seed,
            history: read_metrics(&dir.join("metrics.jsonl"))?,
            summary,
        })
    };
    // Each job gets its own rayon pool with its share of the cores, as separate
    // processes would: on one shared pool a job's parallel ops (burn-ndarray's and
    // dtopp's CPU routing ops) would queue behind the other job's.
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / jobs).max(1);
    let pools = (0..jobs)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Backend {
            backend: "rayon",
            message: format!("cannot start a thread pool per job: {e}"),
        })?;
    let records = run_all(&tasks, &pools, started, run_one)?;
    let mut results = Vec::new();
    for mode in RoutingMode::ALL {
        let runs = tasks
            .iter()
            .zip(&records)
            .filter(|((m, _), _)| *m == mode)
            .map(|(_, r)| r.clone())
            .collect();
        results.push(summarize_mode(mode, &base, runs));
    }
    plots::draw_all(&options.out, &base, &results)?;
    let elapsed = started.elapsed().as_secs_f64();
    report::write(&options.out, options, &base, &results, Some(elapsed))?;
    eprintln!(
        "reproduction done in {:.0} s: {}",
        elapsed,
        options.out.join("report.md").display()
    );
    Ok(results)
}

/// Runs every task, one per pool at a time, and returns their results in the tasks' order.
/// The first error stops the hand-out of new tasks (runs already started finish) and is
/// returned.
///
/// Threads rather than processes: burn-ndarray multiplies matrices on one core, so two
/// runs side by side nearly double the throughput of a 2-core machine (measured: 5,050
/// tokens/s each, alone or in pairs, at the cpu-long shape), and a run's weights and
/// tokens depend only on its seed, never on what else is running.
fn run_all<F>(
    tasks: &[(RoutingMode, u64)],
    pools: &[rayon::ThreadPool],
    started: Instant,
    run_one: F,
) -> Result<Vec<RunRecord>>
where
    F: Fn((RoutingMode, u64)) -> Result<RunRecord> + Sync,
{
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<RunRecord>>>> =
        tasks.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for pool in pools {
            scope.spawn(|| {
                pool.install(|| loop {
                    if failed.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(mode, seed)) = tasks.get(i) else {
                        return;
                    };
                    eprintln!(
                        "== run {}/{}: {mode}, seed {seed} ({:.0} s so far) ==",
                        i + 1,
                        tasks.len(),
                        started.elapsed().as_secs_f64()
                    );
                    let result = run_one((mode, seed));
                    match &result {
                        Ok(r) => eprintln!(
                            "== finished {}/{}: {mode}, seed {seed}: val loss {:.4}, a_t {:.3}, {:.0} s ==",
                            done.fetch_add(1, Ordering::SeqCst) + 1,
                            tasks.len(),
                            r.summary.final_val_loss,
                            r.summary.active_mean_second_half,
                            r.summary.elapsed_s
                        ),
                        Err(_) => failed.store(true, Ordering::SeqCst),
                    }
                    *slots[i].lock().expect("no run panics while holding its slot") = Some(result);
                })
            });
        }
    });
    // Tasks are handed out in order, so one left out follows a failed one, whose
    // error returns first.
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .expect("no run panics while holding its slot")
                .expect("a task is left out only after an earlier one failed")
        })
        .collect()
}

/// One finished run of a reproduction, checked against the config it should have had.
fn read_run(
    runs_dir: &Path,
    base: &TrainConfig,
    scale: Scale,
    mode: RoutingMode,
    seed: u64,
) -> Result<RunRecord> {
    let dir = runs_dir.join(format!("{}-seed{seed}", mode.name()));
    let config_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::io("cannot read the run's config", &config_path, e))?;
    let config = base.overlay_toml(&text)?;
    if config.model != base.model
        || config.run.steps != base.run.steps
        || config.data.source != base.data.source
    {
        return Err(Error::Parse {
            what: "reproduction",
            message: format!(
                "{} was trained with another model, step count or data than --scale {} --data {}",
                dir.display(),
                scale.name(),
                base.data.source
            ),
        });
    }
    let summary_path = dir.join("summary.json");
    let text = std::fs::read_to_string(&summary_path).map_err(|e| {
        Error::io(
            "cannot read the summary of a finished run (is it finished?)",
            &summary_path,
            e,
        )
    })?;
    let summary = serde_json::from_str(&text).map_err(|e| Error::Parse {
        what: "summary.json",
        message: format!("{}: {e}", summary_path.display()),
    })?;
    Ok(RunRecord {
        seed,
        history: read_metrics(&dir.join("metrics.jsonl"))?,
        summary,
    })
}

/// Reads a run's `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Parse {
                what: "metrics.jsonl",
                message: format!("{} line {}: {e}", path.display(), i + 1),
            })
        })
        .collect()
}
