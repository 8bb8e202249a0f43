//! The micro-batches of a step, forward and backward: read back one at a time
//! ([`TrainSession::immediate_pass`]) or all at the end ([`TrainSession::deferred_pass`]),
//! and what they leave for the update ([`Pass`]).

use super::*;

impl<B: TrainingBackend> TrainSession<B> {
    /// The micro-batches of a step one at a time, each read back after its forward pass:
    /// the exact layouts (which read every layer's offsets anyway), a data-parallel run
    /// (whose counts are summed over the ranks on the host) and the padded layout's
    /// first step (which measures its bounds). A padded micro-batch that outgrew its
    /// bounds runs again in the exact layout before anything is differentiated.
    pub(super) fn immediate_pass(
        &mut self,
        model: &MoeLanguageModel<B>,
        batches: &[Batch],
        plan: &RoutingPlan,
    ) -> Result<Pass<B>> {
        let (layers, experts) = (self.layers, self.config.model.experts);
        let (device, accum) = (&self.device, self.config.run.grad_accum);
        let precision = self.config.run.precision;
        let bounded = self.layout.bounded();
        let mut accumulator = GradientsAccumulator::new();
        let mut stats = RoutingStats::new(layers, experts);
        let mut losses = [0.0f64; 4];
        for batch in batches {
            let (inputs, targets) = batch_tensors::<B>(batch, device);
            let mut plan = plan.clone();
            plan.bounds = self.bounds.clone().filter(|_| bounded);
            // The host copy of the tokens spares the embedding's backward a read-back.
            let forward = |plan: &RoutingPlan| {
                model.forward_with_host_tokens(inputs.clone(), &batch.inputs, plan, None, precision)
            };
            let mut output = forward(&plan)?;
            // This micro-batch's own counts (in the one read-back it makes).
            let mut counts = RoutingStats::of_micro_batch(&output.moe, experts)?;
            if let Some(bounds) = &plan.bounds {
                if counts.fit(bounds) {
                    self.padded.count_fitting(bounds, experts, &counts.k_sum);
                } else {
                    // Some layer outgrew its bounds: nothing is differentiated
                    // yet, so the micro-batch runs again in the exact layout.
                    plan.bounds = None;
                    output = forward(&plan)?;
                    counts = RoutingStats::of_micro_batch(&output.moe, experts)?;
                    self.padded.redone += 1;
                }
            }
            if bounded {
                self.padded.micro_batches += 1;
                let tokens = batch.batch * batch.seq_len;
                let needs: Vec<LayerNeeds> = (0..layers).map(|l| counts.needs(l)).collect();
                self.bounds = self.next_bounds(&needs, tokens);
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
            check: None,
        })
    }

    /// The micro-batches of a step in a bounded layout (padded or grouped, one process)
    /// with nothing read back: their counts and first non-finite logits stay on the device
    /// ([`DeferredCheck`]) for the step's one read, after the update, with the losses;
    /// the device controller's thresholds route every layer. The step keeps the previous
    /// weights until that read shows every micro-batch within `bounds`
    /// ([`TrainSession::settle`]), and otherwise runs again through
    /// [`Self::immediate_pass`] from bounds grown to what was measured.
    pub(super) fn deferred_pass(
        &mut self,
        model: &MoeLanguageModel<B>,
        batches: &[Batch],
        plan: &RoutingPlan,
        bounds: Vec<LayerBounds>,
    ) -> Result<Pass<B>> {
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
                self.config.run.precision,
            )?;
            let mut per_layer = Vec::with_capacity(layers);
            for layer in &output.moe {
                let Some(bad) = &layer.routing.first_bad else {
                    return Err(Error::Backend {
                        backend: "trainer",
                        message: "a bounded pass routed a layer in the exact layout".to_string(),
                    });
                };
                per_layer.push(layer.routing.device_counts().reshape([1, width]));
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
        let k_sum = k_sums
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("a step has micro-batches");
        Ok(Pass {
            grads: accumulator.grads(),
            // Filled in by `settle` from the step's one read.
            stats: RoutingStats::new(layers, experts),
            // Added up from `loss_values` by the step's one read.
            losses: [0.0; 4],
            k_sum: Some(k_sum),
            loss_values: Some(Tensor::cat(values, 0)),
            check: Some(DeferredCheck {
                ints: Tensor::cat(counts.into_iter().chain(first_bad).collect(), 0),
                logits,
                bounds,
                micro_batches: batches.len(),
                tokens: batches.first().map_or(1, |b| b.batch * b.seq_len),
            }),
        })
    }

