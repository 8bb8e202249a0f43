//! The `dtopp` command-line program: one module per subcommand.

mod bench;
#[cfg(feature = "train")]
mod bench_moe;
#[cfg(feature = "train")]
mod bench_train;
mod burn_log;
#[cfg(feature = "train")]
mod devices;
#[cfg(feature = "train")]
mod eval;
#[cfg(feature = "train")]
mod export;
#[cfg(feature = "train")]
mod generate;
#[cfg(feature = "train")]
mod inference_backend;
#[cfg(feature = "train")]
mod orchestrate;
#[cfg(feature = "reproduce")]
mod reproduce;
mod route;
mod simulate;
#[cfg(feature = "train")]
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};

/// Sparsity-controllable dynamic Top-p MoE routing (DTop-p).
#[derive(Debug, Parser)]
#[command(name = "dtopp", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pre-train an MoE language model (Top-k, fixed Top-p or DTop-p routing).
    #[cfg(feature = "train")]
    Train(train::TrainArgs),
    /// Write a run's newest checkpoint as safetensors weights plus a JSON config.
    #[cfg(feature = "train")]
    Export(export::ExportArgs),
    /// Validation loss of trained runs at their trained compute and at compute chosen now
    /// (targets T' or thresholds), with a plot of loss against active experts.
    #[cfg(feature = "train")]
    Eval(eval::EvalArgs),
    /// Sample text from a trained run (KV cache), optionally showing each token's experts.
    #[cfg(feature = "train")]
    Generate(generate::GenerateArgs),
    /// Run the orchestrator of a multi-node training run (`dtopp train --nodes`) until
    /// every node has finished; exits with their status.
    #[cfg(feature = "train")]
    Orchestrate(orchestrate::OrchestrateArgs),
    /// Train every routing mode on the same data and write a report with plots.
    #[cfg(feature = "reproduce")]
    Reproduce(reproduce::ReproduceArgs),
    /// Run the PI controller in closed loop on synthetic router logits (no model).
    Simulate(simulate::SimulateArgs),
    /// Route a matrix of router logits from a .npy file and write the routing to .npz.
    Route(route::RouteArgs),
    /// Measure backends (per-op and whole-step timings against the CPU reference).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Where routing ops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Backend {
    /// The CPU: dtopp's fast routing ops on both cores; models on burn ndarray.
    Cpu,
    /// The CPU reference, the spec in plain loops on one core (the routing commands:
    /// route, simulate, bench routing).
    CpuReference,
    /// The WGSL kernels through wgpu (Vulkan, Metal, DX12; lavapipe without a GPU).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// The CUDA kernels (NVIDIA GPUs; NVRTC at run time). Builds without the `cuda`
    /// feature report that the backend is not in the build.
    Cuda,
}

impl Backend {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::CpuReference => "cpu-reference",
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }
}

/// The error of a command that runs a burn model (train, eval, generate, reproduce, bench
/// train) given `--backend cpu-reference`.
#[cfg(feature = "train")]
pub(crate) fn reference_runs_no_model() -> Error {
    Error::param(
        "--backend",
        "cpu-reference",
        "cpu, wgpu or cuda: the CPU reference runs the routing commands (route, simulate, \
         bench routing); a model on the CPU runs with --backend cpu (burn ndarray, routing \
         with the fast CPU ops, which conform to the reference)",
    )
}

/// `--layout` for a run on backend `B`: as given, else the backend's preferred one
/// ([`crate::model::ExpertLayout::preferred_on`]).
#[cfg(feature = "train")]
pub(crate) fn layout_on<B: crate::model::RoutingBackend>(
    given: Option<crate::model::ExpertLayout>,
) -> crate::model::ExpertLayout {
    given.unwrap_or_else(crate::model::ExpertLayout::preferred_on::<B>)
}

/// Creates the wgpu backend and says which adapter it runs on (never silently the CPU).
#[cfg(feature = "wgpu")]
pub(crate) fn wgpu_backend() -> Result<crate::backends::WgpuOps> {
    let ops = crate::backends::WgpuOps::new()?;
    eprintln!("wgpu adapter: {}", ops.adapter_name());
    Ok(ops)
}

/// Sets up burn's wgpu `device` for the model so that dtopp's WGSL routing runs on its
/// buffers (before any tensor is made there), and says which adapter it is.
#[cfg(all(feature = "train", feature = "wgpu"))]
pub(crate) fn wgpu_model_device(
    device: burn::backend::wgpu::WgpuDevice,
) -> Result<burn::backend::wgpu::WgpuDevice> {
    let adapter = crate::model::wgpu_routing::setup(&device)?;
    eprintln!("wgpu model device: {adapter}");
    Ok(device)
}

/// Creates the CUDA backend on device 0 and says which GPU it runs on (never silently
/// another backend).
pub(crate) fn cuda_backend() -> Result<crate::backends::CudaOps> {
    cuda_backend_on(0)
}

/// [`cuda_backend`] on device `ordinal`.
pub(crate) fn cuda_backend_on(ordinal: usize) -> Result<crate::backends::CudaOps> {
    let ops = crate::backends::CudaOps::new(ordinal)?;
    eprintln!("cuda device: {}", ops.device_name());
    Ok(ops)
}

/// The router normalization chosen by `--no-drn` / `--theta`.
pub(crate) fn normalization(no_drn: bool, theta: f32) -> Result<crate::ops::Normalization> {
    use crate::ops::Normalization;
    let norm = if no_drn {
        Normalization::Softmax
    } else {
        Normalization::Drn { theta }
    };
    norm.theta()?;
    Ok(norm)
}

/// Parses the command line, runs it, and turns an error into a message and exit code 1.
pub fn main() -> ExitCode {
    burn_log::install();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        #[cfg(feature = "train")]
        Command::Train(args) => train::run(args),
        #[cfg(feature = "train")]
        Command::Export(args) => export::run(args),
        #[cfg(feature = "train")]
        Command::Eval(args) => eval::run(args),
        #[cfg(feature = "train")]
        Command::Generate(args) => generate::run(args),
        #[cfg(feature = "train")]
        Command::Orchestrate(args) => orchestrate::run(args),
        #[cfg(feature = "reproduce")]
        Command::Reproduce(args) => reproduce::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Route(args) => route::run(args),
        Command::Bench(command) => bench::run(command),
    }
}
