//! The MoE layer on burn-wgpu (and burn-cuda, where a GPU is present) against burn
//! ndarray, forward and gradients, with more
//! routes than lavapipe runs loop iterations (65535): dispatch and combine must not lose
//! rows on any adapter, which burn's own scatter ops do there (`core/src/train/
//! loop_limit.rs`). Top-k in the exact layout, Top-p in the padded one. And the row
//! moves alone (dispatch, combine and their gradients) on awkward shapes.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::{Tensor, TensorData};
use dtopp::model::{ExpertBounds, MoeWeights, Precision, Selector, moe_forward};
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
    bounds: Option<ExpertBounds>,
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
        bounds.map(Into::into),
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
    // burn's device set up for dtopp's WGSL routing on its buffers.
    dtopp_tests::wgpu_model_device();
    layer_matches_ndarray::<Wgpu>(&Default::default(), "wgpu");
}

/// The same on burn-cuda: dtopp's CUDA kernels route, normalize and move the rows
/// (skipped, saying why, without a GPU).
#[cfg(feature = "cuda")]
#[test]
fn moe_layer_on_cuda_matches_ndarray() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    layer_matches_ndarray::<burn::backend::Cuda>(&Default::default(), "cuda");
}

/// The layer's loss, route count and every gradient on `B` against ndarray: Top-4 in the
/// exact layout and Top-p 0.95 in the padded one.
fn layer_matches_ndarray<B: dtopp::model::RoutingBackend>(device: &B::Device, backend: &str) {
    let v = values();
    let top_p = Selector::TopP {
        threshold: 0.95,
        k_max: None,
    };
    let names = ["x", "router", "theta", "gate", "up", "down"];
    // Padded buffers that hold any load: E N = 102,000 rows.
    let padded = ExpertBounds {
        capacity: N,
        slots: E,
    };
    let runs = [
        (Selector::TopK(4), None, "exact"),
        (top_p, Some(padded), "padded"),
    ];
    for (selector, bounds, name) in runs {
        let (want, want_grads, want_routes) =
            run::<NdArray>(&Default::default(), &v, selector, bounds);
        let (got, got_grads, got_routes) = run::<B>(device, &v, selector, bounds);
        println!("{selector:?} {name}: {got_routes} routes; loss {backend} {got} ndarray {want}");
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
                "{selector:?} {name}: d/d{} differs on {backend} ({worst} x tolerance)",
                names[which]
            );
        }
    }
}

/// Source rows R, width D, routes M (each reading a random source row); the slots per
/// source row follow from the draw.
const ROW_SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (1, 3, 5),
    (5, 64, 9),
    (7, 5, 20),
    (4, 7, 3),
    (37, 130, 100),
];

/// The index `[M]` (source row of each route, some rows never read) and its inverse
/// `[R, S]` (the routes of each row in order, padded with M).
fn row_maps(r: usize, m: usize, rng: &mut SplitMix64) -> (Vec<i64>, Vec<i64>, usize) {
    let index: Vec<i64> = (0..m)
        .map(|_| ((rng.uniform() * r as f64) as i64).min(r as i64 - 1))
        .collect();
    let mut routes = vec![Vec::new(); r];
    for (route, &row) in index.iter().enumerate() {
        routes[row as usize].push(route as i64);
    }
    let s = routes.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut inverse = vec![m as i64; r * s];
    for (row, list) in routes.iter().enumerate() {
        inverse[row * s..row * s + list.len()].copy_from_slice(list);
    }
    (index, inverse, s)
}

