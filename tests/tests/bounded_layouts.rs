//! The layouts that read nothing back per layer, padded (`--layout padded`) and grouped
//! (`--layout grouped`), against the exact one (`--layout exact`): the same selection,
//! the same outputs and gradients, on burn ndarray and on burn-wgpu (where the grouped
//! products are dtopp's kernels reading the offsets on the device), for awkward shapes
//! (one token, one expert, E not a power of two, every probability tied); bounds that are
//! tight, loose and too small; a non-finite logit found without a read-back per layer;
//! whole training steps (with the controller on the device) that redo a step which
//! outgrew its bounds; runs resumed from a checkpoint exactly; and the host's reads per
//! step.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{Tensor, TensorData};
use dtopp::host_reads;
use dtopp::model::{
    ExpertBounds, ExpertLayout, ExpertRows, LayerBounds, LayerRouting, MoeWeights, PaddedUsage,
    Precision, RoutingBackend, RowBound, Selector, TrainingBackend, moe_forward, route_grouped,
    route_padded,
};
use dtopp::rng::SplitMix64;
use dtopp::train::{Preset, RoutingMode, TrainSession};

/// Tokens, width, experts, expert width; whether the router is zero (every probability
/// tied).
#[derive(Clone, Copy, Debug)]
struct Shape {
    n: usize,
    d: usize,
    e: usize,
    f: usize,
    tied: bool,
}

const SHAPES: [Shape; 5] = [
    Shape {
        n: 1,
        d: 3,
        e: 1,
        f: 2,
        tied: false,
    },
    Shape {
        n: 1,
        d: 4,
        e: 5,
        f: 3,
        tied: false,
    },
    Shape {
        n: 37,
        d: 5,
        e: 7,
        f: 3,
        tied: false,
    },
    Shape {
        n: 300,
        d: 4,
        e: 6,
        f: 5,
        tied: false,
    },
    Shape {
        n: 23,
        d: 3,
        e: 5,
        f: 2,
        tied: true,
    },
];

/// x, router, theta, gate, up, down (flat), and the output weights of the loss.
fn values(s: Shape, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let sizes = [
        s.n * s.d,
        s.d * s.e,
        1,
        s.e * s.d * s.f,
        s.e * s.d * s.f,
        s.e * s.f * s.d,
    ];
    let tensors = sizes
        .iter()
        .enumerate()
        .map(|(which, &count)| {
            (0..count)
                .map(|_| match which {
                    2 => 1.3,
                    1 if s.tied => 0.0,
                    _ => rng.normal() as f32,
                })
                .collect()
        })
        .collect();
    let out_w = (0..s.n * s.d).map(|_| rng.normal() as f32).collect();
    (tensors, out_w)
}

struct Run {
    loss: f32,
    grads: Vec<Vec<f32>>,
    /// Experts per token, then tokens per expert.
    counts: Vec<i32>,
}

impl Run {
    fn max_k(&self, n: usize) -> usize {
        self.counts[..n].iter().copied().max().unwrap() as usize
    }
    fn max_load(&self, n: usize) -> usize {
        self.counts[n..].iter().copied().max().unwrap() as usize
    }
    fn routes(&self, n: usize) -> usize {
        self.counts[..n].iter().sum::<i32>() as usize
    }
}

