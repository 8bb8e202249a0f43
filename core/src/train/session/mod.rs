//! One training run held in memory and advanced a step at a time: the model, the
//! optimizer, the threshold policy and the data position. `train` drives it to the end
//! and writes the run directory; the desktop app drives it live (pause, single step,
//! target, gains and mode changed between steps).
//!
//! A step top to bottom: [`TrainSession::step`] (`step.rs`) runs the micro-batches
//! (`micro_batch.rs`), counts their routing (`routing_stats.rs`), updates AdamW and the
//! threshold policy, then evaluates when due. `p_0` is calibrated in `calibration.rs`.

use std::time::Instant;

use crate::model::{RoutingBackend, TrainingBackend};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::adamw::AdamW;
use super::batches::{Batch, Corpus};
use super::checkpoint::{Checkpoint, CheckpointHeader};
use super::collective::Rank;
use super::config::TrainConfig;
use super::device_control::DeviceControl;
use super::evaluate::{Evaluation, batch_tensors, evaluate, host_f32, routing_sample};
use super::loop_limit::check_loop_limits;
use super::losses::{LossParts, total_loss, total_loss_on_device};
use super::memory_estimate::check_fits;
use super::mode::RoutingMode;
use super::param_values::{NumberParams, load_params};
use super::schedule::learning_rate;
use super::threshold::ThresholdPolicy;
use crate::controller::{ThresholdScope, calibrate_threshold};
use crate::error::{Error, Result};
use crate::metrics::{ClassBucket, DifficultyBucket, RoutingSample, RunSummary, StepMetrics};
use crate::model::{
    ExpertBounds, ExpertLayout, LayerBounds, LayerNeeds, MoeForward, MoeLanguageModel, PaddedUsage,
    Precision, RoutingPlan, Selector, non_finite_logit, read_ints,
};
use crate::ops::RouteShape;
use crate::sim::{TrackingSummary, mean_std};

mod calibration;
mod micro_batch;
mod routing_stats;
mod step;

use calibration::initial_thresholds;
use micro_batch::Pass;
use routing_stats::RoutingStats;

/// What one optimizer step produced.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The step's metrics (one line of `metrics.jsonl`).
    pub metrics: StepMetrics,
    /// The routing sample, on steps that take one.
    pub sample: Option<RoutingSample>,
}

/// A run in progress.
pub struct TrainSession<B: TrainingBackend> {
    config: TrainConfig,
    device: B::Device,
    layout: ExpertLayout,
    corpus: Corpus,
    // `None` only while an optimizer step owns the model.
    model: Option<MoeLanguageModel<B>>,
    optimizer: AdamW<B>,
    policy: ThresholdPolicy,
    validation: Vec<Batch>,
    snippet: Batch,
    layers: usize,
    step: u64,
    initial_val: f64,
    last_val: f64,
    by_difficulty: Vec<DifficultyBucket>,
    by_class: Vec<ClassBucket>,
    history: Vec<StepMetrics>,
    busy_s: f64,
    // `Some` in a data-parallel run (even of one rank: the same code path).
    rank: Option<Rank>,
    // The padded or grouped layout's bounds per MoE layer ([`LayerBounds`]), from the
    // last step (the last micro-batch, where they are read one at a time); `None` until
    // one has been measured.
    bounds: Option<Vec<LayerBounds>>,
    // Set when a deferred pass outgrew its bounds: the step runs again immediately.
    redo_immediate: bool,
    // How the padded or grouped layout went in this process.
    padded: PaddedUsage,
    // The controller(s) on the device, where a single-process run routes with bounds
    // (padded or grouped): the updates happen there and `policy` holds the copy read at each step's
    // end. `None` otherwise, and after a host-side change (target, gains, mode), until
    // the next step uploads the policy again.
    control: Option<DeviceControl<B>>,
}

impl<B: TrainingBackend> std::fmt::Debug for TrainSession<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainSession")
            .field("mode", &self.config.routing.mode)
            .field("step", &self.step)
            .field("policy", &self.policy)
            .field("rank", &self.rank)
            .finish()
    }
}

impl<B: TrainingBackend> TrainSession<B> {
    /// Builds the model `config` describes on `device` (its experts' rows in `layout`),
    /// opens the corpus, calibrates the threshold and measures the initial validation
    /// loss.
    pub fn new(config: &TrainConfig, device: &B::Device, layout: ExpertLayout) -> Result<Self> {
        Self::start(config, device, layout, None)
    }

