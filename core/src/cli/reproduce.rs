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
    /// The layout of the experts' rows (as `dtopp train --layout`; default: exact on
    /// the CPU, padded on a GPU).
    #[arg(long, value_enum)]
    layout: Option<ExpertLayout>,
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