fn run<B: RoutingBackend>(
    s: Shape,
    v: &(Vec<Vec<f32>>, Vec<f32>),
    selector: Selector,
    bounds: Option<LayerBounds>,
) -> Run {
    let device = Default::default();
    let t: Vec<Tensor<Autodiff<B>, 1>> = v
        .0
        .iter()
        .map(|data| {
            Tensor::from_data(TensorData::new(data.clone(), [data.len()]), &device).require_grad()
        })
        .collect();
    let (n, d, e, f) = (s.n, s.d, s.e, s.f);
    let w = MoeWeights {
        router: t[1].clone().reshape([d, e]),
        theta: t[2].clone(),
        gate: t[3].clone().reshape([e, d, f]),
        up: t[4].clone().reshape([e, d, f]),
        down: t[5].clone().reshape([e, f, d]),
    };
    let fwd = moe_forward(
        t[0].clone().reshape([n, d]),
        &w,
        true,
        selector,
        None,
        bounds,
        Precision::F32,
    )
    .unwrap();
    let LayerRouting {
        selected,
        first_bad,
    } = &fwd.routing;
    assert_eq!(
        first_bad.is_some(),
        bounds.is_some(),
        "the layout the bounds ask for"
    );
    let mut counts = fwd.routing.counts().unwrap();
    let load: Vec<f32> = selected
        .clone()
        .float()
        .sum_dim(0)
        .into_data()
        .to_vec()
        .unwrap();
    counts.extend(load.iter().map(|&c| c as i32));
    let out_w = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.1.clone(), [n, d]), &device);
    let loss = (fwd.output * out_w).sum();
    let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let grads = loss.backward();
    let grads = t
        .iter()
        .map(|p| p.grad(&grads).unwrap().into_data().to_vec().unwrap())
        .collect();
    Run {
        loss: value,
        grads,
        counts,
    }
}

fn assert_close(got: &Run, want: &Run, what: &str) {
    let tol = |w: f32| 1e-5 + 1e-4 * w.abs();
    assert!(
        (got.loss - want.loss).abs() <= tol(want.loss),
        "{what}: loss {} vs {}",
        got.loss,
        want.loss
    );
    let names = ["x", "router", "theta", "gate", "up", "down"];
    for (which, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs() / tol(*b))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1.0,
            "{what}: d/d{} differs ({worst} x tolerance)",
            names[which]
        );
    }
}

fn selectors(e: usize) -> [Selector; 3] {
    [
        Selector::TopK(2.min(e)),
        Selector::TopP {
            threshold: 0.7,
            k_max: None,
        },
        Selector::TopP {
            threshold: 0.95,
            k_max: Some(3),
        },
    ]
}

fn bounded_matches_exact<B: RoutingBackend>(backend: &str) {
    let mut compared = 0;
    for (i, s) in SHAPES.into_iter().enumerate() {
        let v = values(s, 40 + i as u64);
        for selector in selectors(s.e) {
            let what = format!("{backend} {s:?} {selector:?}");
            let exact = run::<B>(s, &v, selector, None);
            let (max_load, max_k) = (exact.max_load(s.n), exact.max_k(s.n));
            let routes = exact.routes(s.n);
            let k_bound = match selector {
                Selector::TopK(k) => k,
                Selector::TopP { k_max, .. } => k_max.unwrap_or(s.e),
            };
            let fitting: [LayerBounds; 4] = [
                ExpertBounds {
                    capacity: max_load,
                    slots: max_k,
                }
                .into(),
                ExpertBounds::after(max_load, max_k, s.n, s.e).into(),
                RowBound {
                    rows: routes,
                    slots: max_k,
                }
                .into(),
                RowBound::after(routes, max_k, s.n, k_bound).into(),
            ];
            for bounds in fitting {
                let bounded = run::<B>(s, &v, selector, Some(bounds));
                assert_eq!(bounded.counts, exact.counts, "{what} {bounds:?}: selection");
                assert_close(&bounded, &exact, &format!("{what} {bounds:?}"));
                compared += 1;
            }
            // Too small: the selection is still reported whole, so the trainer sees that
            // it does not fit and redoes the micro-batch.
            let mut small: Vec<LayerBounds> = vec![
                RowBound {
                    rows: routes - 1,
                    slots: max_k,
                }
                .into(),
            ];
            if max_load > 1 {
                small.push(
                    ExpertBounds {
                        capacity: max_load - 1,
                        slots: max_k,
                    }
                    .into(),
                );
            }
            for bounds in small.into_iter().filter(|_| routes > 1) {
                let bounded = run::<B>(s, &v, selector, Some(bounds));
                assert_eq!(bounded.counts, exact.counts, "{what} {bounds:?}: selection");
                let needs = dtopp::model::LayerNeeds {
                    routes: bounded.routes(s.n),
                    max_load: bounded.max_load(s.n),
                    max_k: bounded.max_k(s.n),
                };
                assert!(!bounds.hold(needs), "{what} {bounds:?}");
            }
        }
    }
    println!("{backend}: {compared} padded and grouped runs equal the exact layout");
}

