//! `dtopp reproduce`: the same model on the same tokens with the same seeds under every
//! routing mode, then a report that sets the paper's claims beside what the runs measured
//! (feature `reproduce`).

mod analysis;
mod plots;
mod report;

use std::path::{Path, PathBuf};
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
    /// The `small` preset (about 100M parameters): for a GPU.
    Small,
}

impl Scale {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scale::Ci => "ci",
            Scale::Default => "default",
            Scale::Small => "small",
        }
    }

    /// The config every mode starts from.
    pub fn config(self) -> TrainConfig {
        let mut c = match self {
            Scale::Ci | Scale::Default => Preset::Tiny.config(),
            Scale::Small => Preset::Small.config(),
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
            Scale::Small => {
                c.run.log_every = 50;
            }
        }
        c
    }

    /// Seeds when `--seeds` is not given.
    pub fn default_seeds(self) -> usize {
        match self {
            Scale::Default => 2,
            Scale::Ci | Scale::Small => 1,
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
    let mut base = options.scale.config();
    base.data.source = options.data.clone();
    base.validate()?;
    let started = Instant::now();
    let total = RoutingMode::ALL.len() * options.seeds;
    let mut results = Vec::new();
    for mode in RoutingMode::ALL {
        let mut records = Vec::new();
        for seed in 0..options.seeds {
            let mut config = base.clone();
            config.routing.mode = mode;
            config.run.seed = seed as u64;
            let dir = runs_dir.join(format!("{}-seed{seed}", mode.name()));
            eprintln!(
                "== run {}/{total}: {mode}, seed {seed} ({:.0} s so far) ==",
                results.len() * options.seeds + seed + 1,
                started.elapsed().as_secs_f64()
            );
            let summary = train::<B>(
                &config,
                device,
                layout,
                &TrainOptions {
                    out: &dir,
                    progress: true,
                    backend_name: &options.backend_name,
                },
            )?;
            records.push(RunRecord {
                seed: seed as u64,
                history: read_metrics(&dir.join("metrics.jsonl"))?,
                summary,
            });
        }
        results.push(summarize_mode(mode, &base, records));
    }
    plots::draw_all(&options.out, &base, &results)?;
    let elapsed = started.elapsed().as_secs_f64();
    report::write(&options.out, options, &base, &results, elapsed)?;
    eprintln!(
        "reproduction done in {:.0} s: {}",
        elapsed,
        options.out.join("report.md").display()
    );
    Ok(results)
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
