//! The MoE layer on burn-wgpu against burn ndarray, forward and gradients, with more
//! routes than lavapipe runs loop iterations (65535): dispatch and combine must not lose
//! rows on any adapter, which burn's own scatter ops do there (`core/src/train/
//! loop_limit.rs`). Top-k through the CPU reference on a host copy of P, Top-p
//! through burn tensor ops on the device.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{Tensor, TensorData};
use dtopp::cpu_fast::CpuFast;
use dtopp::model::{MoeWeights, Precision, RouteEngine, Selector, moe_forward};
use dtopp::rng::SplitMix64;

/// Tokens, model width, experts, expert width: 17,000 tokens x 4 experts = 68,000 routes
/// under Top-4, about 70,000 under Top-p 0.95.
const N: usize = 17_000;
const D: usize = 4;
const E: usize = 6;
const F: usize = 3;

struct Values {
    tensors: Vec<(Vec<f32>, Vec<usize>)>,
    out_w: Vec<f32>,
}

fn values() -> Values {
    let mut rng = SplitMix64::new(3);
    let shapes = [
        vec![N, D],
        vec![D, E],
        vec![1],
        vec![E, D, F],
        vec![E, D, F],
        vec![E, F, D],
    ];
    let tensors = shapes
        .into_iter()
        .enumerate()
        .map(|(which, shape)| {
            let count = shape.iter().product();
            let v = (0..count)
                .map(|_| if which == 2 { 1.3 } else { rng.normal() as f32 })
                .collect();
            (v, shape)
        })
        .collect();
    let out_w = (0..N * D).map(|_| rng.normal() as f32).collect();
    Values { tensors, out_w }
}

/// The loss, its gradients (x, router, theta, gate, up, down, flattened) and the route count.
fn run<B: dtopp::model::RoutingBackend>(
    device: &B::Device,
    v: &Values,
    selector: Selector,
    engine: &RouteEngine,
) -> (f32, Vec<Vec<f32>>, usize) {
    let t: Vec<Tensor<Autodiff<B>, 1>> = v
        .tensors
        .iter()
        .map(|(data, _)| {
            Tensor::from_data(TensorData::new(data.clone(), [data.len()]), device).require_grad()
        })
        .collect();
    let w = MoeWeights {
        router: t[1].clone().reshape([D, E]),
        theta: t[2].clone(),
        gate: t[3].clone().reshape([E, D, F]),
        up: t[4].clone().reshape([E, D, F]),
        down: t[5].clone().reshape([E, F, D]),
    };
    let fwd = moe_forward(
        t[0].clone().reshape([N, D]),
        &w,
        true,
        selector,
        None,
        engine,
        None,
        Precision::F32,
    )
    .unwrap();
    let routes: usize = fwd
        .routing
        .counts()
        .unwrap()
        .iter()
        .map(|&k| k as usize)
        .sum();
    let out_w =
        Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.out_w.clone(), [N, D]), device);
    let loss = (fwd.output * out_w).sum();
    let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let grads = loss.backward();
    let g = t
        .iter()
        .map(|p| p.grad(&grads).unwrap().into_data().to_vec().unwrap())
        .collect();
    (value, g, routes)
}

#[test]
fn moe_layer_past_the_loop_limit_on_wgpu_matches_ndarray() {
    let Some(ops) = dtopp_tests::wgpu_or_skip() else {
        return;
    };
    println!("wgpu adapter: {}", ops.adapter_name());
    // burn's device set up for dtopp's WGSL routing on its buffers (the `device` engine).
    dtopp_tests::wgpu_model_device();
    let v = values();
    let top_p = Selector::TopP {
        threshold: 0.95,
        k_max: None,
    };
    let names = ["x", "router", "theta", "gate", "up", "down"];
    let runs = [
        (
            Selector::TopK(4),
            RouteEngine::Cpu(CpuFast),
            "kernels (CPU reference)",
        ),
        (top_p, RouteEngine::Device, "device"),
    ];
    for (selector, engine, name) in runs {
        {
            let (want, want_grads, want_routes) =
                run::<NdArray>(&Default::default(), &v, selector, &engine);
            let (got, got_grads, got_routes) =
                run::<Wgpu>(&Default::default(), &v, selector, &engine);
            println!("{selector:?} {name}: {got_routes} routes; loss wgpu {got} ndarray {want}");
            assert!(want_routes > 65_535, "{want_routes} routes: past the limit");
            assert_eq!(got_routes, want_routes, "{selector:?} {name}: routes");
            let tol = |w: f32| 1e-3 + 1e-3 * w.abs();
            assert!(
                (got - want).abs() <= tol(want),
                "{selector:?} {name}: loss {got} vs {want}"
            );
            for (which, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
                let worst = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs() / (1e-3 + 1e-3 * b.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1.0,
                    "{selector:?} {name}: d/d{} differs ({worst} x tolerance)",
                    names[which]
                );
            }
        }
    }
}
