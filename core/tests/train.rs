//! The MoE language model and its trainer on the CPU: the model can learn, the gradients
//! of the router are right, a short run behaves as the method promises, and bad
//! configurations are refused with errors that name the field.

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};

use dtopp::model::{ExpertLayout, ModelConfig, MoeLanguageModel, Precision, RoutingPlan, Selector};
use dtopp::rng::SplitMix64;
use dtopp::train::{
    AdamW, Preset, RoutingMode, RunSummary, TrainConfig, TrainOptions, cross_entropy, train,
};

type B = Autodiff<NdArray>;

fn small_model() -> ModelConfig {
    ModelConfig {
        vocab: 32,
        d_model: 32,
        layers: 2,
        heads: 2,
        seq_len: 16,
        experts: 6,
        expert_hidden: 24,
        moe_every: 1,
        dense_hidden: 0,
        rope_theta: 10_000.0,
        init_std: 0.1,
    }
}

fn tokens(rng: &mut SplitMix64, batch: usize, len: usize, vocab: usize) -> Vec<i64> {
    (0..batch * len).map(|_| rng.below(vocab) as i64).collect()
}

#[test]
fn a_tiny_model_overfits_a_short_sequence() {
    let device = Default::default();
    let config = small_model();
    let mut model = MoeLanguageModel::<B>::new(&config, 5, &device).unwrap();
    let mut rng = SplitMix64::new(9);
    let (batch, s) = (2, config.seq_len);
    let stream = tokens(&mut rng, batch, s + 1, config.vocab);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in stream.chunks(s + 1) {
        inputs.extend_from_slice(&row[..s]);
        targets.extend_from_slice(&row[1..]);
    }
    let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs, [batch, s]), &device);
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [batch * s]), &device);
    let plan = RoutingPlan {
        use_drn: true,
        selectors: vec![
            Selector::TopP {
                threshold: 0.6,
                k_max: None,
            };
            2
        ],
        bounds: None,
    };
    let mut optim_config = Preset::Tiny.config().optimizer;
    optim_config.weight_decay = 0.0;
    let mut optimizer = AdamW::<B>::new(optim_config);
    let mut losses = Vec::new();
    for _ in 0..120 {
        let out = model
            .forward(inputs.clone(), &plan, Precision::F32)
            .unwrap();
        let loss = cross_entropy(out.logits, targets.clone());
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(model, grads, 1e-2).0;
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        (first - (config.vocab as f32).ln()).abs() < 0.3,
        "initial loss {first} should be near ln V"
    );
    assert!(
        last < 0.05,
        "32 tokens should be memorised: loss {first} -> {last}"
    );
}

/// `sum(logits * w)` for fixed `w`, and the experts every MoE layer selected.
fn probe(
    model: &MoeLanguageModel<B>,
    inputs: &Tensor<B, 2, Int>,
    w: &Tensor<B, 2>,
    plan: &RoutingPlan,
) -> (Tensor<B, 1>, Vec<Vec<i32>>) {
    let out = model.forward(inputs.clone(), plan, Precision::F32).unwrap();
    let experts = out
        .moe
        .iter()
        .map(|m| {
            let probs: Vec<f32> = m.probs.clone().into_data().to_vec().unwrap();
            m.routing.ranked_experts(&probs).unwrap()
        })
        .collect();
    ((out.logits * w.clone()).sum(), experts)
}

