//! Routing on the model's device (the routing extension, `RoutingBackend`) against the
//! CPU reference, on burn's ndarray backend and on burn-wgpu (lavapipe in CI), over random
//! probabilities of awkward shapes (N = 1, E not a power of two, E = 1, many ties) and
//! every selection rule. Two implementations each: the routing extension's default
//! methods (burn tensor ops), and the backend's own (`RoutingBackend::route`: the CPU
//! reference on ndarray, dtopp's WGSL kernels on burn-wgpu's buffers).
//!
//! - The selected set of each token equals the reference's, except tokens whose prefix
//!   mass lies within `THRESHOLD_SLACK` of p (the device sums the mass ahead of an expert
//!   in another order), which are counted and printed.
//! - The plan (offsets, route tokens, route sources) and its inverse maps (the route of
//!   each token and expert, each token's routes in rank order) equal the CPU reference's
//!   `dispatch_plan` of the device's own selection, exactly.
//! - A NaN or Inf logit is reported with the first offending token and column, as every
//!   backend of the ops trait reports it.

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use dtopp::Error;
use dtopp::cpu::{CpuReference, rank_experts};
use dtopp::model::{ExpertRows, Route, RoutingBackend, Selector, route_on_device};
use dtopp::ops::{HostSelection, Normalization, RouteShape, RoutingOps, Selection};
use dtopp_tests::{Case, near_threshold, small_cases};

/// Tallies of one backend's run.
#[derive(Debug, Default)]
struct Tally {
    tokens: usize,
    excused: usize,
    routes: usize,
    failures: Vec<String>,
}

fn selectors(e: usize) -> Vec<Selector> {
    let mut out = vec![Selector::TopK(1), Selector::TopK(3.min(e))];
    for p in [0.3, 0.5, 0.9, 1.0] {
        out.push(Selector::TopP {
            threshold: p,
            k_max: None,
        });
    }
    out.push(Selector::TopP {
        threshold: 0.8,
        k_max: Some(2.min(e)),
    });
    out
}

/// The reference's probabilities of a case (DRN with theta 1.5, as the model uses it).
fn probabilities(case: &Case) -> Vec<f32> {
    let cpu = CpuReference;
    cpu.drn_forward(&case.logits, case.shape, Normalization::Drn { theta: 1.5 })
        .unwrap()
}

fn reference(probs: &[f32], shape: RouteShape, selector: Selector) -> HostSelection {
    let cpu = CpuReference;
    match selector {
        Selector::TopK(k) => cpu.top_k(&probs.to_vec(), shape, k).unwrap(),
        Selector::TopP { threshold, k_max } => cpu
            .top_p(&probs.to_vec(), shape, &vec![threshold], k_max)
            .unwrap(),
    }
}

/// The device's 0/1 mask as a selection in the ops trait's form (rank order, weights
/// renormalised), so the CPU reference can build its plan.
fn as_selection(mask: &[i64], probs: &[f32], shape: RouteShape) -> HostSelection {
    let (n, e) = (shape.tokens, shape.experts);
    let mut experts = vec![-1i32; n * e];
    let mut weights = vec![0f32; n * e];
    let mut counts = vec![0i32; n];
    for i in 0..n {
        let row = &probs[i * e..(i + 1) * e];
        let chosen: Vec<usize> = rank_experts(row)
            .into_iter()
            .filter(|&j| mask[i * e + j] != 0)
            .collect();
        let mass: f32 = chosen.iter().map(|&j| row[j]).sum();
        for (s, &j) in chosen.iter().enumerate() {
            experts[i * e + s] = j as i32;
            weights[i * e + s] = row[j] / mass;
        }
        counts[i] = chosen.len() as i32;
    }
    Selection {
        shape,
        k_bound: e,
        experts,
        weights,
        counts,
    }
}

fn ints<B: Backend, const D: usize>(t: Tensor<B, D, burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

/// Which implementation routes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Impl {
    /// The extension's default methods: burn tensor ops.
    Default,
    /// The backend's own `RoutingBackend::route`.
    Backend,
}

fn route_with<B: RoutingBackend>(
    how: Impl,
    probs: Tensor<B, 2>,
    logits: Tensor<B, 2>,
    selector: Selector,
    threshold: Option<Tensor<B, 1>>,
) -> dtopp::Result<Route<B>> {
    match how {
        Impl::Default => route_on_device(probs, logits, selector, threshold),
        Impl::Backend => B::route(probs, logits, selector, threshold),
    }
}

