//! `dtopp reproduce`: topk, topp, dtopp, dtopp-no-drn and drn-only on the same model,
//! tokens and seeds, then `report.md` and PNG plots.

use std::path::PathBuf;

use clap::Args;

use super::{Backend, layout_on};
use crate::error::Result;
use crate::model::ExpertLayout;
use crate::reproduce::{ReproduceOptions, Scale, reproduce};

#[derive(Debug, Args)]
pub(crate) struct ReproduceArgs {
    /// ci: a smoke run of minutes; default: the tiny preset (<= 30 min on 2 CPU cores);
    /// cpu-long: 6 MoE layers, 3 seeds (about 1.5 h on 2 CPU cores); gpu: about 100M
    /// parameters, 64 experts, T = 8, one H200-day (`small` is its old name).
    #[arg(long, value_enum, default_value_t = Scale::Default)]
    scale: Scale,
    /// Training data: `synthetic` (built-in; hard tokens are random), `synthetic:reasoning`
    /// (built-in; tokens need 0-4 lookups, each labelled with its class) or the path of a
    /// UTF-8 text file (byte-level).
    #[arg(
        long,
        default_value = "synthetic",
        value_name = "synthetic|synthetic:reasoning|PATH"
    )]
    data: String,
    /// Seeds per mode (default: 2 at default scale, 1 otherwise).
    #[arg(long)]
    seeds: Option<usize>,
    /// Where the model and the routing ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// The layout of the experts' rows (as `dtopp train --layout`; default: exact on
    /// the CPU, grouped on wgpu and cuda).
    #[arg(long, value_enum)]
    layout: Option<ExpertLayout>,
    /// TOML laid over the scale's config, as `dtopp train --config` (e.g. `[routing]`
    /// gains); every run's mode and seed are still set by the reproduction.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Optimizer steps per run, instead of the scale's (e.g. to fit `--scale gpu` to the
    /// throughput `dtopp bench train` measured).
    #[arg(long)]
    steps: Option<u64>,
    /// Runs trained at the same time (default: one per CPU core on the cpu backend, one
    /// on a GPU). The results do not depend on it.
    #[arg(long)]
    jobs: Option<usize>,
    /// Train nothing: write report.md and the plots again from the finished runs in
    /// `--out`'s runs/ (same --scale, --data and --seeds as the runs).
    #[arg(long)]
    report_only: bool,
    /// Output directory (runs/, report.md, *.png).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub(crate) fn run(args: ReproduceArgs) -> Result<()> {
    let command = std::iter::once("dtopp".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let options = |backend_name: &str| ReproduceOptions {
        scale: args.scale,
        data: args.data.clone(),
        seeds: args.seeds.unwrap_or(args.scale.default_seeds()),
        out: args.out.clone(),
        backend_name: backend_name.to_string(),
        command: command.clone(),
        jobs: args.jobs.unwrap_or(match args.backend {
            // burn-ndarray's matrix products use one core each, so runs side by side
            // share the machine without slowing each other.
            Backend::Cpu => std::thread::available_parallelism().map_or(1, |n| n.get()),
            _ => 1,
        }),
        report_only: args.report_only,
        steps: args.steps,
        config: args.config.clone(),
    };
    match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            type B = Autodiff<NdArray>;
            let device = Default::default();
            let layout = layout_on::<B>(args.layout);
            let name = format!("ndarray (CPU) + {}", layout.describe_on::<B>(&device));
            reproduce::<B>(&options(&name), &device, layout)?;
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::{Autodiff, Wgpu};
            type B = Autodiff<Wgpu>;
            let device = super::wgpu_model_device(burn::backend::wgpu::WgpuDevice::DefaultDevice)?;
            let layout = layout_on::<B>(args.layout);
            let name = format!("wgpu + {}", layout.describe_on::<B>(&device));
            reproduce::<B>(&options(&name), &device, layout)?;
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda};
            type B = Autodiff<Cuda>;
            let ops = super::cuda_backend()?;
            let device = Default::default();
            let layout = layout_on::<B>(args.layout);
            let name = format!(
                "cuda + {} on {}",
                layout.describe_on::<B>(&device),
                ops.device_name()
            );
            reproduce::<B>(&options(&name), &device, layout)?;
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => {
            return Err(super::cuda_backend().expect_err("the CUDA stand-in never constructs"));
        }
    }
    Ok(())
}