#[test]
fn the_padded_and_grouped_layouts_equal_the_exact_one_on_ndarray() {
    bounded_matches_exact::<NdArray>("ndarray");
}

#[test]
fn the_padded_and_grouped_layouts_equal_the_exact_one_on_wgpu() {
    if dtopp_tests::wgpu_model_device().is_none() {
        return;
    }
    bounded_matches_exact::<Wgpu>("wgpu");
}

#[test]
fn a_non_finite_logit_is_located_on_the_device() {
    let device = Default::default();
    let (n, e) = (6, 4);
    let mut logits: Vec<f32> = (0..n * e).map(|i| (i % 5) as f32 * 0.3).collect();
    logits[3 * e + 2] = f32::NAN;
    logits[4 * e + 1] = f32::INFINITY;
    let logits = Tensor::<NdArray, 2>::from_data(TensorData::new(logits, [n, e]), &device);
    let probs_of = |l: &Tensor<NdArray, 2>| burn::tensor::activation::softmax(l.clone(), 1);
    let probs = probs_of(&logits);
    let bounds = ExpertBounds {
        capacity: n,
        slots: e,
    };
    let route = route_padded(probs, logits.clone(), Selector::TopK(2), None, bounds).unwrap();
    let ExpertRows::Padded { first_bad, .. } = route.rows else {
        panic!("route_padded lays its rows out in buffers");
    };
    let first: Vec<i64> = first_bad.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(first, vec![(3 * e + 2) as i64]);
    let bound = RowBound {
        rows: n * e,
        slots: e,
    };
    let route = route_grouped(
        probs_of(&logits),
        logits.clone(),
        Selector::TopK(2),
        None,
        bound,
    );
    let ExpertRows::Grouped { first_bad, .. } = route.unwrap().rows else {
        panic!("route_grouped keeps its offsets on the device");
    };
    let first: Vec<i64> = first_bad.into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!(first, vec![(3 * e + 2) as i64]);
    let zero = ExpertBounds {
        capacity: 0,
        slots: 1,
    };
    let logits = Tensor::<NdArray, 2>::zeros([n, e], &device);
    let err = route_padded(logits.clone(), logits, Selector::TopK(2), None, zero).unwrap_err();
    assert!(err.to_string().contains("padded expert bounds"), "{err}");
    let zero = RowBound { rows: 0, slots: 1 };
    let logits = Tensor::<NdArray, 2>::zeros([n, e], &device);
    let err = route_grouped(logits.clone(), logits, Selector::TopK(2), None, zero).unwrap_err();
    assert!(err.to_string().contains("grouped row bound"), "{err}");
}

/// Losses (total, then cross-entropy) and the threshold routed with, of each step.
type Losses = Vec<(f64, f64, f64)>;

fn tiny_dtopp(steps: u64) -> dtopp::train::TrainConfig {
    dtopp_tests::tiny_two_micro_batches(RoutingMode::Dtopp, steps)
}

fn losses_of(metrics: &[dtopp::train::StepMetrics]) -> Losses {
    metrics
        .iter()
        .map(|m| {
            (
                m.loss,
                m.ce_loss,
                m.threshold.expect("DTop-p has a threshold"),
            )
        })
        .collect()
}

