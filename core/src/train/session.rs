//! One training run held in memory and advanced a step at a time: the model, the
//! optimizer, the threshold policy and the data position. `train` drives it to the end
//! and writes the run directory; the desktop app drives it live (pause, single step,
//! target, gains and mode changed between steps).

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
    ExpertBounds, LayerRouting, MoeForward, MoeLanguageModel, PaddedUsage, Precision, RouteEngine,
    RoutingPlan, Selector, non_finite_logit, read_ints,
};
use crate::ops::RouteShape;
use crate::sim::{TrackingSummary, mean_std};

/// What one optimizer step produced.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The step's metrics (one line of `metrics.jsonl`).
    pub metrics: StepMetrics,
    /// The routing sample, on steps that take one.
    pub sample: Option<RoutingSample>,
}

/// A run in progress.
pub struct TrainSession<'e, B: TrainingBackend> {
    config: TrainConfig,
    device: B::Device,
    engine: &'e RouteEngine,
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
    // The padded layout's bounds per MoE layer ([`RouteEngine::DevicePadded`]), from the
    // last step (the last micro-batch, where they are read one at a time); `None` until
    // one has been measured.
    bounds: Option<Vec<ExpertBounds>>,
    // How the padded layout went in this process.
    padded: PaddedUsage,
    // The controller(s) on the device, where a single-process run routes in padded
    // buffers: the updates happen there and `policy` holds the copy read at each step's
    // end. `None` otherwise, and after a host-side change (target, gains, mode), until
    // the next step uploads the policy again.
    control: Option<DeviceControl<B>>,
}

impl<B: TrainingBackend> std::fmt::Debug for TrainSession<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainSession")
            .field("mode", &self.config.routing.mode)
            .field("step", &self.step)
            .field("policy", &self.policy)
            .field("rank", &self.rank)
            .finish()
    }
}

impl<'e, B: TrainingBackend> TrainSession<'e, B> {
    /// Builds the model `config` describes on `device` (selecting experts through
    /// `engine`), opens the corpus, calibrates the threshold and measures the initial
    /// validation loss.
    pub fn new(config: &TrainConfig, device: &B::Device, engine: &'e RouteEngine) -> Result<Self> {
        Self::start(config, device, engine, None)
    }

    /// [`TrainSession::new`] for rank `rank` of a data-parallel run, which must have
    /// joined the collective ([`Rank::join`]). Every rank builds the same model (same
    /// seed) and calibrates the same `p_0` (on the whole global batch); only the leader
    /// evaluates.
    pub fn new_rank(
        config: &TrainConfig,
        device: &B::Device,
        engine: &'e RouteEngine,
        rank: Rank,
    ) -> Result<Self> {
        Self::start(config, device, engine, Some(rank))
    }