/// `want_table`: whether the backend builds each token's slot table (where the MoE
/// layer's rows move by gathers: wgpu, not ndarray).
fn check_case<B: RoutingBackend>(
    how: Impl,
    device: &B::Device,
    case: &Case,
    want_table: bool,
    tally: &mut Tally,
) {
    let shape = case.shape;
    let (n, e) = (shape.tokens, shape.experts);
    let probs = probabilities(case);
    let logits = Tensor::<B, 2>::from_data(TensorData::new(case.logits.clone(), [n, e]), device);
    let on_device = Tensor::<B, 2>::from_data(TensorData::new(probs.clone(), [n, e]), device);
    for selector in selectors(e) {
        let what = format!("{} {selector:?}", case.name);
        let route = route_with(how, on_device.clone(), logits.clone(), selector, None).unwrap();
        let mask = ints(route.selected.clone());
        let want = reference(&probs, shape, selector);
        let threshold = match selector {
            Selector::TopK(_) => None,
            Selector::TopP { threshold, .. } => Some(threshold),
        };
        if let Some(p) = threshold {
            // The trainer's controller keeps p on the device: the same comparisons, so
            // exactly the same selection.
            let held = Tensor::<B, 1>::from_data(TensorData::new(vec![p], [1]), device);
            let from_device =
                route_with(how, on_device.clone(), logits.clone(), selector, Some(held)).unwrap();
            assert_eq!(
                ints(from_device.selected),
                mask,
                "{what}: threshold held on the device"
            );
        }
        // The selection alone (the padded layout's), read nowhere: the same mask, and the
        // selected experts ranked as the reference ranks them.
        let (alone, rank) = match how {
            Impl::Default => (route.selected.clone(), None),
            Impl::Backend => {
                let (m, r) = B::select(on_device.clone(), selector, None).unwrap();
                (m, Some(ints(r)))
            }
        };
        assert_eq!(ints(alone), mask, "{what}: select against route");
        for i in 0..n {
            tally.tokens += 1;
            let k = want.counts[i] as usize;
            let mut wanted = vec![0i64; e];
            for &j in &want.experts[i * e..i * e + k] {
                wanted[j as usize] = 1;
            }
            if mask[i * e..(i + 1) * e] == wanted[..] {
                for (s, &j) in want.experts[i * e..i * e + k].iter().enumerate() {
                    let got = rank.as_ref().map_or(s as i64, |r| r[i * e + j as usize]);
                    if got != s as i64 && tally.failures.len() < 10 {
                        tally.failures.push(format!(
                            "{what}: token {i}'s expert {j} ranks {got}, the reference {s}"
                        ));
                    }
                }
                continue;
            }
            let row = &probs[i * e..(i + 1) * e];
            if threshold.is_some_and(|p| near_threshold(row, p)) {
                tally.excused += 1;
            } else if tally.failures.len() < 10 {
                tally.failures.push(format!(
                    "{what}: token {i} selects {:?}, the reference {wanted:?} (probs {row:?})",
                    &mask[i * e..(i + 1) * e]
                ));
            }
        }

        // The plan of the device's own selection, exactly.
        let own = as_selection(&mask, &probs, shape);
        let plan = CpuReference.dispatch_plan(&own).unwrap();
        let ExpertRows::Exact { offsets } = &route.rows else {
            panic!("{what}: routing for the exact layout lays its rows out exactly");
        };
        let offsets: Vec<i64> = offsets.iter().map(|&o| o as i64).collect();
        let want_offsets: Vec<i64> = plan.expert_offsets.iter().map(|&o| o.into()).collect();
        let tokens = ints(route.row_tokens.clone());
        let want_tokens: Vec<i64> = plan.route_tokens.iter().map(|&t| t.into()).collect();
        let sources = ints(route.row_sources.clone());
        let want_sources: Vec<i64> = (0..e)
            .flat_map(|j| {
                let (a, b) = (want_offsets[j] as usize, want_offsets[j + 1] as usize);
                want_tokens[a..b]
                    .iter()
                    .map(move |&t| t * e as i64 + j as i64)
                    .collect::<Vec<_>>()
            })
            .collect();
        tally.routes += tokens.len();

        // The inverse maps: each (token, expert)'s route, and each token's routes in rank
        // order in as many slots as the selector allows, both padded with M.
        let m = want_tokens.len() as i64;
        let slots = own.counts.iter().copied().max().unwrap_or(1) as usize;
        assert_eq!(
            route.token_slots.as_ref().map(|t| t.dims()),
            want_table.then_some([n, slots]),
            "{what}: slot table shape"
        );
        let mut want_route_of = vec![m; n * e];
        let mut want_slots = vec![m; if want_table { n * slots } else { 0 }];
        for i in 0..n {
            for s in 0..own.counts[i] as usize {
                let r = i64::from(plan.token_routes[i * e + s]);
                want_route_of[i * e + own.experts[i * e + s] as usize] = r;
                if want_table {
                    want_slots[i * slots + s] = r;
                }
            }
        }
        let route_of = ints(route.row_of.clone());
        let token_slots = route.token_slots.clone().map(ints).unwrap_or_default();
        for (name, got, want) in [
            ("offsets", &offsets, &want_offsets),
            ("route tokens", &tokens, &want_tokens),
            ("route sources", &sources, &want_sources),
            ("route of (token, expert)", &route_of, &want_route_of),
            ("token slots", &token_slots, &want_slots),
        ] {
            if got != want && tally.failures.len() < 10 {
                let first = got.iter().zip(want.iter()).position(|(g, w)| g != w);
                tally.failures.push(format!(
                    "{what}: {name} differ (lengths {} and {}, first difference at {first:?})",
                    got.len(),
                    want.len()
                ));
            }
        }
    }
}

