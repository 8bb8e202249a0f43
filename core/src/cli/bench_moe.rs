//! `dtopp bench moe`: one MoE layer, forward and backward, on a backend in a layout of the
//! experts' rows; `bench/torch_moe_layer.py` times PyTorch eager's dropless layer (a loop
//! over experts) and a dense SwiGLU of the same FLOPs at the same shape beside it.
//!
//! The layer is the trainer's (`moe_forward`: DRN, Top-k, dispatch, SwiGLU experts,
//! combine), on seeded weights, with the loss `sum(output * upstream)` so that the
//! backward reaches every weight and the input. Top-k keeps the routes at exactly `N k`,
//! so both sides multiply the same rows.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use clap::Args;
use serde::Serialize;

use super::{Backend, layout_on};
use crate::error::{Error, Result};
use crate::host_reads;
use crate::model::{
    ExpertBounds, ExpertLayout, LayerBounds, MoeWeights, Precision, RowBound, Selector,
    TrainingBackend, moe_forward, read_ints,
};

#[derive(Debug, Args)]
pub(crate) struct MoeBenchArgs {
    /// Where the layer runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// The layout of the experts' rows (default: the backend's, as `dtopp train`).
    #[arg(long, value_enum)]
    layout: Option<ExpertLayout>,
    /// Tokens N.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Model width D.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Experts E.
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Expert width F.
    #[arg(long, default_value_t = 256)]
    expert_hidden: usize,
    /// Experts per token (the routes are N k).
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// One `bench moe` result.
#[derive(Debug, Serialize)]
struct MoeTiming {
    backend: String,
    layout: String,
    tokens: usize,
    hidden: usize,
    experts: usize,
    expert_hidden: usize,
    top_k: usize,
    /// Median forward + backward, milliseconds.
    median_ms: f64,
    /// The experts' products (3 forward, 6 backward, `2 D F` each per route) per second.
    expert_tflops: f64,
    /// The layer's own reads of the device per iteration (the benchmark's wait for the
    /// backward's end is not counted).
    host_reads_per_iteration: f64,
}

pub(crate) fn run(args: MoeBenchArgs) -> Result<()> {
    let a = &args;
    if a.tokens == 0 || a.hidden == 0 || a.experts == 0 || a.expert_hidden == 0 || a.steps == 0 {
        return Err(Error::param(
            "bench moe shape",
            format!(
                "tokens {}, hidden {}, experts {}, expert-hidden {}, steps {}",
                a.tokens, a.hidden, a.experts, a.expert_hidden, a.steps
            ),
            "all at least 1",
        ));
    }
    if a.top_k == 0 || a.top_k > a.experts {
        return Err(Error::param(
            "--top-k",
            a.top_k,
            format!("1..={}", a.experts),
        ));
    }
    let timing = match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            let layout = layout_on::<NdArray>(args.layout);
            measure::<Autodiff<NdArray>>(&args, &Default::default(), layout, "ndarray (CPU)")?
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            use burn::backend::{Autodiff, Wgpu};
            let device = super::wgpu_model_device(WgpuDevice::DefaultDevice)?;
            let layout = layout_on::<Wgpu>(args.layout);
            measure::<Autodiff<Wgpu>>(&args, &device, layout, "wgpu")?
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda};
            let ops = super::cuda_backend()?;
            let layout = layout_on::<Cuda>(args.layout);
            let name = format!("cuda on {}", ops.device_name());
            measure::<Autodiff<Cuda>>(&args, &Default::default(), layout, &name)?
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => {
            return Err(super::cuda_backend().expect_err("the CUDA stand-in never constructs"));
        }
    };
    if args.json {
        let line = serde_json::to_string(&timing).map_err(|e| Error::Parse {
            what: "bench moe result",
            message: e.to_string(),
        })?;
        println!("{line}");
    } else {
        println!(
            "| backend | layout | N | D | E | F | k | median fwd+bwd | expert TFLOP/s | host reads |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let t = &timing;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} ms | {:.3} | {:.1} |",
            t.backend,
            t.layout,
            t.tokens,
            t.hidden,
            t.experts,
            t.expert_hidden,
            t.top_k,
            t.median_ms,
            t.expert_tflops,
            t.host_reads_per_iteration
        );
    }
    Ok(())
}

fn measure<B: TrainingBackend>(
    args: &MoeBenchArgs,
    device: &B::Device,
    layout: ExpertLayout,
    backend: &str,
) -> Result<MoeTiming> {
    let (n, d, e, f, k) = (
        args.tokens,
        args.hidden,
        args.experts,
        args.expert_hidden,
        args.top_k,
    );
    B::seed(device, 2026);
    let normal = |dims: Vec<usize>, fan_in: usize| {
        let scale = 1.0 / (fan_in as f64).sqrt();
        let len: usize = dims.iter().product();
        Tensor::<B, 1>::random([len], Distribution::Normal(0.0, scale), device)
    };
    let w = MoeWeights {
        router: normal(vec![d, e], d).reshape([d, e]).require_grad(),
        theta: Tensor::<B, 1>::ones([1], device).require_grad(),
        gate: normal(vec![e, d, f], d).reshape([e, d, f]).require_grad(),
        up: normal(vec![e, d, f], d).reshape([e, d, f]).require_grad(),
        down: normal(vec![e, f, d], f).reshape([e, f, d]).require_grad(),
    };
    let x = normal(vec![n, d], 1).reshape([n, d]).require_grad();
    let upstream = normal(vec![n, d], 1).reshape([n, d]);
    let selector = Selector::TopK(k);
    let bounds = match layout {
        ExpertLayout::Exact => None,
        // Top-k makes exactly N k routes and k per token.
        ExpertLayout::Grouped => Some(LayerBounds::Grouped(RowBound {
            rows: n * k,
            slots: k,
        })),
        ExpertLayout::Padded => {
            // The busiest expert of this input, measured once in the exact layout.
            let fwd = moe_forward(x.clone(), &w, true, selector, None, None, Precision::F32)?;
            let load = read_ints(fwd.routing.selected.clone().sum_dim(0))?;
            let max_load = load.into_iter().max().unwrap_or(1).max(1) as usize;
            Some(LayerBounds::Padded(ExpertBounds::after(max_load, k, n, e)))
        }
    };
    let mut times = Vec::with_capacity(args.steps);
    let mut timed_reads = 0;
    for i in 0..args.warmup + args.steps {
        let started = Instant::now();
        let reads = host_reads::total();
        let fwd = moe_forward(x.clone(), &w, true, selector, None, bounds, Precision::F32)?;
        let grads = (fwd.output * upstream.clone()).sum().backward();
        // Waits for the backward: the queue runs in order, and dW of the gate is among its
        // last results.
        let done = w
            .gate
            .grad(&grads)
            .map(|g| g.sum().into_data().to_vec::<f32>().unwrap_or_default());
        if done.is_none() {
            return Err(Error::Backend {
                backend: "bench moe",
                message: "the backward reached no expert weight".to_string(),
            });
        }
        if i >= args.warmup {
            times.push(started.elapsed().as_secs_f64());
            timed_reads += host_reads::total() - reads;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = 9.0 * 2.0 * (n * k) as f64 * d as f64 * f as f64;
    Ok(MoeTiming {
        backend: backend.to_string(),
        layout: layout.name().to_string(),
        tokens: n,
        hidden: d,
        experts: e,
        expert_hidden: f,
        top_k: k,
        median_ms: median * 1e3,
        expert_tflops: flops / median / 1e12,
        host_reads_per_iteration: timed_reads as f64 / args.steps as f64,
    })
}