    /// The device the model trains on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn start(
        config: &TrainConfig,
        device: &B::Device,
        engine: &'e RouteEngine,
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
        let initial = initial_thresholds(config, &model.valid(), &corpus, engine, device)?;
        let policy = ThresholdPolicy::new(config, layers, &initial)?;
        let mut session = Self {
            config: config.clone(),
            device: device.clone(),
            engine,
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
        engine: &'e RouteEngine,
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
            engine,
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

    /// The routing engine's description, for the log.
    pub fn engine(&self) -> &RouteEngine {
        self.engine
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

    /// Starts the padded layout ([`RouteEngine::DevicePadded`]) from `bounds`, one per
    /// MoE layer, instead of measuring the next step in the exact layout first.
    pub fn set_padded_bounds(&mut self, bounds: Vec<ExpertBounds>) -> Result<()> {
        if bounds.len() != self.layers {
            return Err(Error::param(
                "padded expert bounds",
                bounds.len(),
                format!("one per MoE layer ({})", self.layers),
            ));
        }
        self.bounds = Some(bounds);
        Ok(())
    }

    /// How the padded layout ([`RouteEngine::DevicePadded`]) went in this session;
    /// `None` for every other engine.
    pub fn padded_usage(&self) -> Option<PaddedUsage> {
        matches!(self.engine, RouteEngine::DevicePadded).then_some(self.padded)
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
            None => initial_thresholds(
                &config,
                &self.model().valid(),
                &self.corpus,
                self.engine,
                &self.device,
            )?,
        };
        self.policy = ThresholdPolicy::new(&config, self.layers, &initial)?;
        self.config = config;
        self.control = None;
        Ok(())
    }

    /// One optimizer step: the micro-batches forward and backward, one AdamW update,
    /// one controller update from `a_t`, then validation and a routing sample when due.
    pub fn step(&mut self) -> Result<StepOutput> {
        let step_start = Instant::now();
        let step = self.step + 1;
        if let Some(rank) = self.rank
            && fails_here(rank, step)
        {
            return Err(Error::Backend {
                backend: "trainer",
                message: format!(
                    "rank {}: failure injected at step {step} ({FAIL_RANK_ENV})",
                    rank.index
                ),
            });
        }
        let config = &self.config;
        let run = &config.run;
        let o = &config.optimizer;
        let lr = learning_rate(step, run.steps.max(step), o.warmup_steps, o.lr, o.min_lr);
        let plan = self.plan();
        let thresholds = self.policy.thresholds();
        let layers = self.layers;
        let device = &self.device;

        // Read before the model is taken, so a bad window (say, a token outside the
        // vocabulary) leaves the session intact.
        // Rank r of W takes micro-batch `m * W + r` of B sequences: the windows one
        // device would see with a batch of W * B.
        let (index, world) = self.rank.map_or((0, 1), |r| (r.index, r.world));
        let batches: Vec<Batch> = (0..run.grad_accum)
            .map(|micro| {
                self.corpus.train_batch(
                    run.seed,
                    step,
                    micro * world + index,
                    run.batch_size,
                    config.model.seq_len,
                )
            })
            .collect::<Result<_>>()?;
        let mut model = self
            .model
            .take()
            .expect("a failed step leaves no model; start a new session");
        // A single-process run in padded buffers keeps its controller on the device and
        // reads back once per step.
        let single_padded = self.rank.is_none() && matches!(self.engine, RouteEngine::DevicePadded);
        if single_padded
            && self.control.is_none()
            && let Some(control) = self.policy.control()
        {
            self.control = Some(DeviceControl::upload(control, device));
        }
        let deferred = match self.bounds.clone() {
            Some(bounds) if single_padded => self.deferred_pass(&model, &batches, &plan, bounds)?,
            _ => None,
        };
        let Pass {
            mut grads,
            stats,
            mut losses,
            k_sum,
            loss_values,
        } = match deferred {
            Some(pass) => pass,
            None => self.immediate_pass(&model, &batches, &plan)?,
        };
        let config = &self.config;
        let run = &config.run;
        let device = &self.device;
        if let Some(rank) = self.rank {
            let local: Vec<f32> = losses.iter().map(|&v| v as f32).collect();
            for (sum, mean) in losses.iter_mut().zip(rank.mean::<B>(&local, device)?) {
                *sum = f64::from(mean);
            }
        }
        // After the all-reduce, so every rank stops at the same step. Losses still on the
        // device are checked when the step's read brings them.
        if loss_values.is_none() && !losses[0].is_finite() {
            return Err(diverged(losses[0], step));
        }
        if let Some(rank) = self.rank {
            grads = rank.mean_gradients::<B>(grads)?;
        }
        // Where the losses stay on the device, so do the gradient norm and the clipping.
        let (mut grad_norm, norm_on_device) = (0.0, loss_values.is_some());
        let mut tail: Vec<Tensor<B, 1>> = Vec::new();
        if norm_on_device {
            let norm;
            (model, norm) = self.optimizer.step_on_device(model, grads, lr, device);
            tail.extend(loss_values);
            tail.push(Tensor::from_inner(norm));
        } else {
            (model, grad_norm) = self.optimizer.step(model, grads, lr);
        }

        let tokens = run.batch_size * config.model.seq_len * run.grad_accum * world;
        let active_per_layer = stats.active_per_layer(tokens);
        let active = active_per_layer.iter().sum::<f64>() / layers as f64;
        // One read-back for every layer's theta, where the controller runs on the device
        // its state after this step's update, and where they stayed there the losses and
        // the gradient norm.
        let mut read: Vec<Tensor<B, 1>> = model.moe_layers().map(|m| m.theta.val()).collect();
        if let Some(control) = &mut self.control {
            let k_sum = k_sum.unwrap_or_else(|| {
                let sums: Vec<i64> = stats.k_sum.iter().map(|&s| s as i64).collect();
                Tensor::from_data(TensorData::new(sums, [layers]), device)
            });
            control.update(k_sum, tokens);
            read.push(control.flat_state());
        } else {
            self.policy.update(&active_per_layer)?;
        }
        let tail_len: usize = tail.iter().map(|t| t.dims()[0]).sum();
        read.extend(tail);
        let mut values = host_f32(Tensor::cat(read, 0))?;
        if norm_on_device {
            let tail = values.split_off(values.len() - tail_len);
            let (micro_batches, norm) = tail.split_at(tail_len - 1);
            for micro in micro_batches.chunks_exact(4) {
                add_micro_batch_losses(&mut losses, micro, run.grad_accum);
            }
            grad_norm = f64::from(norm[0]);
            if !losses[0].is_finite() {
                return Err(diverged(losses[0], step));
            }
        }
        if self.control.is_some() {
            let states = DeviceControl::<B>::states_from(&values.split_off(layers))?;
            self.policy.set_states(states)?;
        }
        let theta_per_layer: Vec<f64> = values.into_iter().map(f64::from).collect();
        self.model = Some(model);
        self.step = step;

        let run = &self.config.run;
        let evaluate_now = self.is_leader()
            && ((run.eval_every > 0 && step.is_multiple_of(run.eval_every)) || step == run.steps);
        let val_loss = if evaluate_now {
            let evaluation = self.evaluate()?;
            self.last_val = evaluation.loss;
            self.by_difficulty = evaluation.by_difficulty;
            self.by_class = evaluation.by_class;
            Some(evaluation.loss)
        } else {
            None
        };
        let run = &self.config.run;
        let sample = if self.is_leader()
            && run.sample_every > 0
            && (step.is_multiple_of(run.sample_every) || step == run.steps)
        {
            Some(self.routing_sample()?)
        } else {
            None
        };

        let step_time = step_start.elapsed().as_secs_f64();
        self.busy_s += step_time;
        let config = &self.config;
        let tokens_per_step = config.tokens_per_step();
        let per_layer_thresholds = thresholds
            .clone()
            .filter(|_| config.routing.scope == ThresholdScope::PerLayer);
        let metrics = StepMetrics {
            step,
            mode: config.routing.mode.name().to_string(),
            target: config.routing.target,
            threshold: thresholds
                .as_ref()
                .map(|p| p.iter().sum::<f64>() / p.len() as f64),
            threshold_per_layer: per_layer_thresholds,
            integral: self.policy.integral(),
            active_experts: active,
            active_experts_per_layer: active_per_layer,
            theta_per_layer,
            k_histogram_per_layer: stats.k_histogram,
            expert_load_per_layer: stats.expert_load,
            loss: losses[0],
            ce_loss: losses[1],
            balance_loss: losses[2],
            entropy_loss: losses[3],
            val_loss,
            lr,
            grad_norm,
            tokens_per_sec: tokens_per_step as f64 / step_time,
            tokens: self.history.last().map_or(0, |m| m.tokens) + tokens_per_step as u64,
            elapsed_s: self.busy_s,
        };
        self.history.push(metrics.clone());
        Ok(StepOutput { metrics, sample })
    }

    /// The micro-batches of a step one at a time, each read back after its forward pass:
    /// the exact layouts (which read every layer's offsets anyway), a data-parallel run
    /// (whose counts are summed over the ranks on the host) and the padded layout's
    /// first step (which measures its bounds). A padded micro-batch that outgrew its
    /// bounds runs again in the exact layout before anything is differentiated.
    fn immediate_pass(
        &mut self,
        model: &MoeLanguageModel<B>,
        batches: &[Batch],
        plan: &RoutingPlan,
    ) -> Result<Pass<B>> {
        let (layers, experts) = (self.layers, self.config.model.experts);
        let (device, accum) = (&self.device, self.config.run.grad_accum);
        let precision = self.config.run.precision;
        let padded = matches!(self.engine, RouteEngine::DevicePadded);
        let mut accumulator = GradientsAccumulator::new();
        let mut stats = RoutingStats::new(layers, experts);
        let mut losses = [0.0f64; 4];
        for batch in batches {
            let (inputs, targets) = batch_tensors::<B>(batch, device);
            let mut plan = plan.clone();
            plan.bounds = self.bounds.clone().filter(|_| padded);
            // The host copy of the tokens spares the embedding's backward a read-back.
            let engine = self.engine;
            let forward = |plan: &RoutingPlan| {
                model.forward_with_host_tokens(
                    inputs.clone(),
                    &batch.inputs,
                    plan,
                    None,
                    engine,
                    precision,
                )
            };
            let mut output = forward(&plan)?;
            // This micro-batch's own counts (in the one read-back it makes).
            let mut counts = RoutingStats::of_micro_batch(&output.moe, experts)?;
            if let Some(bounds) = &plan.bounds {
                if counts.fit(bounds) {
                    self.padded.count_fitting(bounds, experts, &counts.k_sum);
                } else {
                    // Some expert or token outgrew its buffer: nothing is differentiated
                    // yet, so the micro-batch runs again in the exact layout.
                    plan.bounds = None;
                    output = forward(&plan)?;
                    counts = RoutingStats::of_micro_batch(&output.moe, experts)?;
                    self.padded.redone += 1;
                }
            }
            if padded {
                self.padded.micro_batches += 1;
                let tokens = batch.batch * batch.seq_len;
                self.bounds = Some(counts.next_bounds(tokens, experts));
            }
            // The global batch's counts: they drive the controller (every rank the same
            // a_t, so the same p) and the balance loss's expert fractions.
            if let Some(rank) = self.rank {
                let summed = rank.sum_counts::<B>(&counts.flatten(), device)?;
                counts = RoutingStats::unflatten(&summed, layers, experts);
            }
            let parts = total_loss(
                output.logits,
                targets,
                &output.moe,
                &counts.expert_load,
                &self.config.loss,
            );
            stats.accumulate(&counts);
            add_micro_batch_losses(&mut losses, &host_f32(loss_values(&parts))?, accum);
            let grads = (parts.total / accum as f64).backward();
            accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        Ok(Pass {
            grads: accumulator.grads(),
            stats,
            losses,
            k_sum: None,
            loss_values: None,
        })
    }

    /// The micro-batches of a step in the padded layout ([`RouteEngine::DevicePadded`],
    /// one process) with nothing read back until all have run forward and backward: the
    /// counts and first non-finite logits of every micro-batch then come back in one read
    /// of integers (before the optimizer, which must not see an outgrown micro-batch);
    /// the losses stay on the device for the step's one read of floats after the update,
    /// and the device controller's thresholds route every layer. `None` when some micro-batch outgrew `bounds`: its gradients
    /// are dropped and the step runs again through [`Self::immediate_pass`], from bounds
    /// grown to what was measured.
    fn deferred_pass(
        &mut self,
        model: &MoeLanguageModel<B>,
        batches: &[Batch],
        plan: &RoutingPlan,
        bounds: Vec<ExpertBounds>,
    ) -> Result<Option<Pass<B>>> {
        let (layers, experts) = (self.layers, self.config.model.experts);
        let width = 1 + 2 * experts;
        let (device, accum) = (&self.device, self.config.run.grad_accum);
        let mut plan = plan.clone();
        plan.bounds = Some(bounds.clone());
        let thresholds = self.control.as_ref().map(DeviceControl::thresholds);
        let mut accumulator = GradientsAccumulator::new();
        let (mut counts, mut first_bad) = (Vec::new(), Vec::new());
        let (mut values, mut logits, mut k_sums) = (Vec::new(), Vec::new(), Vec::new());
        for batch in batches {
            let (inputs, targets) = batch_tensors::<B>(batch, device);
            let output = model.forward_with_host_tokens(
                inputs,
                &batch.inputs,
                &plan,
                thresholds.as_ref(),
                self.engine,
                self.config.run.precision,
            )?;
            let mut per_layer = Vec::with_capacity(layers);
            for layer in &output.moe {
                let (
                    Some(c),
                    LayerRouting::Device {
                        first_bad: Some(bad),
                        ..
                    },
                ) = (layer.routing.device_counts(), &layer.routing)
                else {
                    return Err(Error::Backend {
                        backend: "trainer",
                        message: "a padded pass routed a layer outside the padded layout"
                            .to_string(),
                    });
                };
                per_layer.push(c.reshape([1, width]));
                first_bad.push(bad.clone());
                logits.push(layer.logits.clone().detach());
            }
            let per_layer = Tensor::cat(per_layer, 0);
            let loads = per_layer.clone().slice([0..layers, 1 + experts..width]);
            k_sums.push(per_layer.clone().slice([0..layers, 0..1]).reshape([layers]));
            counts.push(per_layer.reshape([layers * width]));
            let parts = total_loss_on_device(
                output.logits,
                targets,
                &output.moe,
                loads,
                &self.config.loss,
            );
            values.push(loss_values(&parts));
            let grads = (parts.total / accum as f64).backward();
            accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        // The pass's one read-back: every micro-batch's counts and first bad logits.
        let counted = counts.len() * layers * width;
        let ints = read_counts(Tensor::cat(
            counts.into_iter().chain(first_bad).collect(),
            0,
        ))?;
        let (counts, first_bad) = ints.split_at(counted);
        for (logits, &bad) in logits.iter().zip(first_bad) {
            if bad < logits.shape().num_elements() as u64 {
                return Err(non_finite_logit(logits, bad as usize));
            }
        }
        let measured: Vec<RoutingStats> = counts
            .chunks_exact(layers * width)
            .map(|c| RoutingStats::unflatten(c, layers, experts))
            .collect();
        let tokens = batches.first().map_or(1, |b| b.batch * b.seq_len);
        let grown = (0..layers)
            .map(|l| {
                let max_load = measured.iter().map(|s| s.max_load(l)).max().unwrap_or(0);
                let max_k = measured.iter().map(|s| s.max_k(l)).max().unwrap_or(0);
                ExpertBounds::after(max_load, max_k, tokens, experts)
            })
            .collect();
        self.bounds = Some(grown);
        if !measured.iter().all(|s| s.fit(&bounds)) {
            self.padded.redone += batches.len() as u64;
            return Ok(None);
        }
        let mut stats = RoutingStats::new(layers, experts);
        for s in &measured {
            self.padded.count_fitting(&bounds, experts, &s.k_sum);
            stats.accumulate(s);
        }
        self.padded.micro_batches += batches.len() as u64;
        let k_sum = k_sums
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("a step has micro-batches");
        Ok(Some(Pass {
            grads: accumulator.grads(),
            stats,
            // Added up from `loss_values` by the step's one read of floats.
            losses: [0.0; 4],
            k_sum: Some(k_sum),
            loss_values: Some(Tensor::cat(values, 0)),
        }))
    }

    /// The routing of the fixed validation snippet under the current model and policy.
    pub fn routing_sample(&self) -> Result<RoutingSample> {
        routing_sample(
            &self.model().valid(),
            &self.snippet,
            &self.corpus,
            &self.plan(),
            self.engine,
            self.step,
        )
    }

    fn evaluate(&self) -> Result<Evaluation> {
        evaluate(
            &self.model().valid(),
            &self.validation,
            &self.plan(),
            self.engine,
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
/// show that a failing rank stops the others instead of hanging them).
pub const FAIL_RANK_ENV: &str = "DTOPP_TEST_FAIL_RANK";

fn fails_here(rank: Rank, step: u64) -> bool {
    std::env::var(FAIL_RANK_ENV).is_ok_and(|v| v == format!("{}:{step}", rank.index))
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

/// What the micro-batches of a step leave for its optimizer and controller update.
struct Pass<B: TrainingBackend> {
    grads: GradientsParams,
    stats: RoutingStats,
    /// Total, cross-entropy, balance and entropy, averaged over the micro-batches.
    losses: [f64; 4],
    /// `[L]` each layer's experts summed over the step's tokens, where still on the
    /// device.
    k_sum: Option<Tensor<B, 1, Int>>,
    /// `[4 A]` each micro-batch's four losses, where still on the device (then `losses`
    /// is zero until the step reads them).
    loss_values: Option<Tensor<B, 1>>,
}

/// The error of a step whose loss is not finite.
fn diverged(loss: f64, step: u64) -> Error {
    Error::Backend {
        backend: "trainer",
        message: format!(
            "the loss became {loss} at step {step}: training diverged (try a lower optimizer.lr or optimizer.grad_clip)"
        ),
    }
}

/// `[4]` total, cross-entropy, balance and entropy: one read-back for all four.
fn loss_values<B: Backend>(parts: &LossParts<B>) -> Tensor<B, 1> {
    Tensor::cat(
        vec![
            parts.total.clone(),
            parts.cross_entropy.clone(),
            parts.balance.clone(),
            parts.entropy.clone(),
        ],
        0,
    )
}

/// Adds one micro-batch's [`loss_values`] to the step's means over `accum` micro-batches.
fn add_micro_batch_losses(losses: &mut [f64; 4], values: &[f32], accum: usize) {
    for (sum, v) in losses.iter_mut().zip(values) {
        *sum += f64::from(*v) / accum as f64;
    }
}

/// Per-layer routing counts (of a micro-batch, or summed over a step).
#[derive(Debug, PartialEq)]
struct RoutingStats {
    k_sum: Vec<u64>,
    k_histogram: Vec<Vec<u64>>,
    expert_load: Vec<Vec<u64>>,
}

impl RoutingStats {
    fn new(layers: usize, experts: usize) -> Self {
        Self {
            k_sum: vec![0; layers],
            k_histogram: vec![vec![0; experts]; layers],
            expert_load: vec![vec![0; experts]; layers],
        }
    }

    /// The counts of one forward pass: kernel engines hand them over as host arrays;
    /// device routing sums them on the device and every layer's are read in one go,
    /// with the padded layout's first non-finite logits (a non-finite one is an error).
    fn of_micro_batch<B: Backend>(moe: &[MoeForward<B>], experts: usize) -> Result<Self> {
        let width = 1 + 2 * experts;
        let mut flat: Vec<u64> = Vec::with_capacity(moe.len() * width);
        let mut on_device: Vec<Tensor<B, 1, Int>> = moe
            .iter()
            .filter_map(|layer| layer.routing.device_counts())
            .collect();
        let checked: Vec<(usize, Tensor<B, 1, Int>)> = moe
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| match &layer.routing {
                LayerRouting::Device {
                    first_bad: Some(bad),
                    ..
                } => Some((l, bad.clone())),
                _ => None,
            })
            .collect();
        let counted = on_device.len() * width;
        on_device.extend(checked.iter().map(|(_, bad)| bad.clone()));
        let read = if on_device.is_empty() {
            Vec::new()
        } else {
            read_counts(Tensor::cat(on_device, 0))?
        };
        for ((l, _), &bad) in checked.iter().zip(&read[counted..]) {
            let logits = &moe[*l].logits;
            if bad < logits.shape().num_elements() as u64 {
                return Err(non_finite_logit(logits, bad as usize));
            }
        }
        let mut from_device = read[..counted].iter().copied();
        for layer in moe {
            match layer.routing.host_counts(experts) {
                Some(counts) => flat.extend(counts),
                None => flat.extend(from_device.by_ref().take(width)),
            }
        }
        Ok(Self::unflatten(&flat, moe.len(), experts))
    }

    /// Whether every layer's busiest expert and busiest token fit `bounds`.
    fn fit(&self, bounds: &[ExpertBounds]) -> bool {
        bounds
            .iter()
            .enumerate()
            .all(|(l, b)| b.hold(self.max_load(l), self.max_k(l)))
    }

    /// Bounds for the next micro-batch of `tokens` tokens, from these counts.
    fn next_bounds(&self, tokens: usize, experts: usize) -> Vec<ExpertBounds> {
        (0..self.k_sum.len())
            .map(|l| ExpertBounds::after(self.max_load(l), self.max_k(l), tokens, experts))
            .collect()
    }

    fn max_load(&self, layer: usize) -> usize {
        self.expert_load[layer].iter().copied().max().unwrap_or(0) as usize
    }

    /// The most experts a token took (the histogram's last non-empty `k`).
    fn max_k(&self, layer: usize) -> usize {
        self.k_histogram[layer]
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |k| k + 1)
    }

    fn accumulate(&mut self, other: &Self) {
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.k_sum, &other.k_sum);
        for l in 0..self.k_sum.len() {
            add(&mut self.k_histogram[l], &other.k_histogram[l]);
            add(&mut self.expert_load[l], &other.expert_load[l]);
        }
    }

    /// Per layer: `k_sum`, the histogram, the loads (one all-reduce for all of them).
    fn flatten(&self) -> Vec<u64> {
        (0..self.k_sum.len())
            .flat_map(|l| {
                std::iter::once(self.k_sum[l])
                    .chain(self.k_histogram[l].iter().copied())
                    .chain(self.expert_load[l].iter().copied())
            })
            .collect()
    }

    fn unflatten(values: &[u64], layers: usize, experts: usize) -> Self {
        let mut stats = Self::new(layers, experts);
        for (l, chunk) in values
            .chunks_exact(1 + 2 * experts)
            .enumerate()
            .take(layers)
        {
            stats.k_sum[l] = chunk[0];
            stats.k_histogram[l].copy_from_slice(&chunk[1..=experts]);
            stats.expert_load[l].copy_from_slice(&chunk[1 + experts..]);
        }
        stats
    }

    fn active_per_layer(&self, tokens: usize) -> Vec<f64> {
        self.k_sum
            .iter()
            .map(|&s| s as f64 / tokens as f64)
            .collect()
    }
}

fn read_counts<B: Backend>(t: Tensor<B, 1, Int>) -> Result<Vec<u64>> {
    Ok(read_ints(t)?.into_iter().map(|c| c as u64).collect())
}

/// `p_0` per MoE layer: configured, or calibrated on the first training batch so it
/// activates about `T` experts per token (global scope: one value over all layers). The
/// probe routes Top-k with `k = ceil(T)`, which only shapes what later layers see.
fn initial_thresholds<B: RoutingBackend>(
    config: &TrainConfig,
    model: &MoeLanguageModel<B>,
    corpus: &Corpus,
    engine: &RouteEngine,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let layers = model.moe_layers().count();
    let r = &config.routing;
    if let Some(p) = r.threshold {
        return Ok(vec![p; layers]);
    }
    if !r.mode.uses_threshold() {
        return Ok(vec![1.0; layers]);
    }
    let run = &config.run;
    let probe = RoutingPlan {
        use_drn: r.mode.uses_drn(),
        selectors: vec![Selector::TopK(r.target.ceil() as usize); layers],
        bounds: None,
    };
    // Every micro-batch of the first step, so the calibration does not depend on how
    // the step is split, and every rank of a data-parallel run finds the same `p_0`.
    let mut per_layer: Vec<Vec<f32>> = vec![Vec::new(); layers];
    for micro in 0..run.grad_accum * run.devices {
        let batch = corpus.train_batch(run.seed, 1, micro, run.batch_size, config.model.seq_len)?;
        let (inputs, _) = batch_tensors::<B>(&batch, device);
        let output = model.forward(inputs, &probe, engine, Precision::F32)?;
        for (all, m) in per_layer.iter_mut().zip(output.moe) {
            all.extend(host_f32(m.probs)?);
        }
    }
    let e = config.model.experts;
    let tokens = per_layer[0].len() / e;
    Ok(match r.scope {
        ThresholdScope::Global => {
            let all: Vec<f32> = per_layer.concat();
            let p = calibrate_threshold(&all, RouteShape::new(tokens * layers, e)?, r.target)?;
            vec![p.clamp(r.p_min, r.p_max); layers]
        }
        ThresholdScope::PerLayer => per_layer
            .iter()
            .map(|probs| {
                calibrate_threshold(probs, RouteShape::new(tokens, e)?, r.target)
                    .map(|p| p.clamp(r.p_min, r.p_max))
            })
            .collect::<Result<_>>()?,
    })
}