/// [`Losses`] of `steps` DTop-p steps of a tiny model with two micro-batches per step,
/// and the padded report.
fn train_steps<B: TrainingBackend>(
    layout: ExpertLayout,
    start: Option<Vec<LayerBounds>>,
    steps: u64,
) -> (Losses, Option<PaddedUsage>) {
    let config = tiny_dtopp(steps);
    let device = Default::default();
    let mut session = TrainSession::<B>::new(&config, &device, layout).unwrap();
    if let Some(bounds) = start {
        session.set_bounds(bounds).unwrap();
    }
    for _ in 0..steps {
        session.step().unwrap();
    }
    (losses_of(session.history()), session.padded_usage())
}

fn sessions_agree<B: TrainingBackend>(backend: &str) {
    let steps = 3;
    let (exact, report) = train_steps::<B>(ExpertLayout::Exact, None, steps);
    assert_eq!(report, None, "the exact layout redoes nothing");
    let layers = Preset::Tiny.config().model.moe_layers();
    let one = ExpertBounds {
        capacity: 1,
        slots: 1,
    };
    let few = RowBound { rows: 1, slots: 1 };
    for (layout, start, name) in [
        (ExpertLayout::Padded, None, "measured"),
        (
            ExpertLayout::Padded,
            Some(vec![one.into(); layers]),
            "too small",
        ),
        (ExpertLayout::Grouped, None, "measured"),
        (
            ExpertLayout::Grouped,
            Some(vec![few.into(); layers]),
            "too small",
        ),
    ] {
        let forced = start.is_some();
        let (padded, report) = train_steps::<B>(layout, start, steps);
        let usage = report.expect("a bounded layout reports");
        let name = format!("{} {name}", layout.name());
        println!(
            "{backend} {name}: {}; losses {padded:?}",
            usage.describe(layout.name())
        );
        if layout == ExpertLayout::Grouped {
            assert_eq!(usage.rows_per_route(), Some(1.0), "{usage:?}");
        }
        assert_eq!(usage.micro_batches, 2 * steps);
        if forced {
            assert!(usage.redone >= 1, "a micro-batch past its bounds is redone");
        }
        assert!(usage.rows_per_route().unwrap() >= 1.0, "{usage:?}");
        for (step, (p, x)) in padded.iter().zip(&exact).enumerate() {
            for (got, want) in [(p.0, x.0), (p.1, x.1)] {
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{backend} {name} step {}: loss {got} vs the exact layout's {want}",
                    step + 1
                );
            }
            // The device controller's f32 law against the host's f64 one.
            assert!(
                (p.2 - x.2).abs() <= 1e-5,
                "{backend} {name} step {}: threshold {} vs the host controller's {}",
                step + 1,
                p.2,
                x.2
            );
        }
    }
}

#[test]
fn training_in_padded_buffers_follows_the_exact_layout_on_ndarray() {
    sessions_agree::<Autodiff<NdArray>>("ndarray");
}

#[test]
fn training_in_padded_buffers_follows_the_exact_layout_on_wgpu() {
    if dtopp_tests::wgpu_model_device().is_none() {
        return;
    }
    sessions_agree::<Autodiff<Wgpu>>("wgpu");
}

/// A padded or grouped run (controller on the device, reading back once per step)
/// checkpointed after two steps and restored continues exactly as the uninterrupted run.
#[test]
fn padded_and_grouped_runs_resume_exactly_from_their_checkpoints() {
    resumes_exactly(ExpertLayout::Padded);
    resumes_exactly(ExpertLayout::Grouped);
}

fn resumes_exactly(layout: ExpertLayout) {
    type B = Autodiff<NdArray>;
    let (steps, cut) = (4, 2);
    let config = tiny_dtopp(steps);
    let device = Default::default();
    let mut straight = TrainSession::<B>::new(&config, &device, layout).unwrap();
    let mut saved = None;
    for step in 1..=steps {
        straight.step().unwrap();
        if step == cut {
            saved = Some(straight.checkpoint().unwrap());
        }
    }
    let saved = saved.unwrap();
    let history = straight.history()[..cut as usize].to_vec();
    let mut resumed =
        TrainSession::<B>::restore(&config, &device, layout, &saved, history, None).unwrap();
    while !resumed.finished() {
        resumed.step().unwrap();
    }
    let (want, got) = (losses_of(straight.history()), losses_of(resumed.history()));
    println!("uninterrupted {want:?}\nresumed       {got:?}");
    assert_eq!(got, want, "losses and thresholds after resuming");
    assert_eq!(
        resumed.checkpoint().unwrap().header.policy,
        straight.checkpoint().unwrap().header.policy,
        "controller state after resuming"
    );
}

