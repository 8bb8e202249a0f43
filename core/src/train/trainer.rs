//! The training loop, top to bottom: open the corpus, build the model, calibrate the
//! threshold, then per optimizer step: micro-batches forward and backward (gradients
//! accumulated), one AdamW update, one controller update from `a_t`, metrics, and now
//! and then validation and a routing sample.

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::adamw::AdamW;
use super::batches::{Batch, Corpus};
use super::config::TrainConfig;
use super::losses::{cross_entropy, total_loss};
use super::metrics::{DifficultyBucket, JsonLines, RoutingSample, RunSummary, StepMetrics};
use super::schedule::learning_rate;
use super::threshold::ThresholdPolicy;
use crate::controller::{ThresholdScope, calibrate_threshold};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::{MoeLanguageModel, RouteEngine, RoutingPlan, Selector};
use crate::ops::RouteShape;
use crate::sim::{TrackingSummary, mean_std};

/// Where a run writes and how chatty it is.
#[derive(Debug)]
pub struct TrainOptions<'a> {
    /// The run directory (created; must not already hold a run).
    pub out: &'a Path,
    /// Print the progress lines (stderr).
    pub progress: bool,
    /// The name of the burn backend, for the log.
    pub backend_name: &'a str,
}

/// Trains the model `config` describes on `device`, selecting experts through `engine`.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    engine: &RouteEngine,
    options: &TrainOptions,
) -> Result<RunSummary> {
    config.validate()?;
    let out = options.out;
    let say = |line: String| {
        if options.progress {
            eprintln!("{line}");
        }
    };
    prepare_run_dir(out)?;
    write_atomic(&out.join("config.toml"), config.to_toml()?.as_bytes())?;

    let (run, mode) = (&config.run, config.routing.mode);
    let corpus = Corpus::open(config)?;
    let mut model = MoeLanguageModel::<B>::new(&config.model, run.seed, device)?;
    let layers = model.moe_layers().count();
    let e = config.model.experts;
    say(format!(
        "model: {} parameters ({} blocks, {} MoE layers x {} experts of width {}), d_model {}",
        config.model.parameters(),
        config.model.layers,
        layers,
        e,
        config.model.expert_hidden,
        config.model.d_model
    ));
    say(format!("data: {}", corpus.describe()));
    say(format!(
        "ops: attention, experts, {}, gather/combine (select, select_assign) and backward: burn {} (autodiff)",
        if mode.uses_drn() { "DRN" } else { "softmax" },
        options.backend_name
    ));
    say(format!(
        "ops: {} selection and dispatch plan: {}",
        if mode.uses_threshold() {
            "Top-p"
        } else {
            "Top-k"
        },
        engine.describe()
    ));

    let validation: Vec<Batch> = (0..run.eval_batches)
        .map(|i| corpus.validation_batch(run.seed, i, run.batch_size, config.model.seq_len))
        .collect();
    let snippet = corpus.validation_batch(run.seed ^ 0x5A4D, 0, 1, config.model.seq_len);

    let initial = initial_thresholds(config, &model.valid(), &corpus, engine, device)?;
    let mut policy = ThresholdPolicy::new(config, layers, &initial)?;
    if let Some(p) = policy.thresholds() {
        let how = if config.routing.threshold.is_some() {
            "configured"
        } else {
            "calibrated to T on the first batch"
        };
        say(format!(
            "routing: {mode}, T = {}, initial p = {} ({how})",
            config.routing.target,
            fmt_thresholds(&p)
        ));
    } else {
        say(format!("routing: {mode}, k = {}", config.routing.target));
    }

    let mut metrics = JsonLines::create(&out.join("metrics.jsonl"))?;
    let mut samples = JsonLines::create(&out.join("routing_samples.jsonl"))?;
    let use_drn = mode.uses_drn();
    let plan_of = |policy: &ThresholdPolicy| RoutingPlan {
        use_drn,
        selectors: policy.selectors(layers, config.routing.k_max),
    };
    let validate = |model: &MoeLanguageModel<B>, policy: &ThresholdPolicy| {
        evaluate(
            &model.valid(),
            &validation,
            &plan_of(policy),
            engine,
            device,
        )
    };
    let sample = |model: &MoeLanguageModel<B>, policy: &ThresholdPolicy, step: u64| {
        let plan = plan_of(policy);
        routing_sample(&model.valid(), &snippet, &corpus, &plan, engine, step)
    };
    let initial_val = validate(&model, &policy)?.loss;
    say(format!("step 0: val loss {initial_val:.4}"));
    if run.sample_every > 0 {
        samples.append(&sample(&model, &policy, 0)?)?;
    }

    let mut optimizer = AdamW::<B>::new(config.optimizer.clone());
    let tokens_per_micro = run.batch_size * config.model.seq_len;
    let tokens_per_step = config.tokens_per_step();
    let started = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::with_capacity(run.steps as usize);
    let mut last_val = initial_val;
    // The last step always evaluates, so this ends as the final model's routing.
    let mut by_difficulty = Vec::new();
    for step in 1..=run.steps {
        let step_start = Instant::now();
        let o = &config.optimizer;
        let lr = learning_rate(step, run.steps, o.warmup_steps, o.lr, o.min_lr);
        let plan = plan_of(&policy);
        let thresholds = policy.thresholds();

        let mut accumulator = GradientsAccumulator::new();
        let mut stats = RoutingStats::new(layers, e);
        let mut losses = [0.0f64; 4];
        for micro in 0..run.grad_accum {
            let batch =
                corpus.train_batch(run.seed, step, micro, run.batch_size, config.model.seq_len);
            let (inputs, targets) = batch_tensors::<B>(&batch, device);
            let output = model.forward(inputs, &plan, engine)?;
            let parts = total_loss(output.logits, targets, &output.moe, &config.loss);
            for (l, layer) in output.moe.iter().enumerate() {
                stats.add(l, &layer.counts, &layer.expert_load);
            }
            let values = host_f32(Tensor::cat(
                vec![
                    parts.total.clone(),
                    parts.cross_entropy,
                    parts.balance,
                    parts.entropy,
                ],
                0,
            ))?;
            if !values[0].is_finite() {
                return Err(Error::Backend {
                    backend: "trainer",
                    message: format!(
                        "the loss became {} at step {step}: training diverged (try a lower optimizer.lr or optimizer.grad_clip)",
                        values[0]
                    ),
                });
            }
            for (sum, v) in losses.iter_mut().zip(&values) {
                *sum += f64::from(*v) / run.grad_accum as f64;
            }
            let grads = (parts.total / run.grad_accum as f64).backward();
            accumulator.accumulate(&model, GradientsParams::from_grads(grads, &model));
        }
        let (updated, grad_norm) = optimizer.step(model, accumulator.grads(), lr);
        model = updated;

        let active_per_layer = stats.active_per_layer(tokens_per_micro * run.grad_accum);
        let active = active_per_layer.iter().sum::<f64>() / layers as f64;
        policy.update(&active_per_layer)?;
        // One read-back for every layer's theta.
        let thetas: Vec<Tensor<B, 1>> = model.moe_layers().map(|m| m.theta.val()).collect();
        let theta_per_layer: Vec<f64> = host_f32(Tensor::cat(thetas, 0))?
            .into_iter()
            .map(f64::from)
            .collect();

        let evaluate_now = (run.eval_every > 0 && step % run.eval_every == 0) || step == run.steps;
        let val_loss = if evaluate_now {
            let evaluation = validate(&model, &policy)?;
            last_val = evaluation.loss;
            by_difficulty = evaluation.by_difficulty;
            Some(last_val)
        } else {
            None
        };
        if run.sample_every > 0 && (step % run.sample_every == 0 || step == run.steps) {
            samples.append(&sample(&model, &policy, step)?)?;
        }

        let step_time = step_start.elapsed().as_secs_f64();
        let elapsed = started.elapsed().as_secs_f64();
        let per_layer_thresholds = thresholds
            .clone()
            .filter(|_| config.routing.scope == ThresholdScope::PerLayer);
        let record = StepMetrics {
            step,
            mode: mode.name().to_string(),
            target: config.routing.target,
            threshold: thresholds
                .as_ref()
                .map(|p| p.iter().sum::<f64>() / p.len() as f64),
            threshold_per_layer: per_layer_thresholds,
            integral: policy.integral(),
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
            tokens: step * tokens_per_step as u64,
            elapsed_s: elapsed,
        };
        metrics.append(&record)?;
        if step == 1 || step % run.log_every == 0 || step == run.steps {
            say(progress_line(&record, run.steps, last_val, elapsed));
        }
        history.push(record);
    }

    let mut summary = summarize(config, &history, initial_val, last_val, &policy, started);
    summary.experts_by_difficulty = by_difficulty;
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| Error::Parse {
        what: "run summary",
        message: e.to_string(),
    })?;
    write_atomic(&out.join("summary.json"), &json)?;
    say(format!(
        "done: {} steps in {:.1} s, {:.0} tokens/s; val loss {:.4} -> {:.4}; a_t {:.3} +- {:.3} (T = {}) over the second half",
        run.steps,
        summary.elapsed_s,
        summary.tokens_per_sec,
        summary.initial_val_loss,
        summary.final_val_loss,
        summary.active_mean_second_half,
        summary.active_std_second_half,
        summary.target
    ));
    Ok(summary)
}

