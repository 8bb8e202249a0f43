//! `dtopp reproduce`: topk, topp, dtopp, dtopp-no-drn and drn-only on the same model,
//! tokens and seeds, then `report.md` and PNG plots.

use std::path::PathBuf;

use clap::Args;

use super::Backend;
use crate::cpu_fast::CpuFast;
use crate::error::Result;
use crate::model::RouteEngine;
use crate::reproduce::{ReproduceOptions, Scale, reproduce};

#[derive(Debug, Args)]
pub(crate) struct ReproduceArgs {
    /// ci: a smoke run of minutes; default: the tiny preset (<= 30 min on 2 CPU cores);
    /// small: the ~100M-parameter preset, for a GPU.
    #[arg(long, value_enum, default_value_t = Scale::Default)]
    scale: Scale,
    /// Training data: `synthetic` (built-in) or the path of a UTF-8 text file.
    #[arg(long, default_value = "synthetic", value_name = "synthetic|PATH")]
    data: String,
    /// Seeds per mode (default: 2 at default scale, 1 otherwise).
    #[arg(long)]
    seeds: Option<usize>,
    /// Where the model and the routing ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
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
    };
    match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            let engine = RouteEngine::Cpu(CpuFast);
            reproduce::<Autodiff<NdArray>>(
                &options("ndarray (CPU) + dtopp fast CPU routing"),
                &Default::default(),
                &engine,
            )?;
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::{Autodiff, Wgpu};
            let ops = super::wgpu_backend()?;
            let name = format!("wgpu + dtopp WGSL kernels on {}", ops.adapter_name());
            let engine = RouteEngine::Wgpu(Box::new(ops));
            let device = super::wgpu_model_device(burn::backend::wgpu::WgpuDevice::DefaultDevice)?;
            reproduce::<Autodiff<Wgpu>>(&options(&name), &device, &engine)?;
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda};
            let ops = super::cuda_backend()?;
            let name = format!("cuda + dtopp CUDA kernels on {}", ops.device_name());
            let engine = RouteEngine::Cuda(Box::new(ops));
            reproduce::<Autodiff<Cuda>>(&options(&name), &Default::default(), &engine)?;
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => {
            return Err(super::cuda_backend().expect_err("the CUDA stand-in never constructs"));
        }
    }
    Ok(())
}
