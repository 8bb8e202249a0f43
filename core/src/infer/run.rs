//! A trained run, ready for inference: its config, its newest intact checkpoint's weights
//! in a model on the chosen backend, and the routing it was trained with.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use super::compute::{CALIBRATION_BATCHES, Calibrated, Compute, calibrate};
use crate::error::{Error, Result};
use crate::model::{MoeLanguageModel, RoutingBackend, RoutingPlan};
use crate::train::{
    Batch, Corpus, PolicyState, RoutingMode, TrainConfig, latest_checkpoint, list_checkpoints,
    read_run_config,
};

/// A run directory's model at its newest intact checkpoint.
#[derive(Debug)]
pub struct TrainedRun<B: Backend> {
    /// The run directory.
    pub dir: PathBuf,
    /// The run's config, with the routing settings in force at the checkpoint.
    pub config: TrainConfig,
    /// The checkpoint loaded.
    pub checkpoint: PathBuf,
    /// Its step.
    pub step: u64,
    /// Damaged newer checkpoints that were skipped, with the reason.
    pub skipped: Vec<String>,
    /// The threshold policy at the checkpoint (the controller's `p` for DTop-p).
    pub policy: PolicyState,
    /// The weights.
    pub model: MoeLanguageModel<B>,
}

impl<B: Backend> TrainedRun<B> {
    /// Loads the run in `dir` onto `device`. A directory that is not a run, has no intact
    /// checkpoint, or whose checkpoint does not fit its config is an error naming it.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Array {
                path: dir.to_path_buf(),
                message: "not a directory: pass the run directory `dtopp train --out` wrote".into(),
            });
        }
        let mut config = read_run_config(dir)?;
        if list_checkpoints(dir)?.is_empty() {
            return Err(Error::Array {
                path: dir.to_path_buf(),
                message: "no checkpoint in checkpoints/: a run writes one when it finishes (or every --checkpoint-every K steps); this run has not got that far".into(),
            });
        }
        let (checkpoint, path, skipped) = latest_checkpoint(dir).map_err(|e| Error::Array {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let header = &checkpoint.header;
        if header.model != config.model {
            return Err(Error::Array {
                path: path.clone(),
                message: format!(
                    "the checkpoint's model {:?} differs from config.toml's [model] {:?}",
                    header.model, config.model
                ),
            });
        }
        config.routing = header.routing.clone();
        config.validate()?;
        let fresh = MoeLanguageModel::<B>::new(&config.model, config.run.seed, device)?;
        let (model, _) =
            crate::train::load_params(fresh, header, &checkpoint.params).map_err(|e| {
                Error::Array {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            step: header.step,
            policy: header.policy.clone(),
            config,
            checkpoint: path,
            skipped,
            model,
        })
    }

    /// The routing mode the run trained with.
    pub fn mode(&self) -> RoutingMode {
        self.config.routing.mode
    }

    /// MoE layers.
    pub fn moe_layers(&self) -> usize {
        self.config.model.moe_layers()
    }

    /// The compute the run was trained with at its checkpoint: Top-k's `k`, or the
    /// thresholds (the controller's current `p` for DTop-p).
    pub fn trained_compute(&self) -> Compute {
        let layers = self.moe_layers();
        match &self.policy {
            PolicyState::TopK(k) => Compute::TopK(*k),
            PolicyState::Fixed(p) => Compute::Thresholds(p.clone()),
            PolicyState::Controlled(states) => Compute::Thresholds(if states.len() == layers {
                states.iter().map(|s| s.threshold).collect()
            } else {
                vec![states[0].threshold; layers]
            }),
        }
    }

    /// How the MoE layers route at `compute`, with the run's normalization and cap.
    pub fn plan(&self, compute: &Compute) -> RoutingPlan {
        RoutingPlan {
            use_drn: self.mode().uses_drn(),
            selectors: compute.selectors(self.moe_layers(), self.config.routing.k_max),
            bounds: None,
        }
    }

    /// The corpus of the run, or `data` (`synthetic`, a text file, `shards:GLOB`) in
    /// its place.
    pub fn corpus(&self, data: Option<&str>) -> Result<Corpus> {
        let mut config = self.config.clone();
        if let Some(source) = data {
            config.data.source = source.to_string();
            config.data.validation = None;
            config.validate()?;
        }
        Corpus::open(&config)
    }

    /// Validation batches the trainer evaluated on (`eval_batches` global batches).
    pub fn evaluated_batches(&self) -> usize {
        self.config.run.eval_batches * self.config.run.devices
    }

    /// Whether tokens are bytes of text (a text corpus), not ids of the synthetic
    /// language or of token shards.
    pub fn byte_tokens(&self) -> bool {
        let source = &self.config.data.source;
        source != "synthetic"
            && source != crate::train::REASONING_SOURCE
            && !source.starts_with(crate::train::SHARDS_PREFIX)
    }

    /// Validation batches `first..first + count` of the run's batch size (batches
    /// `0..eval_batches` are those the trainer evaluated on).
    pub fn validation_batches(
        &self,
        corpus: &Corpus,
        first: usize,
        count: usize,
    ) -> Result<Vec<Batch>> {
        let run = &self.config.run;
        (first..first + count)
            .map(|i| {
                corpus.validation_batch(run.seed, i, run.batch_size, self.config.model.seq_len)
            })
            .collect()
    }
}

impl<B: RoutingBackend> TrainedRun<B> {
    /// The compute for target `T'` ([`calibrate`]) on the default calibration slice:
    /// [`CALIBRATION_BATCHES`] validation batches after those the trainer evaluated on.
    pub fn calibrate_default(&self, target: f64) -> Result<Calibrated> {
        let corpus = self.corpus(None)?;
        let slice =
            self.validation_batches(&corpus, self.evaluated_batches(), CALIBRATION_BATCHES)?;
        calibrate(self, &slice, target)
    }
}
