//! `dtopp bench routing`: per-op and whole-step timings of a routing backend, with the
//! CPU reference measured in the same run as the baseline.

use std::time::Instant;

use clap::{Args, Subcommand};

use super::Backend;
use crate::backends::KernelSet;
use crate::controller::{ControllerConfig, calibrate_threshold, device_state};
use crate::cpu::CpuReference;
use crate::error::{Error, Result};
use crate::ops::{Normalization, RouteShape, RoutingOps};
use crate::rng::SplitMix64;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Time DRN, selection, dispatch plan, gather, combine, the controller update and the
    /// whole routing step on one backend, beside the CPU reference.
    Routing(RoutingBenchArgs),
    /// Time real training steps of a preset: tokens/s, MFU and peak memory (beside
    /// `bench/torch_moe.py`, the PyTorch eager baseline of the same model).
    #[cfg(feature = "train")]
    Train(super::bench_train::TrainBenchArgs),
    /// Time one MoE layer forward and backward in a layout of the experts' rows (beside
    /// `bench/torch_moe_layer.py`, PyTorch eager's layer and a dense SwiGLU of the same
    /// FLOPs).
    #[cfg(feature = "train")]
    Moe(super::bench_moe::MoeBenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RoutingBenchArgs {
    /// Backend to measure (the CPU reference always runs too, as the baseline, unless
    /// `--no-cpu-baseline`).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// N, tokens per call.
    #[arg(long, default_value_t = 65536)]
    tokens: usize,
    /// E, experts.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// T, target experts per token (sets the threshold and the controller's target).
    #[arg(long, default_value_t = 8.0)]
    target: f64,
    /// D, hidden size of the rows moved by gather and combine (lavapipe allows 128 MiB
    /// per buffer: C * D * 4 bytes must fit).
    #[arg(long, default_value_t = 16)]
    hidden: usize,
    /// Cap on experts per token for Top-p (default 2T, at most E); it bounds the route
    /// capacity C = N * k_max that device backends allocate.
    #[arg(long)]
    k_max: Option<usize>,
    /// Timed runs per op (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed runs per op first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Routing steps run back to back for the `steps` line (what a training step costs).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// One JSON object per line per (backend, op) instead of the table.
    #[arg(long)]
    json: bool,
    /// Skip the CPU reference baseline (for sweeps on a GPU beside another baseline,
    /// `bench/torch_routing.py --dtopp`: the single-threaded reference takes minutes at
    /// N = 65536, E = 256).
    #[arg(long)]
    no_cpu_baseline: bool,
}

/// One measured op.
#[derive(Clone, Debug)]
struct Timing {
    op: &'static str,
    median_us: f64,
    bytes: f64,
    launches: usize,
}

pub(crate) fn run(command: BenchCommand) -> Result<()> {
    let args = match command {
        BenchCommand::Routing(args) => args,
        #[cfg(feature = "train")]
        BenchCommand::Train(args) => return super::bench_train::run(args),
        #[cfg(feature = "train")]
        BenchCommand::Moe(args) => return super::bench_moe::run(args),
    };
    if args.iters == 0 || args.tokens == 0 || args.experts == 0 || args.hidden == 0 {
        return Err(Error::param(
            "bench sizes",
            0,
            "--tokens, --experts, --hidden and --iters of at least 1",
        ));
    }
    ControllerConfig::new(args.target, args.experts).validate()?;
    let shape = RouteShape::new(args.tokens, args.experts)?;
    let k_max = args
        .k_max
        .unwrap_or((2.0 * args.target).ceil() as usize)
        .min(args.experts);
    crate::ops::check_k_max(Some(k_max), args.experts)?;
    eprintln!(
        "bench routing: N={} E={} T={} k_max={k_max} D={} iters={} (median after {} warm-up runs)",
        args.tokens, args.experts, args.target, args.hidden, args.iters, args.warmup
    );
    let cpu = if !args.no_cpu_baseline {
        measure(&CpuReference, shape, &args, k_max, [0; 5])?
    } else if matches!(args.backend, Backend::CpuReference) {
        return Err(Error::param(
            "--no-cpu-baseline",
            "set",
            "a backend to measure beside nothing (--backend cpu, wgpu or cuda)",
        ));
    } else {
        Vec::new()
    };
    let (name, device) = match args.backend {
        Backend::CpuReference => ("cpu-reference", None),
        Backend::Cpu => {
            let ops = crate::cpu_fast::CpuFast;
            eprintln!("cpu: the fast routing ops on {} threads", ops.threads());
            ("cpu", Some(measure(&ops, shape, &args, k_max, [0; 5])?))
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let ops = super::wgpu_backend()?;
            // Launches per op of the WGSL kernels: drn, select, drn+select (not fused:
            // the two), plan (count, scan, scatter), gather, combine... see
            // shaders/src/kernels.rs.
            (
                "wgpu",
                Some(measure(&ops, shape, &args, k_max, [1, 1, 2, 3, 1])?),
            )
        }
        Backend::Cuda => {
            let ops = super::cuda_backend()?;
            // Launches per op of the CUDA kernels: drn, select, drn+select (one fused
            // kernel up to 256 experts), plan (count, scan, scatter), gather, combine
            // (see cuda/src/device.rs).
            let fused = if ops.kernels().fuses_drn_select(args.experts) {
                1
            } else {
                2
            };
            (
                "cuda",
                Some(measure(&ops, shape, &args, k_max, [1, 1, fused, 3, 1])?),
            )
        }
    };
    let rows: Vec<(&str, &Timing)> = match &device {
        Some(d) => d
            .iter()
            .map(|t| (name, t))
            .chain(cpu.iter().map(|t| ("cpu-reference", t)))
            .collect(),
        None => cpu.iter().map(|t| ("cpu-reference", t)).collect(),
    };
    if args.json {
        for (backend, t) in &rows {
            println!(
                "{}",
                serde_json::json!({
                    "backend": backend,
                    "op": t.op,
                    "tokens": args.tokens,
                    "experts": args.experts,
                    "hidden": args.hidden,
                    "median_us": t.median_us,
                    "gbps": t.bytes / t.median_us / 1e3,
                    "launches": t.launches,
                })
            );
        }
        return Ok(());
    }
    println!("| backend | op | median µs | GB/s | launches | speed-up vs cpu-reference |");
    println!("|---|---|---|---|---|---|");
    for (backend, t) in &rows {
        let speed_up = cpu
            .iter()
            .find(|c| c.op == t.op)
            .map_or("-".to_string(), |c| {
                format!("{:.2}x", c.median_us / t.median_us)
            });
        println!(
            "| {backend} | {} | {:.1} | {:.2} | {} | {speed_up} |",
            t.op,
            t.median_us,
            t.bytes / t.median_us / 1e3,
            t.launches,
        );
    }
    Ok(())
}

fn median_us<O: RoutingOps>(
    ops: &O,
    args: &RoutingBenchArgs,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..args.warmup {
        f()?;
        ops.synchronize()?;
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let start = Instant::now();
        f()?;
        ops.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Times every op; `launches` = kernel launches of drn, select, drn+select, plan, gather
/// (combine and the controller take as many as gather; 0 everywhere on the CPU).
fn measure<O: RoutingOps>(
    ops: &O,
    shape: RouteShape,
    args: &RoutingBenchArgs,
    k_max: usize,
    launches: [usize; 5],
) -> Result<Vec<Timing>> {
    let k_max = Some(k_max);
    let (n, e, d) = (shape.tokens, shape.experts, args.hidden);
    let mut rng = SplitMix64::new(1);
    let logits: Vec<f32> = (0..n * e).map(|_| rng.normal() as f32 * 2.0).collect();
    let norm = Normalization::Drn { theta: 1.0 };
    let host_probs = crate::cpu::drn_forward(&logits, shape, norm)?;
    let p0 = calibrate_threshold(&host_probs, shape, args.target)? as f32;
    let config = ControllerConfig::new(args.target, e);

    let logits = ops.upload_floats(&logits)?;
    let probs = ops.drn_forward(&logits, shape, norm)?;
    let mut state = ops.upload_floats(&device_state(p0))?;
    let selection = ops.top_p(&probs, shape, &state, k_max)?;
    let plan = ops.dispatch_plan(&selection)?;
    let routes = ops.read_plan(&plan)?.route_tokens.len();
    let x = ops.upload_floats(&vec![0.5f32; n * d])?;
    let y = ops.upload_floats(&vec![0.25f32; plan.route_capacity * d])?;

    let (f, i) = (4.0f64, 4.0f64);
    let ne = (n * e) as f64;
    let mut out = Vec::new();
    let mut time = |op, bytes: f64, launches: usize, us: f64| {
        out.push(Timing {
            op,
            median_us: us,
            bytes,
            launches,
        })
    };
    let [l_drn, l_sel, l_fused, l_plan, l_move] = launches;
    let us = median_us(ops, args, || {
        ops.drn_forward(&logits, shape, norm).map(drop)
    })?;
    time("drn", 2.0 * ne * f, l_drn, us);
    let us = median_us(ops, args, || {
        ops.top_p(&probs, shape, &state, k_max).map(drop)
    })?;
    time("select", ne * f + 2.0 * ne * f + n as f64 * i, l_sel, us);
    // DRN and selection in one call: logits read once, probabilities and the selection
    // written once (what the fused CUDA kernel moves).
    let us = median_us(ops, args, || {
        ops.drn_top_p(&logits, shape, norm, &state, k_max).map(drop)
    })?;
    time("drn+select", 4.0 * ne * f + n as f64 * i, l_fused, us);
    let us = median_us(ops, args, || ops.dispatch_plan(&selection).map(drop))?;
    time(
        "plan",
        2.0 * ne * f + n as f64 * i + routes as f64 * 8.0 + ne * i,
        l_plan,
        us,
    );
    let us = median_us(ops, args, || ops.gather(&x, d, &plan).map(drop))?;
    time("gather", 2.0 * (routes * d) as f64 * f, l_move, us);
    let us = median_us(ops, args, || ops.combine(&y, d, &plan).map(drop))?;
    time("combine", (routes * d + n * d) as f64 * f, l_move, us);
    let counts = &selection.counts;
    let us = median_us(ops, args, || {
        ops.controller_update(&mut state, counts, &config)
    })?;
    time("controller", n as f64 * i, l_move, us);

    // The whole routing step (DRN and Top-p at the device threshold in one call, plan,
    // controller update), `steps` times back to back with one wait at the end.
    let mut state = ops.upload_floats(&device_state(p0))?;
    let mut step = || -> Result<()> {
        let s = ops
            .drn_top_p(&logits, shape, norm, &state, k_max)?
            .selection;
        ops.dispatch_plan(&s)?;
        ops.controller_update(&mut state, &s.counts, &config)
    };
    let us = median_us(ops, args, || {
        for _ in 0..args.steps.max(1) {
            step()?;
        }
        Ok(())
    })? / args.steps.max(1) as f64;
    let step_bytes = out
        .iter()
        .filter(|t| matches!(t.op, "drn+select" | "plan" | "controller"))
        .map(|t| t.bytes)
        .sum();
    out.push(Timing {
        op: "step",
        median_us: us,
        bytes: step_bytes,
        launches: l_fused + l_plan + l_move,
    });
    Ok(out)
}
