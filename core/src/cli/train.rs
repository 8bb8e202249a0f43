//! `dtopp train`: pre-train an MoE language model with Top-k, fixed Top-p or DTop-p
//! routing and write a run directory (config.toml, metrics.jsonl,
//! routing_samples.jsonl, summary.json).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::devices::{DeviceSpec, parse_devices};
use super::{Backend, layout_on};
use crate::error::Result;
use crate::model::{ExpertLayout, Precision};
use crate::train::{
    NodeSpec, Preset, RoutingMode, TrainConfig, TrainOptions, resume, resume_data_parallel,
    resume_node, train, train_data_parallel, train_node,
};

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// Starting configuration.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// TOML file laid over the preset (only the fields it sets change; see README).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Training data: `synthetic` (built-in), `synthetic:reasoning` (built-in: copy,
    /// recall and composed lookups among random tokens, each labelled; docs/data.md),
    /// the path of a UTF-8 text file, or
    /// `shards:GLOB` (llm.c / nanoGPT token shards; see docs/data.md).
    #[arg(long, value_name = "synthetic|synthetic:reasoning|PATH")]
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
    /// The layout of the experts' rows: `exact` (each expert on its own slice of the
    /// routes; the host reads E + 4 integers per layer for the slices' shapes),
    /// `grouped` (each route on one row, the experts' offsets read on the device by the
    /// grouped products, a row bound from the previous step) or `padded` (experts on
    /// buffers sized from the previous step). With `grouped` and `padded` the PI
    /// controller runs on the device, the host reads once per step, and an outgrown
    /// micro-batch runs again, so nothing is dropped. Default: exact on the CPU,
    /// grouped on wgpu and cuda. All select
    /// with the backend's routing ops on the model's own tensors (dtopp's WGSL kernels
    /// on burn-wgpu's buffers, its CUDA kernels on burn-cuda's, the fast CPU ops on
    /// ndarray). See docs/benchmarks.md.
    #[arg(long, value_enum)]
    layout: Option<ExpertLayout>,
    /// Data-parallel training, one rank per device: `cuda:0,cuda:1`, `wgpu:0,wgpu:1`
    /// (also `wgpu:cpu`, `wgpu:default`) or `cpu:0,cpu:1` (ranks sharing the host). The
    /// backend is the devices'; `batch_size` is per device. A single device runs through
    /// the same data-parallel path. See docs/distributed.md.
    #[arg(long, value_name = "LIST", conflicts_with = "backend")]
    devices: Option<String>,
    /// Multi-node training: the number of nodes (processes, usually one per machine),
    /// each running the same `--devices` count. Needs --node-rank, --orchestrator,
    /// --node-address and --data-port; see docs/distributed.md.
    #[arg(long, value_name = "N", requires_all = ["node_rank", "orchestrator", "node_address", "data_port"])]
    nodes: Option<usize>,
    /// This node, from 0 to N-1. Node 0 holds global rank 0: it writes the run directory
    /// and checkpoints; the other nodes write nothing.
    #[arg(long, value_name = "R", requires = "nodes")]
    node_rank: Option<usize>,
    /// burn's global orchestrator, as `dtopp orchestrate --port PORT` serves it.
    #[arg(long, value_name = "ws://HOST:PORT", requires = "nodes")]
    orchestrator: Option<String>,
    /// This node's host name or IP, as the other nodes reach it.
    #[arg(long, value_name = "HOST", requires = "nodes")]
    node_address: Option<String>,
    /// The port this node serves its share of every all-reduce on.
    #[arg(long, value_name = "PORT", requires = "nodes")]
    data_port: Option<u16>,
    /// Seconds to wait for the orchestrator and every other node before giving up.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 600,
        requires = "nodes"
    )]
    join_timeout: u64,
    /// Run directory (created; must not already hold a run).
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in DIR from its newest intact checkpoint (to --steps, default the
    /// steps it was started with); the run's own config.toml is used.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["out", "config", "data", "mode", "target", "seed", "checkpoint_every", "precision"]
    )]
    resume: Option<PathBuf>,
    /// The dtype of the large matrix products (run.precision): f32 (default), bf16
    /// (CUDA) or f16 (GPUs with 16-bit float shaders); parameters, optimizer state,
    /// router and losses stay f32. A backend without it is refused before the run starts.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Write a checkpoint every K steps and at the end (0: none; presets: tiny 0,
    /// small 250, paper-1.3b-64e8a 500).
    #[arg(long, value_name = "K")]
    checkpoint_every: Option<u64>,
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
        if let Some(every) = self.checkpoint_every {
            c.run.checkpoint_every = every;
        }
        if let Some(precision) = self.precision {
            c.run.precision = precision;
        }
        c.validate()?;
        Ok(c)
    }
}

impl TrainArgs {
    /// The run directory: `--resume DIR` or `--out DIR`.
    fn run_dir(&self) -> PathBuf {
        match (&self.resume, &self.out) {
            (Some(dir), _) | (None, Some(dir)) => dir.clone(),
            (None, None) => unreachable!("clap requires --out or --resume"),
        }
    }

    fn options<'a>(&self, dir: &'a Path, backend_name: &'a str) -> TrainOptions<'a> {
        TrainOptions {
            out: dir,
            progress: !self.quiet,
            backend_name,
            label: "",
        }
    }
}