/// A non-finite router logit in a step that reads back only at its end is still an
/// error naming the token and expert, raised before the optimizer touches the weights.
#[test]
fn a_non_finite_logit_stops_a_deferred_padded_or_grouped_step() {
    for layout in [ExpertLayout::Padded, ExpertLayout::Grouped] {
        non_finite_logit_stops(layout);
    }
}

fn non_finite_logit_stops(layout: ExpertLayout) {
    type B = Autodiff<NdArray>;
    let config = tiny_dtopp(2);
    let device = Default::default();
    let mut session = TrainSession::<B>::new(&config, &device, layout).unwrap();
    session.step().unwrap();
    let mut poisoned = session.checkpoint().unwrap();
    // The first parameter (the embedding) feeds every router.
    poisoned.params[0].fill(f32::NAN);
    let history = session.history().to_vec();
    let mut session =
        TrainSession::<B>::restore(&config, &device, layout, &poisoned, history, None).unwrap();
    let layers = config.model.moe_layers();
    let experts = config.model.experts;
    let roomy: LayerBounds = match layout {
        ExpertLayout::Grouped => RowBound {
            rows: 64 * experts,
            slots: experts,
        }
        .into(),
        _ => ExpertBounds {
            capacity: 64,
            slots: experts,
        }
        .into(),
    };
    session.set_bounds(vec![roomy; layers]).unwrap();
    match session.step() {
        Err(dtopp::Error::NonFinite {
            what,
            token,
            column,
            value,
            ..
        }) => {
            assert_eq!((what, token, column), ("router logit", 0, 0));
            assert!(value.is_nan());
        }
        other => panic!("expected a non-finite router logit, got {other:?}"),
    }
}

/// The host's reads of the device per optimizer step on burn-wgpu, counted
/// (`dtopp::host_reads`), with `grad_accum` micro-batches of a model with `L`
/// MoE layers:
/// - the exact layout (`--layout exact`) reads each layer's plan head (burn's matrix
///   products need the expert offsets as shapes), the counts and the losses of each
///   micro-batch, then AdamW's gradient norm and theta: `A (L + 2) + 2`;
/// - the padded and grouped layouts, their bounds known, read once, after the update:
///   the step's counts and first bad logits, its losses, the gradient norm, theta and
///   the controller's state, whatever `A` and `L`.
#[test]
fn host_reads_per_step_on_wgpu() {
    if dtopp_tests::wgpu_model_device().is_none() {
        return;
    }
    type B = Autodiff<Wgpu>;
    // Steps in the middle of a longer run (the last step also evaluates).
    let config = tiny_dtopp(100);
    let layers = (0..config.model.layers)
        .filter(|&l| config.model.is_moe_block(l))
        .count() as u64;
    let accum = config.run.grad_accum as u64;
    for (layout, want) in [
        (ExpertLayout::Exact, accum * (layers + 2) + 2),
        (ExpertLayout::Padded, 1),
        (ExpertLayout::Grouped, 1),
    ] {
        let device = Default::default();
        let mut session = TrainSession::<B>::new(&config, &device, layout).unwrap();
        // The padded layout's first step measures its bounds in the exact layout.
        session.step().unwrap();
        for step in 1..4 {
            let before = host_reads::total();
            session.step().unwrap();
            let reads = host_reads::total() - before;
            println!("{layout:?} step {step}: {reads} host reads");
            assert_eq!(reads, want, "{layout:?} step {step}");
        }
    }
}