/// Dispatch (`gather_rows`), a nonlinearity, combine (`sum_rows`), a weighted sum: the
/// loss and its gradients with respect to the rows, the combine weights and the routed
/// values.
fn row_moves<B: dtopp::model::RowMovesBackend>(
    (r, d, m): (usize, usize, usize),
    seed: u64,
    nudge: Option<(usize, usize, f32)>,
) -> (f32, [Vec<f32>; 2]) {
    use burn::tensor::Int;
    use dtopp::model::RowMovesBackend;
    let mut rng = SplitMix64::new(seed);
    let (index, inverse, s) = row_maps(r, m, &mut rng);
    let mut x: Vec<f32> = (0..r * d).map(|_| rng.normal() as f32).collect();
    let mut w: Vec<f32> = (0..m).map(|_| rng.normal() as f32).collect();
    let out_w: Vec<f32> = (0..r * d).map(|_| rng.normal() as f32).collect();
    match nudge {
        Some((0, i, h)) => x[i] += h,
        Some((_, i, h)) => w[i] += h,
        None => {}
    }
    let device = Default::default();
    let x = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(x, [r, d]), &device).require_grad();
    let w = Tensor::<Autodiff<B>, 1>::from_data(TensorData::new(w, [m]), &device).require_grad();
    let index = Tensor::<Autodiff<B>, 1, Int>::from_data(TensorData::new(index, [m]), &device);
    let inverse =
        Tensor::<Autodiff<B>, 2, Int>::from_data(TensorData::new(inverse, [r, s]), &device);
    let routed = Autodiff::<B>::gather_rows(x.clone(), &index, Some(&inverse));
    let transformed = routed.clone() * routed.clone() + routed;
    let out = Autodiff::<B>::sum_rows(transformed, Some(w.clone()), Some(&inverse), &index, r);
    let out_w = Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(out_w, [r, d]), &device);
    let loss = (out * out_w).sum();
    let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0];
    let grads = loss.backward();
    let grad = |t: Option<Tensor<B, 2>>| t.map_or(Vec::new(), |t| t.into_data().to_vec().unwrap());
    let gx = grad(x.grad(&grads));
    let gw = w
        .grad(&grads)
        .map_or(Vec::new(), |t| t.into_data().to_vec().unwrap());
    (value, [gx, gw])
}

/// The row moves on burn-wgpu run dtopp's `rows.wgsl` (gather, slot sums, row dots, on
/// burn's buffers), forward and backward; on ndarray burn's select and scatter. Both
/// against each other on awkward shapes (one row, D of one workgroup, past one and not
/// a multiple of 4, rows never read), and ndarray's gradients against finite
/// differences. Tolerance: 1e-4 relative (f32 sums in different orders).
#[test]
fn row_moves_on_wgpu_match_ndarray_and_finite_differences() {
    for (k, &shape) in ROW_SHAPES.iter().enumerate() {
        let seed = 40 + k as u64;
        let (loss, grads) = row_moves::<NdArray>(shape, seed, None);
        // Finite differences of the CPU form on a few entries (the loss is quadratic in
        // x and linear in w: central differences are exact up to rounding).
        for (which, grad) in grads.iter().enumerate() {
            for i in [0, grad.len() / 2, grad.len().saturating_sub(1)] {
                if grad.is_empty() {
                    continue;
                }
                let h = 1e-2;
                let up = row_moves::<NdArray>(shape, seed, Some((which, i, h))).0;
                let down = row_moves::<NdArray>(shape, seed, Some((which, i, -h))).0;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grad[i]).abs() <= 2e-2 * (1.0 + grad[i].abs()),
                    "{shape:?}: gradient {which}[{i}] {} vs finite difference {fd}",
                    grad[i]
                );
            }
        }
        if dtopp_tests::wgpu_model_device().is_some() {
            rows_match::<Wgpu>(shape, seed, (loss, &grads));
        }
    }
}

/// `rows.cu` on burn-cuda's buffers against ndarray, as above (skipped, saying why,
/// without a GPU).
#[cfg(feature = "cuda")]
#[test]
fn row_moves_on_cuda_match_ndarray() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    for (k, &shape) in ROW_SHAPES.iter().enumerate() {
        let seed = 40 + k as u64;
        let (loss, grads) = row_moves::<NdArray>(shape, seed, None);
        rows_match::<burn::backend::Cuda>(shape, seed, (loss, &grads));
    }
}

/// `B`'s row moves against ndarray's loss and gradients (1e-4 relative: f32 sums in
/// different orders).
fn rows_match<B: dtopp::model::RowMovesBackend>(
    shape: (usize, usize, usize),
    seed: u64,
    (loss, grads): (f32, &[Vec<f32>; 2]),
) {
    let (got, got_grads) = row_moves::<B>(shape, seed, None);
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
    assert!(close(got, loss), "{shape:?}: loss {got} vs {loss}");
    for (which, (g, w)) in got_grads.iter().zip(grads).enumerate() {
        assert_eq!(g.len(), w.len(), "{shape:?}: gradient {which}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(close(*a, *b), "{shape:?}: gradient {which}[{i}] {a} vs {b}");
        }
    }
}
