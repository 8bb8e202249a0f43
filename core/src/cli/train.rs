//! `dtopp train`: pre-train an MoE language model with Top-k, fixed Top-p or DTop-p
//! routing and write a run directory (config.toml, metrics.jsonl,
//! routing_samples.jsonl, summary.json).

use std::path::PathBuf;

use clap::Args;

use super::Backend;
use crate::cpu::CpuReference;
use crate::error::Result;
use crate::model::RouteEngine;
use crate::train::{Preset, RoutingMode, TrainConfig, TrainOptions, train};

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// Starting configuration.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// TOML file laid over the preset (only the fields it sets change; see README).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Training data: `synthetic` (built-in), the path of a UTF-8 text file, or
    /// `shards:GLOB` (llm.c / nanoGPT token shards; see docs/data.md).
    #[arg(long, value_name = "synthetic|PATH")]
    data: Option<String>,
    /// Routing mode.
    #[arg(long, value_enum)]
    mode: Option<RoutingMode>,
    /// T, target mean activated experts per token (k of Top-k).
    #[arg(long)]
    target: Option<f64>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Seed of weights and data order.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the model and the routing ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Run directory (created; must not already hold a run).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::from_preset_and_file(self.preset, self.config.as_deref())?;
        if let Some(data) = &self.data {
            c.data.source = data.clone();
        }
        if let Some(mode) = self.mode {
            c.routing.mode = mode;
        }
        if let Some(target) = self.target {
            c.routing.target = target;
        }
        if let Some(steps) = self.steps {
            c.run.steps = steps;
        }
        if let Some(seed) = self.seed {
            c.run.seed = seed;
        }
        c.validate()?;
        Ok(c)
    }
}

pub(crate) fn run(args: TrainArgs) -> Result<()> {
    let config = args.config()?;
    let options = |backend_name| TrainOptions {
        out: &args.out,
        progress: !args.quiet,
        backend_name,
    };
    match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            let engine = RouteEngine::Cpu(CpuReference);
            let device = Default::default();
            train::<Autodiff<NdArray>>(&config, &device, &engine, &options("ndarray (CPU)"))?;
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::{Autodiff, Wgpu};
            let engine = RouteEngine::Wgpu(Box::new(super::wgpu_backend()?));
            let device = Default::default();
            train::<Autodiff<Wgpu>>(&config, &device, &engine, &options("wgpu"))?;
        }
    }
    eprintln!("run directory: {}", args.out.display());
    Ok(())
}