fn prepare_run_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io("cannot create run directory", out, e))?;
    let metrics = out.join("metrics.jsonl");
    if metrics.exists() {
        return Err(Error::io(
            "refusing to overwrite the run in",
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it already holds metrics.jsonl; choose another --out or delete that run",
            ),
        ));
    }
    Ok(())
}

/// Per-layer counts of one optimizer step.
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

    fn add(&mut self, layer: usize, counts: &[i32], load: &[i32]) {
        for &k in counts {
            self.k_sum[layer] += k as u64;
            self.k_histogram[layer][k as usize - 1] += 1;
        }
        for (sum, &c) in self.expert_load[layer].iter_mut().zip(load) {
            *sum += c as u64;
        }
    }

    fn active_per_layer(&self, tokens: usize) -> Vec<f64> {
        self.k_sum
            .iter()
            .map(|&s| s as f64 / tokens as f64)
            .collect()
    }
}

fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
    let shape = [batch.batch, batch.seq_len];
    let inputs = Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device);
    let targets = Tensor::from_data(
        TensorData::new(batch.targets.clone(), [batch.batch * batch.seq_len]),
        device,
    );
    (inputs, targets)
}

fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("reading a tensor back: {e:?}"),
        })
}

/// `p_0` per MoE layer: configured, or calibrated on the first training batch so it
/// activates about `T` experts per token (global scope: one value over all layers). The
/// probe routes Top-k with `k = ceil(T)`, which only shapes what later layers see.
fn initial_thresholds<B: Backend>(
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
    };
    // Every micro-batch of the first step, so the calibration does not depend on how
    // the step is split.
    let mut per_layer: Vec<Vec<f32>> = vec![Vec::new(); layers];
    for micro in 0..run.grad_accum {
        let batch = corpus.train_batch(run.seed, 1, micro, run.batch_size, config.model.seq_len);
        let (inputs, _) = batch_tensors::<B>(&batch, device);
        let output = model.forward(inputs, &probe, engine)?;
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

/// One pass over the validation batches.
struct Evaluation {
    /// Mean cross-entropy.
    loss: f64,
    /// Activated experts grouped by the difficulty of the token each position predicts
    /// (synthetic corpus; empty otherwise).
    by_difficulty: Vec<DifficultyBucket>,
}

fn evaluate<B: Backend>(
    model: &MoeLanguageModel<B>,
    batches: &[Batch],
    plan: &RoutingPlan,
    engine: &RouteEngine,
    device: &B::Device,
) -> Result<Evaluation> {
    let mut total = 0.0;
    // Difficulty in hundredths of a bit -> (tokens, experts summed per layer).
    let mut buckets: std::collections::BTreeMap<i64, (u64, Vec<u64>)> = Default::default();
    for batch in batches {
        let (inputs, targets) = batch_tensors::<B>(batch, device);
        let output = model.forward(inputs, plan, engine)?;
        if let Some(difficulty) = &batch.difficulty {
            let layers = output.moe.len();
            for (i, d) in difficulty.iter().enumerate() {
                let entry = buckets
                    .entry((f64::from(*d) * 100.0).round() as i64)
                    .or_insert_with(|| (0, vec![0; layers]));
                entry.0 += 1;
                for (sum, layer) in entry.1.iter_mut().zip(&output.moe) {
                    *sum += layer.counts[i] as u64;
                }
            }
        }
        total += f64::from(host_f32(cross_entropy(output.logits, targets))?[0]);
    }
    let by_difficulty = buckets
        .into_iter()
        .map(|(key, (tokens, sums))| {
            let per_layer: Vec<f64> = sums.iter().map(|&s| s as f64 / tokens as f64).collect();
            DifficultyBucket {
                difficulty_bits: key as f64 / 100.0,
                tokens,
                mean_active: per_layer.iter().sum::<f64>() / per_layer.len() as f64,
                mean_active_per_layer: per_layer,
            }
        })
        .collect();
    Ok(Evaluation {
        loss: total / batches.len() as f64,
        by_difficulty,
    })
}

fn routing_sample<B: Backend>(
    model: &MoeLanguageModel<B>,
    snippet: &Batch,
    corpus: &Corpus,
    plan: &RoutingPlan,
    engine: &RouteEngine,
    step: u64,
) -> Result<RoutingSample> {
    let device = model.embed.device();
    let (inputs, _) = batch_tensors::<B>(snippet, &device);
    let output = model.forward(inputs, plan, engine)?;
    let tokens: Vec<u32> = snippet.inputs.iter().map(|&t| t as u32).collect();
    let text = tokens
        .iter()
        .map(|&t| match corpus {
            Corpus::Text(_) => printable_byte(t as u8),
            Corpus::Synthetic(_) => format!("#{t}"),
        })
        .collect();
    // The difficulty of each input token is that of the previous target.
    let difficulty = snippet.difficulty.as_ref().map(|d| {
        std::iter::once(0.0)
            .chain(d[..d.len() - 1].iter().copied())
            .collect()
    });
    let mut experts = Vec::new();
    let mut probs = Vec::new();
    for layer in output.moe {
        let p = host_f32(layer.probs)?;
        let e = p.len() / tokens.len();
        let (mut ex, mut pr) = (Vec::new(), Vec::new());
        for (i, &k) in layer.counts.iter().enumerate() {
            let chosen: Vec<u32> = layer.experts[i * e..i * e + k as usize]
                .iter()
                .map(|&j| j as u32)
                .collect();
            pr.push(chosen.iter().map(|&j| p[i * e + j as usize]).collect());
            ex.push(chosen);
        }
        experts.push(ex);
        probs.push(pr);
    }
    Ok(RoutingSample {
        step,
        tokens,
        text,
        difficulty,
        experts,
        probs,
    })
}

fn printable_byte(b: u8) -> String {
    match b {
        b' '..=b'~' => (b as char).to_string(),
        b'\n' => "\\n".to_string(),
        _ => format!("\\x{b:02x}"),
    }
}

fn fmt_thresholds(p: &[f64]) -> String {
    if p.windows(2).all(|w| w[0] == w[1]) {
        format!("{:.4}", p[0])
    } else {
        let parts: Vec<String> = p.iter().map(|v| format!("{v:.4}")).collect();
        format!("[{}]", parts.join(", "))
    }
}

fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn progress_line(m: &StepMetrics, steps: u64, last_val: f64, elapsed: f64) -> String {
    let p = m
        .threshold
        .map_or_else(|| "p -    ".to_string(), |p| format!("p {p:.4}"));
    let eta = elapsed / m.step as f64 * (steps - m.step) as f64;
    format!(
        "step {:>w$}/{steps} | loss {:.4} (ce {:.4}) | val {:.4} | {p} | a_t {:.3} / T {} | lr {:.2e} | {:.0} tok/s | ETA {}",
        m.step,
        m.loss,
        m.ce_loss,
        last_val,
        m.active_experts,
        m.target,
        m.lr,
        m.tokens_per_sec,
        fmt_duration(eta),
        w = steps.to_string().len()
    )
}

fn summarize(
    config: &TrainConfig,
    history: &[StepMetrics],
    initial_val: f64,
    final_val: f64,
    policy: &ThresholdPolicy,
    started: Instant,
) -> RunSummary {
    let active: Vec<f64> = history.iter().map(|m| m.active_experts).collect();
    let targets = vec![config.routing.target; active.len()];
    let (mean, std) = mean_std(&active[active.len() / 2..]);
    let tail = &history[history.len() - (history.len() / 10).max(1)..];
    let elapsed = started.elapsed().as_secs_f64();
    let later = &history[1.min(history.len() - 1)..];
    let tokens_per_sec = later.iter().map(|m| m.tokens_per_sec).sum::<f64>() / later.len() as f64;
    RunSummary {
        mode: config.routing.mode.name().to_string(),
        steps: config.run.steps,
        target: config.routing.target,
        initial_val_loss: initial_val,
        final_val_loss: final_val,
        final_train_loss: tail.iter().map(|m| m.ce_loss).sum::<f64>() / tail.len() as f64,
        tracking: TrackingSummary::of(&active, &targets),
        active_mean_second_half: mean,
        active_std_second_half: std,
        final_threshold: policy
            .thresholds()
            .map(|p| p.iter().sum::<f64>() / p.len() as f64),
        final_active_per_layer: (0..history[0].active_experts_per_layer.len())
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
        experts_by_difficulty: Vec::new(),
        tokens_per_sec,
        elapsed_s: elapsed,
    }
}