#[test]
fn router_and_theta_gradients_of_the_whole_model_match_finite_differences() {
    let device = Default::default();
    let mut config = small_model();
    config.init_std = 0.3;
    config.seq_len = 6;
    let model = MoeLanguageModel::<B>::new(&config, 2, &device).unwrap();
    let mut rng = SplitMix64::new(4);
    let inputs = Tensor::<B, 2, Int>::from_data(
        TensorData::new(tokens(&mut rng, 2, 6, config.vocab), [2, 6]),
        &device,
    );
    let w_values: Vec<f32> = (0..12 * config.vocab)
        .map(|_| rng.normal() as f32)
        .collect();
    let w = Tensor::<B, 2>::from_data(TensorData::new(w_values, [12, config.vocab]), &device);
    for (use_drn, selector) in [
        (
            true,
            Selector::TopP {
                threshold: 0.7,
                k_max: None,
            },
        ),
        (false, Selector::TopK(2)),
    ] {
        let plan = RoutingPlan {
            use_drn,
            selectors: vec![selector; 2],
            bounds: None,
        };
        let (loss, experts) = probe(&model, &inputs, &w, &plan);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut checked = 0;
        for layer in 0..2 {
            let moe = model.blocks[layer].moe.as_ref().unwrap();
            let router: Vec<f32> = moe.router.val().into_data().to_vec().unwrap();
            let theta = moe.theta.val().into_data().to_vec::<f32>().unwrap()[0];
            let g_router: Vec<f32> = grads
                .get::<NdArray, 2>(moe.router.id)
                .expect("the router gets a gradient")
                .into_data()
                .to_vec()
                .unwrap();
            let g_theta = grads
                .get::<NdArray, 1>(moe.theta.id)
                .map(|g| g.into_data().to_vec::<f32>().unwrap()[0]);
            if use_drn {
                assert!(g_theta.is_some(), "theta gets a gradient under DRN");
            }
            // Perturb one entry (index == router.len(): theta) by +-h.
            let eval = |index: usize, delta: f32| {
                let mut m = model.clone();
                let target = m.blocks[layer].moe.as_mut().unwrap();
                if index < router.len() {
                    let mut v = router.clone();
                    v[index] += delta;
                    target.router = Param::from_tensor(Tensor::from_data(
                        TensorData::new(v, [config.d_model, config.experts]),
                        &device,
                    ));
                } else {
                    target.theta = Param::from_tensor(Tensor::from_data(
                        TensorData::new(vec![theta + delta], [1]),
                        &device,
                    ));
                }
                let (l, e) = probe(&m, &inputs, &w, &plan);
                (f64::from(l.into_scalar()), e)
            };
            let entries = if use_drn {
                router.len() + 1
            } else {
                router.len()
            };
            for index in (0..entries).step_by(3) {
                let h = 1e-2;
                let ((lp, ep), (lm, em)) = (eval(index, h), eval(index, -h));
                if ep != experts || em != experts {
                    continue; // the step changed a selection: not differentiable there
                }
                let numeric = (lp - lm) / (2.0 * f64::from(h));
                let analytic = f64::from(if index < router.len() {
                    g_router[index]
                } else {
                    g_theta.unwrap()
                });
                assert!(
                    (numeric - analytic).abs() <= 2e-2 + 3e-2 * numeric.abs(),
                    "drn={use_drn} layer {layer} entry {index}: autodiff {analytic}, finite difference {numeric}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 60, "only {checked} entries checked");
    }
}

/// Trains `config` quietly on the CPU into a fresh temporary run directory.
fn train_quietly(config: &TrainConfig, name: &str) -> (RunSummary, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!("dtopp-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let summary = train::<B>(
        config,
        &Default::default(),
        ExpertLayout::Exact,
        &TrainOptions {
            out: &out,
            progress: false,
            backend_name: "ndarray",
            label: "",
        },
    )
    .unwrap();
    (summary, out)
}

fn short_run(mode: RoutingMode, name: &str) -> RunSummary {
    let mut config = Preset::Tiny.config();
    config.routing.mode = mode;
    config.run.steps = 200;
    config.run.batch_size = 8;
    config.run.eval_every = 100;
    config.run.sample_every = 100;
    config.run.log_every = 1000;
    let (summary, out) = train_quietly(&config, name);
    for file in [
        "config.toml",
        "metrics.jsonl",
        "routing_samples.jsonl",
        "summary.json",
    ] {
        assert!(out.join(file).exists(), "{file} written");
    }
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 200);
    std::fs::remove_dir_all(&out).unwrap();
    summary
}

#[test]
fn a_short_tiny_run_learns_and_dtopp_holds_the_target_while_fixed_top_p_drifts() {
    let dtopp = short_run(RoutingMode::Dtopp, "dtopp");
    let topp = short_run(RoutingMode::Topp, "topp");
    for s in [&dtopp, &topp] {
        assert!(
            s.final_val_loss < s.initial_val_loss - 2.0,
            "{}: validation loss {} -> {} should fall by more than 2 nats",
            s.mode,
            s.initial_val_loss,
            s.final_val_loss
        );
    }
    let off = |s: &RunSummary| (s.active_mean_second_half - s.target).abs() / s.target;
    assert!(
        off(&dtopp) <= 0.05,
        "dtopp: a_t {} over the second half, T {}",
        dtopp.active_mean_second_half,
        dtopp.target
    );
    assert!(
        off(&topp) > 0.05 && off(&topp) > 3.0 * off(&dtopp),
        "fixed top-p should drift: a_t {} (dtopp {}), T {}",
        topp.active_mean_second_half,
        dtopp.active_mean_second_half,
        topp.target
    );
}

#[test]
fn bad_configurations_are_refused_with_the_field_named() {
    let check = |edit: &dyn Fn(&mut TrainConfig), field: &str| {
        let mut c = Preset::Tiny.config();
        edit(&mut c);
        let message = c.validate().expect_err(field).to_string();
        assert!(message.contains(field), "{field}: got {message:?}");
    };
    check(&|c| c.routing.target = 17.0, "routing.target");
    check(&|c| c.routing.target = 0.5, "routing.target");
    check(
        &|c| {
            c.routing.mode = RoutingMode::Topk;
            c.routing.target = 2.5;
        },
        "routing.target",
    );
    check(&|c| c.routing.threshold = Some(1.5), "routing.threshold");
    check(&|c| c.routing.threshold = Some(0.0), "routing.threshold");
    check(&|c| c.routing.k_max = Some(2), "routing.k_max");
    check(&|c| c.model.heads = 3, "model.heads");
    check(&|c| c.model.experts = 0, "model.experts");
    check(&|c| c.optimizer.lr = -1.0, "optimizer.lr");
    check(&|c| c.optimizer.beta2 = 1.0, "optimizer.beta2");
    check(
        &|c| c.optimizer.grad_clip = Some(0.0),
        "optimizer.grad_clip",
    );
    check(&|c| c.run.batch_size = 0, "run.batch_size");
    check(&|c| c.loss.entropy = f64::NAN, "loss.entropy");
    check(&|c| c.data.synthetic.vocab = 300, "data.synthetic.vocab");
    check(
        &|c| {
            c.data.source = "corpus.txt".into();
            c.model.vocab = 100;
        },
        "model.vocab",
    );

    let base = Preset::Tiny.config();
    let typo = base.overlay_toml("[routing]\ntarge = 3\n").unwrap_err();
    assert!(typo.to_string().contains("targe"), "{typo}");
    let overlay = base
        .overlay_toml("[routing]\nmode = \"topk\"\ntarget = 2\n[run]\nsteps = 7\n")
        .unwrap();
    assert_eq!(overlay.routing.mode, RoutingMode::Topk);
    assert_eq!(overlay.routing.target, 2.0);
    assert_eq!(overlay.run.steps, 7);
    assert_eq!(
        overlay.model, base.model,
        "fields the file leaves out keep the preset"
    );
    let round_trip = base.overlay_toml(&base.to_toml().unwrap()).unwrap();
    assert_eq!(round_trip, base);
}

#[test]
fn two_accumulated_micro_batches_equal_one_batch_of_twice_the_size() {
    let run = |batch: usize, accum: usize, name: &str| -> Vec<(f64, f64)> {
        let mut config = Preset::Tiny.config();
        config.run.steps = 4;
        config.run.batch_size = batch;
        config.run.grad_accum = accum;
        config.run.eval_every = 0;
        config.run.eval_batches = 1;
        config.run.sample_every = 0;
        // Balance is a product of per-batch means, so it is the one term that differs
        // between a batch and the mean over its halves; leave it out here.
        config.loss.balance = 0.0;
        let (_, out) = train_quietly(&config, name);
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        lines
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["ce_loss"].as_f64().unwrap(),
                    v["active_experts"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let whole = run(8, 1, "whole");
    let halves = run(4, 2, "halves");
    for (step, (a, b)) in whole.iter().zip(&halves).enumerate() {
        assert!(
            (a.0 - b.0).abs() < 1e-4,
            "step {}: cross-entropy {} vs {}",
            step + 1,
            a.0,
            b.0
        );
        assert!(
            (a.1 - b.1).abs() < 1e-2,
            "step {}: a_t {} vs {}",
            step + 1,
            a.1,
            b.1
        );
    }
}

#[test]
fn token_shards_train_and_out_of_vocabulary_tokens_are_named() {
    let dir = std::env::temp_dir().join(format!("dtopp-shard-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A learnable stream: a repeating 13-token cycle through the tiny vocabulary.
    let stream =
        |offset: u16| -> Vec<u16> { (0..4000u16).map(|i| (i + offset) % 13 * 7).collect() };
    dtopp::data::write_shard(&dir.join("toy_train_000.bin"), &stream(0)).unwrap();
    dtopp::data::write_shard(&dir.join("toy_train_001.bin"), &stream(5)).unwrap();
    dtopp::data::write_shard(&dir.join("toy_val_000.bin"), &stream(9)).unwrap();

    let mut config = Preset::Tiny.config();
    config.data.source = format!("shards:{}", dir.join("toy_train_*.bin").display());
    config.data.validation = Some(format!("shards:{}", dir.join("toy_val_*.bin").display()));
    config.run.steps = 30;
    config.run.batch_size = 8;
    config.run.eval_every = 30;
    let (summary, out) = train_quietly(&config, "shards");
    assert!(
        summary.final_val_loss < summary.initial_val_loss - 1.0,
        "val loss {} -> {}",
        summary.initial_val_loss,
        summary.final_val_loss
    );
    std::fs::remove_dir_all(&out).unwrap();

    // A token the model's vocabulary cannot hold stops the run with the shard named.
    let mut bad = stream(0);
    for i in (0..bad.len()).step_by(50) {
        bad[i] = 300;
    }
    dtopp::data::write_shard(&dir.join("toy_bad.bin"), &bad).unwrap();
    config.data.source = format!("shards:{}", dir.join("toy_bad.bin").display());
    let err = train::<B>(
        &config,
        &Default::default(),
        ExpertLayout::Exact,
        &TrainOptions {
            out: &dir.join("bad-run"),
            progress: false,
            backend_name: "ndarray",
            label: "",
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("toy_bad.bin")
            && err.contains("token 300")
            && err.contains("model.vocab = 256"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reasoning_corpus_labels_its_targets_and_the_summary_reports_each_class() {
    use dtopp::data::TokenClass;
    use dtopp::train::{Corpus, REASONING_SOURCE};
    let mut config = Preset::Tiny.config();
    config.data.source = REASONING_SOURCE.to_string();
    config.run.steps = 3;
    config.run.batch_size = 4;
    config.run.log_every = 1000;
    config.validate().unwrap();
    // The labels line up with the targets: a copy's target is its input (the token
    // before it), and every class is present in a batch.
    let corpus = Corpus::open(&config).unwrap();
    let batch = corpus.train_batch(config.run.seed, 1, 0, 8, 64).unwrap();
    let classes = batch
        .classes
        .as_ref()
        .expect("the reasoning corpus labels classes");
    assert_eq!(classes.len(), batch.targets.len());
    for class in TokenClass::ALL {
        assert!(classes.contains(&(class as u8)), "{class:?} in a batch");
    }
    for (i, &c) in classes.iter().enumerate() {
        if c == TokenClass::Copy as u8 && i % 64 != 0 {
            assert_eq!(batch.targets[i], batch.inputs[i], "copy at {i}");
        }
    }
    let (summary, out) = train_quietly(&config, "reasoning");
    let names: Vec<&str> = summary.by_class.iter().map(|c| c.class.as_str()).collect();
    assert_eq!(names, ["random", "copy", "recall", "compose"]);
    for c in &summary.by_class {
        assert!(
            c.tokens > 0 && c.loss.is_finite() && c.mean_active >= 1.0,
            "{c:?}"
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