fn check_nonfinite<B: RoutingBackend>(how: Impl, device: &B::Device) {
    let (n, e) = (6, 5);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut logits = vec![0.25f32; n * e];
        logits[3 * e + 2] = bad;
        logits[4 * e + 1] = f32::NAN;
        let t = Tensor::<B, 2>::from_data(TensorData::new(logits, [n, e]), device);
        let probs = Tensor::<B, 2>::ones([n, e], device).div_scalar(e as f32);
        match route_with(how, probs, t, Selector::TopK(1), None) {
            Err(Error::NonFinite { token, column, .. }) => {
                assert_eq!((token, column), (3, 2), "first non-finite logit ({bad})");
            }
            other => panic!("a {bad} logit must be reported, got {other:?}"),
        }
    }
}

fn run<B: RoutingBackend>(how: Impl, name: &str, device: &B::Device, want_table: bool) {
    let mut tally = Tally::default();
    let mut cases = small_cases(7);
    // Ties on purpose: every logit one of three values.
    cases.push(Case {
        name: "three values N=40 E=7".into(),
        shape: RouteShape {
            tokens: 40,
            experts: 7,
        },
        logits: (0..280).map(|i| ((i * 5 % 3) as f32) - 1.0).collect(),
    });
    for case in &cases {
        check_case::<B>(how, device, case, want_table, &mut tally);
    }
    check_nonfinite::<B>(how, device);
    println!(
        "{name} ({how:?}): {} cases, {} token selections, {} excused within the threshold slack, {} routes planned, {} failures",
        cases.len(),
        tally.tokens,
        tally.excused,
        tally.routes,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "{name}: device routing differs from the CPU reference:\n{}",
        tally.failures.join("\n")
    );
    assert!(
        tally.excused * 100 <= tally.tokens,
        "too many excused tokens"
    );
}

#[test]
fn device_routing_on_ndarray_matches_the_reference() {
    run::<NdArray>(Impl::Default, "ndarray", &Default::default(), false);
}

#[test]
fn the_cpu_reference_routes_on_ndarray_tensors() {
    run::<NdArray>(Impl::Backend, "ndarray", &Default::default(), false);
}

#[test]
fn device_routing_on_wgpu_matches_the_reference() {
    // An adapter check first, so a missing driver skips (or fails under
    // DTOPP_REQUIRE_WGPU) with the reason instead of panicking inside burn.
    let Some(device) = dtopp_tests::wgpu_model_device() else {
        return;
    };
    run::<burn::backend::Wgpu>(Impl::Default, "burn wgpu", &device, true);
}

/// `select.cu` and `dispatch.cu` on burn-cuda's buffers (skipped with the reason without
/// a GPU).
#[cfg(feature = "cuda")]
#[test]
fn the_cuda_kernels_select_on_burn_cuda_buffers() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    let device = burn::backend::cuda::CudaDevice::default();
    println!("{}", burn::backend::Cuda::routing_name(&device));
    run::<burn::backend::Cuda>(Impl::Backend, "burn cuda", &device, true);
}

#[test]
fn the_wgsl_kernels_route_on_burn_wgpu_buffers() {
    let Some(device) = dtopp_tests::wgpu_model_device() else {
        return;
    };
    println!("{}", burn::backend::Wgpu::routing_name(&device));
    run::<burn::backend::Wgpu>(Impl::Backend, "burn wgpu", &device, true);
    // Views of larger tensors (a row slice, a transposed copy) route as their values.
    let (n, e) = (37, 6);
    let logits: Vec<f32> = (0..2 * n * e)
        .map(|i| ((i * 7919 % 97) as f32) / 17.0)
        .collect();
    let full =
        Tensor::<burn::backend::Wgpu, 2>::from_data(TensorData::new(logits, [2 * n, e]), &device);
    let part = burn::tensor::activation::softmax(full.clone(), 1).slice([n..2 * n, 0..e]);
    let z = full.slice([n..2 * n, 0..e]);
    let selector = Selector::TopP {
        threshold: 0.6,
        k_max: None,
    };
    let got = burn::backend::Wgpu::route(part.clone(), z.clone(), selector, None).unwrap();
    let want = route_on_device(part, z, selector, None).unwrap();
    assert_eq!(
        ints(got.row_of),
        ints(want.row_of),
        "a row slice of a larger tensor"
    );
}