    /// [`TrainSession::new`] for rank `rank` of a data-parallel run, which must have
    /// joined the collective ([`Rank::join`]). Every rank builds the same model (same
    /// seed) and calibrates the same `p_0` (on the whole global batch); only the leader
    /// evaluates.
    pub fn new_rank(
        config: &TrainConfig,
        device: &B::Device,
        layout: ExpertLayout,
        rank: Rank,
    ) -> Result<Self> {
        Self::start(config, device, layout, Some(rank))
    }

    /// The device the model trains on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn start(
        config: &TrainConfig,
        device: &B::Device,
        layout: ExpertLayout,
        rank: Option<Rank>,
    ) -> Result<Self> {
        config.validate()?;
        check_world(config, rank)?;
        check_loop_limits::<B>(config, device)?;
        if rank.is_none() {
            // A data-parallel run checked the whole world before its ranks started (each
            // rank's own check would count the others' models as already used).
            check_fits::<B>(config, device)?;
        }
        let run = &config.run;
        let (corpus, validation, snippet) = open_data(config, rank)?;
        let model =
            MoeLanguageModel::<B>::new(&config.model, run.seed, device)?.map(&mut NumberParams(0));
        let layers = model.moe_layers().count();
        let initial = initial_thresholds(config, &model.valid(), &corpus, device)?;
        let policy = ThresholdPolicy::new(config, layers, &initial)?;
        let mut session = Self {
            config: config.clone(),
            device: device.clone(),
            layout,
            corpus,
            model: Some(model),
            optimizer: AdamW::new(config.optimizer.clone()),
            policy,
            validation,
            snippet,
            layers,
            step: 0,
            initial_val: f64::NAN,
            last_val: f64::NAN,
            by_difficulty: Vec::new(),
            by_class: Vec::new(),
            history: Vec::new(),
            busy_s: 0.0,
            rank,
            bounds: None,
            redo_immediate: false,
            padded: PaddedUsage::default(),
            control: None,
        };
        if session.is_leader() {
            let evaluation = session.evaluate()?;
            session.initial_val = evaluation.loss;
            session.last_val = evaluation.loss;
            session.by_difficulty = evaluation.by_difficulty;
            session.by_class = evaluation.by_class;
        }
        Ok(session)
    }

    /// Continues a run from `checkpoint` (whose model must be `config`'s) with the
    /// metrics of its steps so far (`history`, steps `1..=checkpoint step`). Routing
    /// settings come from the checkpoint; the rest (such as `run.steps`) from `config`.
    /// `rank`: as in [`TrainSession::new_rank`] (every rank restores the same checkpoint).
    pub fn restore(
        config: &TrainConfig,
        device: &B::Device,
        layout: ExpertLayout,
        checkpoint: &Checkpoint,
        history: Vec<StepMetrics>,
        rank: Option<Rank>,
    ) -> Result<Self> {
        let Checkpoint {
            header,
            params,
            moments,
        } = checkpoint;
        if header.model != config.model {
            return Err(Error::Parse {
                what: "checkpoint",
                message: "its model differs from the run's config.toml [model]; resume with the config the run was started with".into(),
            });
        }
        if history.len() as u64 != header.step {
            return Err(Error::Parse {
                what: "checkpoint",
                message: format!(
                    "metrics.jsonl holds {} steps up to the checkpoint's step {}: the run directory is incomplete",
                    history.len(),
                    header.step
                ),
            });
        }
        let mut config = config.clone();
        config.routing = header.routing.clone();
        config.validate()?;
        check_world(&config, rank)?;
        check_loop_limits::<B>(&config, device)?;
        if rank.is_none() {
            check_fits::<B>(&config, device)?;
        }
        let (corpus, validation, snippet) = open_data(&config, rank)?;
        let fresh = MoeLanguageModel::<B>::new(&config.model, config.run.seed, device)?;
        let (model, ids) = load_params(fresh, header, params)?;
        let layers = model.moe_layers().count();
        let mut optimizer = AdamW::new(config.optimizer.clone());
        let with_moments = ids
            .iter()
            .zip(&header.has_moments)
            .filter(|(_, has)| **has)
            .zip(moments)
            .map(|((id, _), (first, second))| (*id, first.clone(), second.clone()))
            .collect();
        optimizer.restore(header.adam_step, with_moments, device);
        let policy = ThresholdPolicy::from_state(&config, layers, header.policy.clone())?;
        Ok(Self {
            config,
            device: device.clone(),
            layout,
            corpus,
            model: Some(model),
            optimizer,
            policy,
            validation,
            snippet,
            layers,
            step: header.step,
            initial_val: header.initial_val,
            last_val: header.last_val,
            by_difficulty: header.by_difficulty.clone(),
            by_class: header.by_class.clone(),
            history,
            busy_s: header.busy_s,
            rank,
            bounds: None,
            redo_immediate: false,
            padded: PaddedUsage::default(),
            control: None,
        })
    }

    /// Everything needed to continue this run exactly (see [`TrainSession::restore`]).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let mut collect = CollectParams::<B> {
            optimizer: &self.optimizer,
            shapes: Vec::new(),
            values: Vec::new(),
            moments: Vec::new(),
            error: None,
        };
        self.model().visit(&mut collect);
        if let Some(e) = collect.error {
            return Err(Error::Backend {
                backend: "burn",
                message: format!("reading parameters for a checkpoint: {e}"),
            });
        }
        let has_moments: Vec<bool> = collect.moments.iter().map(Option::is_some).collect();
        Ok(Checkpoint {
            header: CheckpointHeader {
                step: self.step,
                model: self.config.model.clone(),
                routing: self.config.routing.clone(),
                shapes: collect.shapes,
                has_moments,
                adam_step: self.optimizer.steps_taken(),
                policy: self.policy.state(),
                initial_val: self.initial_val,
                last_val: self.last_val,
                busy_s: self.busy_s,
                by_difficulty: self.by_difficulty.clone(),
                by_class: self.by_class.clone(),
            },
            params: collect.values,
            moments: collect.moments.into_iter().flatten().collect(),
        })
    }

    /// Whether this session evaluates and takes routing samples (the only one, or rank 0
    /// of a data-parallel run: the other ranks' validation numbers are left `NaN`).
    pub fn is_leader(&self) -> bool {
        self.rank.is_none_or(|r| r.is_leader())
    }

    /// The configuration in force (with any target, gains or mode changed since).
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps taken.
    pub fn step_index(&self) -> u64 {
        self.step
    }

    /// Whether `run.steps` steps have been taken.
    pub fn finished(&self) -> bool {
        self.step >= self.config.run.steps
    }

    /// MoE layers of the model.
    pub fn moe_layers(&self) -> usize {
        self.layers
    }

    /// The corpus trained on.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// The layout of the experts' rows.
    pub fn layout(&self) -> ExpertLayout {
        self.layout
    }

    /// The thresholds of the next step, one per MoE layer (`None` for Top-k).
    pub fn thresholds(&self) -> Option<Vec<f64>> {
        self.policy.thresholds()
    }

    /// Validation loss before the first step.
    pub fn initial_val_loss(&self) -> f64 {
        self.initial_val
    }

    /// The most recent validation loss.
    pub fn last_val_loss(&self) -> f64 {
        self.last_val
    }

    /// Every step's metrics so far.
    pub fn history(&self) -> &[StepMetrics] {
        &self.history
    }

    fn model(&self) -> &MoeLanguageModel<B> {
        self.model
            .as_ref()
            .expect("the model is only taken inside an optimizer step")
    }

    fn plan(&self) -> RoutingPlan {
        RoutingPlan {
            use_drn: self.config.routing.mode.uses_drn(),
            selectors: self
                .policy
                .selectors(self.layers, self.config.routing.k_max),
            bounds: None,
        }
    }

    /// Starts the padded layout ([`ExpertLayout::Padded`]) from `bounds`, one per
    /// MoE layer, instead of measuring the next step in the exact layout first.
    pub fn set_padded_bounds(&mut self, bounds: Vec<ExpertBounds>) -> Result<()> {
        self.set_bounds(bounds.into_iter().map(LayerBounds::Padded).collect())
    }

    /// Starts the padded or grouped layout from `bounds`, one per MoE layer and of the
    /// session's layout, instead of measuring the next step in the exact layout first.
    pub fn set_bounds(&mut self, bounds: Vec<LayerBounds>) -> Result<()> {
        if bounds.len() != self.layers {
            return Err(Error::param(
                "expert row bounds",
                bounds.len(),
                format!("one per MoE layer ({})", self.layers),
            ));
        }
        let fits_layout = |b: &LayerBounds| {
            matches!(
                (b, self.layout),
                (LayerBounds::Padded(_), ExpertLayout::Padded)
                    | (LayerBounds::Grouped(_), ExpertLayout::Grouped)
            )
        };
        if let Some(other) = bounds.iter().find(|b| !fits_layout(b)) {
            return Err(Error::param(
                "expert row bounds",
                format!("{other:?}"),
                format!("bounds of the session's layout ({})", self.layout.name()),
            ));
        }
        self.bounds = Some(bounds);
        Ok(())
    }

    /// Bounds for the next micro-batch of `tokens` tokens in the session's layout, from
    /// what each layer needed (`None` in the exact layout).
    fn next_bounds(&self, needs: &[LayerNeeds], tokens: usize) -> Option<Vec<LayerBounds>> {
        let experts = self.config.model.experts;
        let selectors = self.plan().selectors;
        needs
            .iter()
            .zip(selectors)
            .map(|(&n, selector)| LayerBounds::after(self.layout, n, tokens, experts, selector))
            .collect()
    }

    /// How the padded or grouped layout went in this session; `None` in the exact
    /// layout.
    pub fn padded_usage(&self) -> Option<PaddedUsage> {
        self.layout.bounded().then_some(self.padded)
    }

    /// Changes `T` from the next step on. The controller keeps its integral (a bumpless
    /// change); Top-k takes `k = T`; a fixed threshold ignores it, by design.
    pub fn set_target(&mut self, target: f64) -> Result<()> {
        let mut config = self.config.clone();
        config.routing.target = target;
        config.validate()?;
        match &mut self.policy {
            ThresholdPolicy::Controlled(control) => control.set_target(target)?,
            ThresholdPolicy::TopK(k) => *k = target as usize,
            ThresholdPolicy::Fixed(_) => {}
        }
        self.config = config;
        self.control = None;
        Ok(())
    }

    /// Changes the controller's gains from the next update on.
    pub fn set_gains(&mut self, kp: f64, ki: f64) -> Result<()> {
        let mut config = self.config.clone();
        config.routing.kp = kp;
        config.routing.ki = ki;
        config.validate()?;
        if let ThresholdPolicy::Controlled(control) = &mut self.policy {
            control.set_gains(kp, ki)?;
        }
        self.config = config;
        self.control = None;
        Ok(())
    }

    /// Switches the routing mode from the next step on. A threshold mode continues
    /// from the current threshold when there is one, otherwise it is calibrated to `T`
    /// on the current model; the controller starts with an empty integral.
    pub fn set_mode(&mut self, mode: RoutingMode) -> Result<()> {
        if mode == self.config.routing.mode {
            return Ok(());
        }
        let mut config = self.config.clone();
        config.routing.mode = mode;
        config.validate()?;
        let initial = match self.policy.thresholds() {
            Some(p) => p,
            None => initial_thresholds(&config, &self.model().valid(), &self.corpus, &self.device)?,
        };
        self.policy = ThresholdPolicy::new(&config, self.layers, &initial)?;
        self.config = config;
        self.control = None;
        Ok(())
    }

    /// The routing of the fixed validation snippet under the current model and policy.
    pub fn routing_sample(&self) -> Result<RoutingSample> {
        routing_sample(
            &self.model().valid(),
            &self.snippet,
            &self.corpus,
            &self.plan(),
            self.step,
        )
    }

    fn evaluate(&self) -> Result<Evaluation> {
        evaluate(
            &self.model().valid(),
            &self.validation,
            &self.plan(),
            &self.device,
        )
    }

    /// What `summary.json` holds, for the steps taken so far.
    pub fn summary(&self) -> Result<RunSummary> {
        let history = &self.history;
        if history.is_empty() {
            return Err(Error::param("steps taken", 0, "at least 1 for a summary"));
        }
        let active: Vec<f64> = history.iter().map(|m| m.active_experts).collect();
        let targets: Vec<f64> = history.iter().map(|m| m.target).collect();
        let (mean, std) = mean_std(&active[active.len() / 2..]);
        let tail = &history[history.len() - (history.len() / 10).max(1)..];
        let later = &history[1.min(history.len() - 1)..];
        let tokens_per_sec =
            later.iter().map(|m| m.tokens_per_sec).sum::<f64>() / later.len() as f64;
        Ok(RunSummary {
            mode: self.config.routing.mode.name().to_string(),
            steps: self.step,
            target: self.config.routing.target,
            initial_val_loss: self.initial_val,
            final_val_loss: self.last_val,
            final_train_loss: tail.iter().map(|m| m.ce_loss).sum::<f64>() / tail.len() as f64,
            tracking: TrackingSummary::of(&active, &targets),
            active_mean_second_half: mean,
            active_std_second_half: std,
            final_threshold: self
                .policy
                .thresholds()
                .map(|p| p.iter().sum::<f64>() / p.len() as f64),
            final_active_per_layer: (0..self.layers)
                .map(|l| {
                    tail.iter()
                        .map(|m| m.active_experts_per_layer[l])
                        .sum::<f64>()
                        / tail.len() as f64
                })
                .collect(),
            final_theta_per_layer: history
                .last()
                .map(|m| m.theta_per_layer.clone())
                .unwrap_or_default(),
            experts_by_difficulty: self.by_difficulty.clone(),
            by_class: self.by_class.clone(),
            tokens_per_sec,
            elapsed_s: self.busy_s,
        })
    }
}