    /// Settles a deferred pass from its counts and first bad logits as read: the step's
    /// routing counts, or `None` when some micro-batch outgrew its bounds (its step must
    /// run again; the bounds have grown to what was measured). A non-finite router logit
    /// is an error naming token and expert.
    pub(super) fn settle(
        &mut self,
        check: &DeferredCheck<B>,
        ints: &[u64],
    ) -> Result<Option<RoutingStats>> {
        let (layers, experts) = (self.layers, self.config.model.experts);
        let counted = check.micro_batches * layers * (1 + 2 * experts);
        let (counts, first_bad) = ints.split_at(counted);
        for (logits, &bad) in check.logits.iter().zip(first_bad) {
            if bad < logits.shape().num_elements() as u64 {
                return Err(non_finite_logit(logits, bad as usize));
            }
        }
        let measured: Vec<RoutingStats> = counts
            .chunks_exact(counted / check.micro_batches.max(1))
            .map(|c| RoutingStats::unflatten(c, layers, experts))
            .collect();
        // Each layer's largest needs over the step's micro-batches.
        let needs: Vec<LayerNeeds> = (0..layers)
            .map(|l| {
                let each = || measured.iter().map(|s| s.needs(l));
                LayerNeeds {
                    routes: each().map(|n| n.routes).max().unwrap_or(0),
                    max_load: each().map(|n| n.max_load).max().unwrap_or(0),
                    max_k: each().map(|n| n.max_k).max().unwrap_or(0),
                }
            })
            .collect();
        self.bounds = self.next_bounds(&needs, check.tokens);
        if !measured.iter().all(|s| s.fit(&check.bounds)) {
            self.padded.redone += check.micro_batches as u64;
            return Ok(None);
        }
        let mut stats = RoutingStats::new(layers, experts);
        for s in &measured {
            self.padded.count_fitting(&check.bounds, experts, &s.k_sum);
            stats.accumulate(s);
        }
        self.padded.micro_batches += check.micro_batches as u64;
        Ok(Some(stats))
    }
}

/// What a deferred pass leaves on the device for the step's one read to check.
pub(super) struct DeferredCheck<B: TrainingBackend> {
    /// Every micro-batch's counts (`[1 + 2E]` per layer), then every layer's first
    /// non-finite logit, micro-batch by micro-batch.
    pub(super) ints: Tensor<B, 1, Int>,
    /// The router logits of each (micro-batch, layer), to name a non-finite one.
    logits: Vec<Tensor<B, 2>>,
    /// The bounds the pass ran in.
    bounds: Vec<LayerBounds>,
    micro_batches: usize,
    /// Tokens per micro-batch.
    tokens: usize,
}

/// What the micro-batches of a step leave for its optimizer and controller update.
pub(super) struct Pass<B: TrainingBackend> {
    pub(super) grads: GradientsParams,
    pub(super) stats: RoutingStats,
    /// Total, cross-entropy, balance and entropy, averaged over the micro-batches.
    pub(super) losses: [f64; 4],
    /// `[L]` each layer's experts summed over the step's tokens, where still on the
    /// device.
    pub(super) k_sum: Option<Tensor<B, 1, Int>>,
    /// `[4 A]` each micro-batch's four losses, where still on the device (then `losses`
    /// is zero until the step reads them).
    pub(super) loss_values: Option<Tensor<B, 1>>,
    /// A deferred pass's counts, still on the device (then `stats` is empty until the
    /// step reads them).
    pub(super) check: Option<DeferredCheck<B>>,
}

/// The error of a step whose loss is not finite.
pub(super) fn diverged(loss: f64, step: u64) -> Error {
    Error::Backend {
        backend: "trainer",
        message: format!(
            "the loss became {loss} at step {step}: training diverged (try a lower optimizer.lr or optimizer.grad_clip)"
        ),
    }
}

/// `[4]` total, cross-entropy, balance and entropy: one read-back for all four.
pub(super) fn loss_values<B: Backend>(parts: &LossParts<B>) -> Tensor<B, 1> {
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
pub(super) fn add_micro_batch_losses(losses: &mut [f64; 4], values: &[f32], accum: usize) {
    for (sum, v) in losses.iter_mut().zip(values) {
        *sum += f64::from(*v) / accum as f64;
    }
}
