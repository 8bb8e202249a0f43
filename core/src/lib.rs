//! dtopp: sparsity-controllable dynamic Top-p routing for Mixture-of-Experts models
//! (DTop-p; Jin et al., ICML 2026, arXiv 2512.13996).
//!
//! - [`ops`]: the routing-ops contract ([`ops::RoutingOps`]) every backend implements;
//! - [`cpu`]: the CPU reference, the spec in plain loops;
//! - [`cpu_fast`]: the same ops made fast for work (both cores, no full sort);
//! - [`controller`]: the PI controller on the Top-p threshold;
//! - [`data`]: the built-in synthetic language and byte-level text corpora;
//! - [`sim`]: the closed-loop simulator (controller on synthetic router logits);
//! - [`io`]: `.npy` / `.npz` arrays and atomic writes;
//! - [`metrics`]: what a training run writes (`metrics.jsonl`, routing samples, summary),
//!   readable without burn (the desktop app and the browser demo);
//! - `model` (feature `train`): the MoE language model on burn;
//! - `train` (feature `train`): presets, losses, AdamW, the controller in the loop, metrics;
//! - `reproduce` (feature `reproduce`): every routing mode on the same data, report, plots;
//! - `cli` (feature `cli`): the `dtopp` command-line program.

pub mod backends;
pub mod controller;
pub mod cpu;
pub mod cpu_fast;
pub mod data;
pub mod error;
pub mod host_reads;
pub mod io;
pub mod metrics;
pub mod ops;
pub mod rng;
pub mod sim;

#[cfg(feature = "train")]
pub mod model;

#[cfg(feature = "train")]
pub mod train;

#[cfg(feature = "train")]
pub mod infer;

#[cfg(feature = "reproduce")]
pub mod reproduce;

#[cfg(feature = "cli")]
pub mod cli;

pub use error::{Error, Result};
