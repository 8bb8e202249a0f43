//! What a run writes for people and visualizers: one JSON object per optimizer step in
//! `metrics.jsonl`, routing samples of a fixed validation snippet in
//! `routing_samples.jsonl`, and `summary.json` at the end. Lines are written whole and
//! flushed, so a reader following a growing file sees at most one partial last line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sim::TrackingSummary;

/// One optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step, from 1.
    pub step: u64,
    /// Routing mode name.
    pub mode: String,
    /// `T`.
    pub target: f64,
    /// `p` this step routed with (mean over layers with per-layer thresholds); `null` for
    /// Top-k.
    pub threshold: Option<f64>,
    /// Per-layer thresholds when each layer has its own controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_per_layer: Option<Vec<f64>>,
    /// The controller's integral `I_t` after this step's update (mean over controllers);
    /// `null` without a controller.
    pub integral: Option<f64>,
    /// `a_t`: mean activated experts per token over all MoE layers and micro-batches.
    pub active_experts: f64,
    /// `a_t` of each MoE layer.
    pub active_experts_per_layer: Vec<f64>,
    /// DRN scale theta of each MoE layer after this step's update.
    pub theta_per_layer: Vec<f64>,
    /// Per layer, `hist[k - 1]` = tokens that activated `k` experts (`k = 1..=E`).
    pub k_histogram_per_layer: Vec<Vec<u64>>,
    /// Per layer, routes to each expert.
    pub expert_load_per_layer: Vec<Vec<u64>>,
    /// Total training loss (cross-entropy + weighted auxiliary losses).
    pub loss: f64,
    /// Cross-entropy (nats per token).
    pub ce_loss: f64,
    /// Load-balancing loss (mean over layers, unweighted).
    pub balance_loss: f64,
    /// Router entropy (mean over layers, nats, unweighted).
    pub entropy_loss: f64,
    /// Validation cross-entropy, on steps where it was computed.
    pub val_loss: Option<f64>,
    /// Learning rate of this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over this step.
    pub tokens_per_sec: f64,
    /// Training tokens seen so far.
    pub tokens: u64,
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// The routing of a fixed validation snippet at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutingSample {
    /// Optimizer step after which the sample was taken (0: before training).
    pub step: u64,
    /// The snippet's tokens.
    pub tokens: Vec<u32>,
    /// Printable text of each token (bytes and synthetic ids shown as such).
    pub text: Vec<String>,
    /// Difficulty in bits of each token (synthetic corpus only).
    pub difficulty: Option<Vec<f32>>,
    /// Per MoE layer, per token: the selected experts in rank order.
    pub experts: Vec<Vec<Vec<u32>>>,
    /// Per MoE layer, per token: the routing probability of each selected expert.
    pub probs: Vec<Vec<Vec<f32>>>,
}

/// What `summary.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Routing mode name.
    pub mode: String,
    /// Steps trained.
    pub steps: u64,
    /// `T`.
    pub target: f64,
    /// Validation loss before the first step.
    pub initial_val_loss: f64,
    /// Validation loss after the last step.
    pub final_val_loss: f64,
    /// Mean training cross-entropy over the last 10% of steps.
    pub final_train_loss: f64,
    /// `a_t` tracking against `T` (settling, mean and std over the settled window).
    pub tracking: TrackingSummary,
    /// Mean and standard deviation of `a_t` over the second half of the run.
    pub active_mean_second_half: f64,
    /// See `active_mean_second_half`.
    pub active_std_second_half: f64,
    /// The threshold at the end (`null` for Top-k).
    pub final_threshold: Option<f64>,
    /// `a_t` of each MoE layer, mean over the last 10% of steps.
    pub final_active_per_layer: Vec<f64>,
    /// Theta of each MoE layer at the end.
    pub final_theta_per_layer: Vec<f64>,
    /// On the synthetic corpus: activated experts of the validation tokens, grouped by
    /// the difficulty of the token they predict (empty for text corpora).
    pub experts_by_difficulty: Vec<DifficultyBucket>,
    /// On `synthetic:reasoning`: loss and activated experts of the validation tokens,
    /// grouped by the class of the token they predict (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_class: Vec<ClassBucket>,
    /// Mean training tokens per second (after the first step).
    pub tokens_per_sec: f64,
    /// Wall time of the run in seconds.
    pub elapsed_s: f64,
}

/// Loss and routing of the validation tokens whose next token is of one class
/// ([`crate::data::TokenClass`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassBucket {
    /// The class's name (`random`, `copy`, `recall`, `compose`).
    pub class: String,
    /// Token positions in the bucket (over all validation batches).
    pub tokens: u64,
    /// Mean cross-entropy of those positions, nats.
    pub loss: f64,
    /// Mean activated experts per token, over all MoE layers.
    pub mean_active: f64,
    /// Mean activated experts per token in each MoE layer.
    pub mean_active_per_layer: Vec<f64>,
}

/// Routing of the validation tokens whose next token has one difficulty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DifficultyBucket {
    /// Entropy in bits of the predicted token under the generator.
    pub difficulty_bits: f64,
    /// Token positions in the bucket (over all validation batches).
    pub tokens: u64,
    /// Mean activated experts per token, over all MoE layers.
    pub mean_active: f64,
    /// Mean activated experts per token in each MoE layer.
    pub mean_active_per_layer: Vec<f64>,
}

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct JsonLines {
    path: PathBuf,
    file: File,
}

impl JsonLines {
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io("cannot create", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Opens an existing file to add lines after the ones it holds (resume).
    pub fn open_append(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io("cannot open for appending", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one object as one line, written and flushed at once.
    pub fn append<T: Serialize>(&mut self, value: &T) -> Result<()> {
        let mut line = serde_json::to_vec(value).map_err(|e| Error::Parse {
            what: "metrics record",
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io("cannot append to", &self.path, e))
    }
}
