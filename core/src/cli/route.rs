//! `dtopp route`: routing ops on arrays, for interop with PyTorch / NumPy and debugging.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::Backend;
use crate::cpu::CpuReference;
use crate::cpu_fast::CpuFast;
use crate::error::{Error, Result};
use crate::io::{NpyArray, read_npy_matrix_f32, write_npz};
use crate::ops::{Normalization, RouteShape, Routed, RoutingOps};
use crate::ops::{check_k_max, check_threshold};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum RouteMode {
    /// The k most probable experts per token.
    Topk,
    /// The fewest most-probable experts whose mass reaches the threshold.
    Topp,
}

#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// Router logits: a float32 [N, E] .npy file.
    #[arg(long, value_name = "IN.npy")]
    logits: PathBuf,
    /// Selection rule.
    #[arg(long, value_enum, default_value_t = RouteMode::Topp)]
    mode: RouteMode,
    /// Experts per token for topk.
    #[arg(long)]
    k: Option<usize>,
    /// Threshold p in (0, 1] for topp.
    #[arg(long)]
    threshold: Option<f32>,
    /// DRN scale theta (DRN is on by default).
    #[arg(long, default_value_t = 1.0, conflicts_with = "no_drn")]
    theta: f32,
    /// Plain softmax of the raw logits instead of DRN.
    #[arg(long)]
    no_drn: bool,
    /// Cap on experts per token (topp).
    #[arg(long)]
    k_max: Option<usize>,
    /// Where the ops run.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Output .npz: probs, experts, counts, weights, offsets, route_tokens, route_weights.
    #[arg(long, value_name = "OUT.npz")]
    out: PathBuf,
}

/// The selection rule with its validated parameter.
enum Rule {
    TopK(usize),
    TopP(f32),
}

pub(crate) fn run(args: RouteArgs) -> Result<()> {
    // Everything that can be checked without the data is checked before reading it.
    let rule = match args.mode {
        RouteMode::Topk => Rule::TopK(args.k.ok_or_else(|| {
            Error::param("k", "missing", "--k K (experts per token) for --mode topk")
        })?),
        RouteMode::Topp => {
            let p = args.threshold.ok_or_else(|| {
                Error::param(
                    "threshold",
                    "missing",
                    "--threshold P in (0, 1] for --mode topp",
                )
            })?;
            check_threshold(p)?;
            Rule::TopP(p)
        }
    };
    let norm = super::normalization(args.no_drn, args.theta)?;

    let (logits, tokens, experts) = read_npy_matrix_f32(&args.logits)?;
    let shape = RouteShape::new(tokens, experts)?;
    check_k_max(args.k_max, experts)?;
    let arrays = match args.backend {
        Backend::Cpu => route_arrays(&CpuFast, &logits, shape, norm, &rule, args.k_max)?,
        Backend::CpuReference => {
            route_arrays(&CpuReference, &logits, shape, norm, &rule, args.k_max)?
        }
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => route_arrays(
            &super::wgpu_backend()?,
            &logits,
            shape,
            norm,
            &rule,
            args.k_max,
        )?,
        Backend::Cuda => route_arrays(
            &super::cuda_backend()?,
            &logits,
            shape,
            norm,
            &rule,
            args.k_max,
        )?,
    };
    write_npz(&args.out, &arrays)?;
    // M = sum_i k_i, the length of the route arrays.
    let routes = arrays[5].1.shape[0];
    println!(
        "routed {tokens} tokens over {experts} experts on {}: mean {:.3} experts per token, {routes} routes -> {}",
        args.backend.name(),
        routes as f64 / tokens as f64,
        args.out.display()
    );
    Ok(())
}

/// Runs the ops on one backend and reads every output back as named arrays.
fn route_arrays<O: RoutingOps>(
    ops: &O,
    logits: &[f32],
    shape: RouteShape,
    norm: Normalization,
    rule: &Rule,
    k_max: Option<usize>,
) -> Result<Vec<(&'static str, NpyArray)>> {
    let (n, e) = (shape.tokens, shape.experts);
    let logits = ops.upload_floats(logits)?;
    // DRN and selection in one call: one fused kernel on CUDA.
    let Routed { probs, selection } = match *rule {
        Rule::TopK(k) => ops.drn_top_k(&logits, shape, norm, k)?,
        Rule::TopP(p) => ops.drn_top_p(&logits, shape, norm, &ops.upload_floats(&[p])?, k_max)?,
    };
    let plan = ops.read_plan(&ops.dispatch_plan(&selection)?)?;
    let selection = ops.read_selection(&selection)?;
    let m = plan.route_tokens.len();
    Ok(vec![
        ("probs", NpyArray::f32(vec![n, e], ops.read_floats(&probs)?)),
        ("experts", NpyArray::i32(vec![n, e], selection.experts)),
        ("counts", NpyArray::i32(vec![n], selection.counts)),
        ("weights", NpyArray::f32(vec![n, e], selection.weights)),
        ("offsets", NpyArray::i32(vec![e + 1], plan.expert_offsets)),
        ("route_tokens", NpyArray::i32(vec![m], plan.route_tokens)),
        ("route_weights", NpyArray::f32(vec![m], plan.route_weights)),
    ])
}
