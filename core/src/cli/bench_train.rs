//! `dtopp bench train`: tokens/s, MFU and peak memory of real training steps of a preset
//! on a backend; `--write-config` hands the same model and routing to
//! `bench/torch_moe.py`, the PyTorch eager baseline run beside it.

use std::path::PathBuf;

use clap::Args;

use super::{Backend, layout_on};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::{ExpertLayout, Precision};
use crate::train::{
    MemoryProbe, Preset, RoutingMode, Throughput, ThroughputPlan, TrainConfig, measure_throughput,
    process_peak_rss,
};

#[derive(Debug, Args)]
pub(crate) struct TrainBenchArgs {
    /// Model, routing and batch.
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// TOML file laid over the preset (as for `dtopp train`).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Routing mode.
    #[arg(long, value_enum)]
    mode: Option<RoutingMode>,
    /// Sequences per step (default: the preset's).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Where the model and the routing ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// The layout of the experts' rows (as `dtopp train --layout`; default: exact on
    /// the CPU, grouped on wgpu and cuda).
    #[arg(long, value_enum)]
    layout: Option<ExpertLayout>,
    /// The dtype of the large matrix products (as `dtopp train --precision`).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Timed optimizer steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (kernel compilation, allocator growth).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The device's peak dense TFLOP/s, for MFU (for example 989 for an H100/H200's bf16
    /// tensor cores); without it MFU is not reported.
    #[arg(long, value_name = "TFLOPS")]
    peak_tflops: Option<f64>,
    /// Also write the resolved configuration as JSON (for `bench/torch_moe.py --config`).
    #[arg(long, value_name = "FILE.json")]
    write_config: Option<PathBuf>,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

impl TrainBenchArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::from_preset_and_file(self.preset, self.config.as_deref())?;
        if let Some(mode) = self.mode {
            c.routing.mode = mode;
        }
        if let Some(precision) = self.precision {
            c.run.precision = precision;
        }
        if let Some(batch) = self.batch_size {
            c.run.batch_size = batch;
        }
        c.validate()?;
        Ok(c)
    }
}

pub(crate) fn run(args: TrainBenchArgs) -> Result<()> {
    let config = args.config()?;
    if let Some(path) = &args.write_config {
        let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Parse {
            what: "bench config",
            message: e.to_string(),
        })?;
        write_atomic(path, &json)?;
    }
    let progress = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    progress(format!(
        "bench train: {} ({} parameters, {} tokens per step), mode {}, {} warm-up + {} timed steps on {}",
        clap::ValueEnum::to_possible_value(&args.preset)
            .map_or_else(String::new, |v| v.get_name().to_string()),
        config.model.parameters(),
        config.tokens_per_step(),
        config.routing.mode,
        args.warmup,
        args.steps,
        args.backend.name()
    ));
    let plan = ThroughputPlan {
        warmup: args.warmup,
        steps: args.steps,
        peak_tflops: args.peak_tflops,
    };
    let (result, backend) = match args.backend {
        Backend::Cpu => {
            use burn::backend::{Autodiff, NdArray};
            let memory = MemoryProbe {
                kind: "process peak RSS (VmHWM)",
                sample: &process_peak_rss,
            };
            let device = Default::default();
            let layout = layout_on::<NdArray>(args.layout);
            let name = layout.describe_on::<NdArray>(&device);
            let t = measure_throughput::<Autodiff<NdArray>>(
                &config, &device, layout, plan, memory, &progress,
            )?;
            (t, format!("ndarray (CPU) + {name}"))
        }
        Backend::CpuReference => return Err(super::reference_runs_no_model()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            use burn::backend::{Autodiff, Wgpu};
            let device = super::wgpu_model_device(WgpuDevice::DefaultDevice)?;
            let layout = layout_on::<Wgpu>(args.layout);
            let name = format!("wgpu + {}", layout.describe_on::<Wgpu>(&device));
            let memory = MemoryProbe {
                kind: "not measured (wgpu has no memory counters)",
                sample: &|| None,
            };
            let t = measure_throughput::<Autodiff<Wgpu>>(
                &config, &device, layout, plan, memory, &progress,
            )?;
            (t, name)
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            use burn::backend::{Autodiff, Cuda};
            // The CUDA kernels' handle checks the driver and the device before burn-cuda
            // touches them, and reads the GPU's memory.
            let ops = super::cuda_backend()?;
            let layout = layout_on::<Cuda>(args.layout);
            let name = format!(
                "cuda + {} on {}",
                layout.describe_on::<Cuda>(&Default::default()),
                ops.device_name()
            );
            let in_use = || ops.memory_in_use().ok();
            let memory = MemoryProbe {
                kind: "device memory in use, sampled after every step (burn's pool included)",
                sample: &in_use,
            };
            let t = measure_throughput::<Autodiff<Cuda>>(
                &config,
                &Default::default(),
                layout,
                plan,
                memory,
                &progress,
            )?;
            (t, name)
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => {
            return Err(super::cuda_backend().expect_err("the CUDA stand-in never constructs"));
        }
    };
    report(&result, &backend, args.json);
    Ok(())
}

fn report(t: &Throughput, backend: &str, json: bool) {
    if json {
        let mut value = serde_json::to_value(t).unwrap_or_default();
        value["backend"] = backend.into();
        println!("{value}");
        return;
    }
    let gib = |b: f64| format!("{:.3} GiB", b / (1u64 << 30) as f64);
    let memory = t
        .peak_memory_bytes
        .map_or_else(|| "-".to_string(), |b| gib(b as f64));
    let mfu = t
        .mfu
        .map_or_else(|| "-".to_string(), |m| format!("{:.1} %", 100.0 * m));
    println!(
        "| backend | mode | layout | tokens/s | median step | a_t | model TFLOP/s | MFU | peak memory | estimated before the run | host reads per step | expert rows per route |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {backend} | {} | {} | {:.0} | {:.3} s | {:.3} | {:.3} | {mfu} | {memory} ({}) | {} | {:.1} | {:.2} |",
        t.mode,
        t.layout,
        t.tokens_per_sec,
        t.median_step_s,
        t.active_experts,
        t.model_tflops,
        t.peak_memory_kind,
        gib(t.memory_estimate_bytes),
        t.host_reads_per_step,
        t.expert_rows_per_route
    );
    if let Some(usage) = t.padded {
        println!("\n{}", usage.describe(&t.layout));
    }
}