/// Test hook: `rank:step` makes that rank fail at the start of that step (how the tests
/// show that a failing rank stops the others instead of hanging them); `rank:step:kill`
/// kills its whole process with SIGKILL there instead (a node dying in a multi-node run).
pub const FAIL_RANK_ENV: &str = "DTOPP_TEST_FAIL_RANK";

/// `Some(kill)` when [`FAIL_RANK_ENV`] names this rank and step (`kill`: with `:kill`).
fn injected_failure(rank: Rank, step: u64) -> Option<bool> {
    let v = std::env::var(FAIL_RANK_ENV).ok()?;
    let rest = v.strip_prefix(&format!("{}:{step}", rank.index))?;
    match rest {
        "" => Some(false),
        ":kill" => Some(true),
        _ => None,
    }
}

/// A session without a rank runs alone; with one, `run.devices` must be its world.
fn check_world(config: &TrainConfig, rank: Option<Rank>) -> Result<()> {
    let world = rank.map_or(1, |r| r.world);
    if config.run.devices != world {
        return Err(Error::param(
            "run.devices",
            config.run.devices,
            format!("{world}, the number of devices the run is given (--devices)"),
        ));
    }
    Ok(())
}

/// The corpus, the validation batches and the routing-sample snippet of `config`. Only
/// the leader evaluates, so the other ranks of a data-parallel run get no validation
/// batches.
fn open_data(config: &TrainConfig, rank: Option<Rank>) -> Result<(Corpus, Vec<Batch>, Batch)> {
    let run = &config.run;
    let corpus = Corpus::open(config)?;
    // Batches of one rank's size, as many as make `eval_batches` global batches: the
    // same windows and mean for any number of ranks.
    let evaluates = rank.is_none_or(|r| r.is_leader());
    let batches = if evaluates {
        run.eval_batches * run.devices
    } else {
        0
    };
    let validation = (0..batches)
        .map(|i| corpus.validation_batch(run.seed, i, run.batch_size, config.model.seq_len))
        .collect::<Result<_>>()?;
    let snippet = corpus.validation_batch(run.seed ^ 0x5A4D, 0, 1, config.model.seq_len)?;
    Ok((corpus, validation, snippet))
}

/// Reads every parameter (and its AdamW moments) in visiting order.
struct CollectParams<'a, B: TrainingBackend> {
    optimizer: &'a AdamW<B>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<f32>>,
    moments: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    error: Option<String>,
}

impl<B: TrainingBackend> ModuleVisitor<B> for CollectParams<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        self.shapes.push(tensor.dims().to_vec());
        match tensor.into_data().convert::<f32>().to_vec::<f32>() {
            Ok(v) => self.values.push(v),
            Err(e) => {
                self.error.get_or_insert(format!("{e:?}"));
                self.values.push(Vec::new());
            }
        }
        self.moments.push(self.optimizer.moments_of(&param.id));
    }
}
