//! One optimizer step of a [`TrainSession`]: micro-batches, AdamW, the controller,
//! then validation and a routing sample when due.

use super::micro_batch::{add_micro_batch_losses, diverged};
use super::*;

impl<B: TrainingBackend> TrainSession<B> {
    /// One optimizer step: the micro-batches forward and backward, one AdamW update,
    /// one controller update from `a_t`, then validation and a routing sample when due.
    pub fn step(&mut self) -> Result<StepOutput> {
        let step_start = Instant::now();
        let step = self.step + 1;
        if let Some(rank) = self.rank
            && let Some(kill) = injected_failure(rank, step)
        {
            if kill {
                // As `kill -9` would: no unwinding, no cleanup, no last word.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
            }
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
        // A single-process run with bounds (padded or grouped) keeps its controller on the
        // device and reads back once per step.
        let single_padded = self.rank.is_none() && self.layout.bounded();
        if single_padded
            && self.control.is_none()
            && let Some(control) = self.policy.control()
        {
            self.control = Some(DeviceControl::upload(control, device));
        }
        // A step redone because its deferred pass outgrew the bounds runs immediately.
        let redo = std::mem::take(&mut self.redo_immediate);
        let Pass {
            mut grads,
            mut stats,
            mut losses,
            k_sum,
            loss_values,
            check,
        } = match self.bounds.clone() {
            Some(bounds) if single_padded && !redo => {
                self.deferred_pass(&model, &batches, &plan, bounds)?
            }
            _ => self.immediate_pass(&model, &batches, &plan)?,
        };
        // Until the step's one read shows that the deferred pass fit its bounds, the
        // weights, moments and controller before the update are kept (handles, no
        // copies; burn cannot update them in place meanwhile) to run the step again.
        let before = check.is_some().then(|| {
            (
                model.clone(),
                self.optimizer.snapshot(),
                self.control.clone(),
            )
        });
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
        // One read-back for every layer's theta, where the controller runs on the device
        // its state after this step's update, where they stayed there the losses and the
        // gradient norm, and a deferred pass's counts.
        let mut read: Vec<Tensor<B, 1>> = model.moe_layers().map(|m| m.theta.val()).collect();
        if let Some(control) = &mut self.control {
            let k_sum = k_sum.unwrap_or_else(|| {
                let sums: Vec<i64> = stats.k_sum.iter().map(|&s| s as i64).collect();
                Tensor::from_data(TensorData::new(sums, [layers]), device)
            });
            control.update(k_sum, tokens);
            read.push(control.flat_state());
        }
        let tail_len: usize = tail.iter().map(|t| t.dims()[0]).sum();
        read.extend(tail);
        let ints_len = check.as_ref().map_or(0, |c| c.ints.dims()[0]);
        read.extend(check.as_ref().map(|c| exact_floats(c.ints.clone())));
        let mut values = host_f32(Tensor::cat(read, 0))?;
        if let Some(check) = &check {
            let ints = from_exact_floats(&values.split_off(values.len() - 2 * ints_len));
            match self.settle(check, &ints)? {
                Some(settled) => stats = settled,
                None => {
                    // Outgrown: back to the weights before the update, and again.
                    let (model, optimizer, control) = before.expect("kept for a deferred pass");
                    self.model = Some(model);
                    self.optimizer.restore_snapshot(optimizer);
                    self.control = control;
                    self.redo_immediate = true;
                    return self.step();
                }
            }
        }
        let active_per_layer = stats.active_per_layer(tokens);
        let active = active_per_layer.iter().sum::<f64>() / layers as f64;
        if self.control.is_none() {
            self.policy.update(&active_per_layer)?;
        }
        if norm_on_device {
            let tail = values.split_off(values.len() - tail_len);
            let (micro_batches, norm) = tail.split_at(tail_len - 1);
            for micro in micro_batches.chunks_exact(4) {
                add_micro_batch_losses(&mut losses, micro, self.config.run.grad_accum);
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
        crate::train::supervision::report_step(step);

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
}

/// Non-negative integers below 2^36 as f32 pairs `[high; low]` (`v / 4096`, `v % 4096`),
/// each exact in f32, so that they join the step's one read of floats.
fn exact_floats<B: Backend>(ints: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    Tensor::cat(
        vec![
            ints.clone().div_scalar(EXACT_BASE as i64),
            ints.remainder_scalar(EXACT_BASE as i64),
        ],
        0,
    )
    .float()
}

/// The integers [`exact_floats`] wrote.
fn from_exact_floats(values: &[f32]) -> Vec<u64> {
    let (high, low) = values.split_at(values.len() / 2);
    high.iter()
        .zip(low)
        .map(|(&h, &l)| h as u64 * EXACT_BASE + l as u64)
        .collect()
}

const EXACT_BASE: u64 = 4096;