impl TrainArgs {
    /// `--nodes …` as a [`NodeSpec`] (clap has checked that all of them are given).
    fn node(&self) -> Option<NodeSpec> {
        Some(NodeSpec {
            nodes: self.nodes?,
            rank: self.node_rank?,
            orchestrator: self.orchestrator.clone()?,
            host: self.node_address.clone()?,
            data_port: self.data_port?,
        })
    }

    /// The devices of a multi-node run without `--devices`: one, of `--backend`.
    fn default_device(&self) -> Result<DeviceSpec> {
        match self.backend {
            Backend::Cpu => Ok(DeviceSpec::Cpu(0)),
            Backend::CpuReference => Err(super::reference_runs_no_model()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(DeviceSpec::Wgpu(super::devices::WgpuSpec::Default)),
            Backend::Cuda => Ok(DeviceSpec::Cuda(0)),
        }
    }
}

pub(crate) fn run(args: TrainArgs) -> Result<()> {
    if let Some(list) = &args.devices {
        return run_data_parallel(&args, &parse_devices(list)?);
    }
    if args.nodes.is_some() {
        return run_data_parallel(&args, &[args.default_device()?]);
    }
    let dir = args.run_dir();
    let options = |backend_name| args.options(&dir, backend_name);
    macro_rules! go {
        ($backend:ty, $device:expr, $name:expr) => {{
            let device = $device;
            let layout = layout_on::<$backend>(args.layout);
            match &args.resume {
                Some(run_dir) => {
                    resume::<$backend>(run_dir, args.steps, &device, layout, &options($name))?;
                }
                None => {
                    let config = args.config()?;
                    train::<$backend>(&config, &device, layout, &options($name))?;
                }
            }
        }};
    }
    match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            go!(Autodiff<NdArray>, Default::default(), "ndarray (CPU)");
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            use burn::backend::{Autodiff, Wgpu};
            go!(
                Autodiff<Wgpu>,
                super::wgpu_model_device(WgpuDevice::DefaultDevice)?,
                "wgpu"
            );
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda};
            // The CUDA kernels' handle checks for the driver and the device, which
            // burn-cuda would only discover by panicking inside its first operation.
            super::cuda_backend()?;
            go!(Autodiff<Cuda>, Default::default(), "cuda");
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => return Err(super::cuda_backend().expect_err(NO_CUDA_STAND_IN)),
    }
    eprintln!("run directory: {}", dir.display());
    Ok(())
}

/// Without the `cuda` feature the CUDA backend is a stand-in that never constructs.
#[cfg(not(feature = "cuda"))]
const NO_CUDA_STAND_IN: &str = "the CUDA stand-in never constructs";

/// `dtopp train --devices LIST`.
fn run_data_parallel(args: &TrainArgs, specs: &[DeviceSpec]) -> Result<()> {
    let dir = args.run_dir();
    let options = |backend_name| args.options(&dir, backend_name);
    macro_rules! go {
        ($backend:ty, $devices:expr, $name:expr) => {{
            let devices: Vec<_> = $devices;
            let layout = layout_on::<$backend>(args.layout);
            let join = Duration::from_secs(args.join_timeout);
            match (&args.resume, args.node()) {
                (Some(run_dir), None) => {
                    resume_data_parallel::<$backend>(
                        run_dir,
                        args.steps,
                        &devices,
                        layout,
                        &options($name),
                    )?;
                }
                (None, None) => {
                    let config = args.config()?;
                    train_data_parallel::<$backend>(&config, &devices, layout, &options($name))?;
                }
                (Some(run_dir), Some(node)) => {
                    resume_node::<$backend>(
                        run_dir,
                        args.steps,
                        &devices,
                        layout,
                        &options($name),
                        &node,
                        join,
                    )?;
                }
                (None, Some(node)) => {
                    let config = args.config()?;
                    train_node::<$backend>(
                        &config,
                        &devices,
                        layout,
                        &options($name),
                        &node,
                        join,
                    )?;
                }
            }
        }};
    }
    match specs[0].backend() {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            go!(
                Autodiff<NdArray>,
                specs.iter().map(|_| Default::default()).collect(),
                "ndarray (CPU)"
            );
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::{Autodiff, Wgpu};
            go!(
                Autodiff<Wgpu>,
                specs
                    .iter()
                    .map(|d| super::wgpu_model_device(d.wgpu_device()))
                    .collect::<Result<_>>()?,
                "wgpu"
            );
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda, cuda::CudaDevice};
            let ordinals: Vec<usize> = specs
                .iter()
                .map(|d| match d {
                    DeviceSpec::Cuda(i) => *i,
                    _ => unreachable!("parse_devices keeps one backend"),
                })
                .collect();
            // The driver and devices checked before burn-cuda touches them.
            for &ordinal in &ordinals {
                super::cuda_backend_on(ordinal)?;
            }
            go!(
                Autodiff<Cuda>,
                ordinals.iter().map(|&i| CudaDevice::new(i)).collect(),
                "cuda"
            );
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => return Err(super::cuda_backend().expect_err(NO_CUDA_STAND_IN)),
    }
    if args.node_rank.unwrap_or(0) == 0 {
        eprintln!("run directory: {}", dir.display());
    }
    Ok(())
}
