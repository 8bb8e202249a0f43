//! DRN as a backend op (`DrnBackend`): burn-wgpu's `drn.wgsl` and burn-cuda's `drn.cu`
//! kernels on burn's buffers, forward and backward, against the burn-op default on ndarray (forward, the explicit
//! backward, and autodiff through the forward ops) and against finite differences, on
//! awkward shapes: one token, one expert, E not a power of two, every logit tied, more
//! tokens than lavapipe runs loop iterations.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use dtopp::model::{DrnBackend, drn_backward_ops, drn_probs};
use dtopp::rng::SplitMix64;

/// Tokens, experts, theta, whether every logit of a token is the same.
const SHAPES: [(usize, usize, f32, bool); 7] = [
    (1, 1, 1.0, false),
    (1, 5, 0.7, false),
    (7, 5, 2.5, false),
    (16, 64, 1.3, false),
    (3, 100, 0.4, false),
    (9, 6, 1.7, true),
    (70_000, 3, 1.1, false),
];

struct Case {
    n: usize,
    e: usize,
    theta: f32,
    z: Vec<f32>,
    w: Vec<f32>,
}

fn case(i: usize, (n, e, theta, tied): (usize, usize, f32, bool)) -> Case {
    let mut rng = SplitMix64::new(90 + i as u64);
    let z = (0..n * e)
        .map(|j| {
            if tied {
                (j / e) as f32 * 0.5
            } else {
                rng.normal() as f32 * 2.0
            }
        })
        .collect();
    let w = (0..n * e).map(|_| rng.normal() as f32).collect();
    Case { n, e, theta, z, w }
}

fn floats<B: Backend, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (atol + rtol * w.abs()))
        .fold(0f32, f32::max);
    assert!(worst <= 1.0, "{what}: {worst} x tolerance");
}

/// `L = sum(w * P)`: its value, dL/dz and dL/dtheta on backend `B` through `B::drn`.
fn loss_and_grads<B: DrnBackend + burn::tensor::backend::AutodiffBackend>(
    c: &Case,
    device: &B::Device,
) -> (f32, Vec<f32>, Vec<f32>) {
    let z = floats::<B, 2>(&c.z, [c.n, c.e], device).require_grad();
    let theta = floats::<B, 1>(&[c.theta], [1], device).require_grad();
    let w = floats::<B, 2>(&c.w, [c.n, c.e], device);
    let loss = (B::drn(z.clone(), theta.clone()) * w).sum();
    let value = host(loss.clone())[0];
    let grads = loss.backward();
    (
        value,
        host(z.grad(&grads).unwrap()),
        host(theta.grad(&grads).unwrap()),
    )
}

#[test]
fn drn_kernels_on_burn_wgpu_match_the_burn_ops_and_finite_differences() {
    let Some(wgpu) = dtopp_tests::wgpu_model_device() else {
        return;
    };
    drn_kernels_match::<Wgpu>(&wgpu);
}

/// The same checks of `drn.cu` on burn-cuda's buffers (skipped, saying why, without a
/// GPU; a failure under DTOPP_REQUIRE_GPU=1).
#[cfg(feature = "cuda")]
#[test]
fn drn_kernels_on_burn_cuda_match_the_burn_ops_and_finite_differences() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    drn_kernels_match::<burn::backend::Cuda>(&Default::default());
}

/// `B`'s own DRN (forward, backward, and autodiff through it) against the burn-op forms on
/// ndarray and against finite differences, on every shape.
fn drn_kernels_match<B: DrnBackend>(dev: &B::Device) {
    assert!(B::OWN_DRN, "{} has its own DRN", B::name(dev));
    let cpu = Default::default();
    for (i, shape) in SHAPES.into_iter().enumerate() {
        let c = case(i, shape);
        let (n, e) = (c.n, c.e);
        let what = format!("N={n} E={e} theta={}", c.theta);

        // Forward, and the backward kernel against the explicit burn-op backward.
        let want_p = drn_probs(
            floats::<NdArray, 2>(&c.z, [n, e], &cpu),
            floats::<NdArray, 1>(&[c.theta], [1], &cpu),
        );
        let got_p = B::drn(
            floats::<B, 2>(&c.z, [n, e], dev),
            floats::<B, 1>(&[c.theta], [1], dev),
        );
        let want_p = host(want_p);
        assert_close(&format!("{what}: P"), &host(got_p), &want_p, 1e-6, 1e-4);
        let (want_dz, want_dtheta) = drn_backward_ops(
            floats::<NdArray, 2>(&c.z, [n, e], &cpu),
            floats::<NdArray, 1>(&[c.theta], [1], &cpu),
            floats::<NdArray, 2>(&want_p, [n, e], &cpu),
            floats::<NdArray, 2>(&c.w, [n, e], &cpu),
        );
        let (got_dz, got_dtheta) = B::drn_backward(
            floats::<B, 2>(&c.z, [n, e], dev),
            floats::<B, 1>(&[c.theta], [1], dev),
            floats::<B, 2>(&want_p, [n, e], dev),
            floats::<B, 2>(&c.w, [n, e], dev),
        );
        let (want_dz, want_dtheta) = (host(want_dz), host(want_dtheta));
        assert_close(&format!("{what}: dz"), &host(got_dz), &want_dz, 1e-5, 1e-3);
        // dtheta sums N per-token shares: its rounding grows with N.
        let theta_atol = 1e-4 * (1.0 + (n as f32).sqrt());
        assert_close(
            &format!("{what}: dtheta"),
            &host(got_dtheta),
            &want_dtheta,
            theta_atol,
            1e-3,
        );

        // Through autodiff: the tracked op on B against burn differentiating the
        // forward ops on ndarray.
        let (got_l, got_gz, got_gt) = loss_and_grads::<Autodiff<B>>(&c, dev);
        let (want_l, want_gz, want_gt) = loss_and_grads::<Autodiff<NdArray>>(&c, &cpu);
        assert_close(&format!("{what}: loss"), &[got_l], &[want_l], 1e-4, 1e-4);
        assert_close(
            &format!("{what}: autodiff dz"),
            &got_gz,
            &want_gz,
            1e-5,
            1e-3,
        );
        assert_close(
            &format!("{what}: autodiff dtheta"),
            &got_gt,
            &want_gt,
            theta_atol,
            1e-3,
        );

        // Central differences of the loss (small shapes), against the kernels' gradient.
        // Not for tied logits: there sigma = sqrt(eps), so the loss bends at a scale of
        // 1e-3, far below any step f32 differences can take.
        if n * e <= 64 && !shape.3 {
            let h = 1e-2f32;
            let loss_at = |z: &[f32], theta: f32| -> f64 {
                let p = drn_probs(
                    floats::<NdArray, 2>(z, [n, e], &cpu),
                    floats::<NdArray, 1>(&[theta], [1], &cpu),
                );
                host(p)
                    .iter()
                    .zip(&c.w)
                    .map(|(p, w)| f64::from(p * w))
                    .sum()
            };
            let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
            for j in 0..n * e {
                let numeric = fd(&|d| {
                    let mut z = c.z.clone();
                    z[j] += d;
                    loss_at(&z, c.theta)
                });
                let got = f64::from(got_gz[j]);
                assert!(
                    (numeric - got).abs() <= 5e-3 + 3e-2 * numeric.abs(),
                    "{what}: dL/dz[{j}] kernel {got}, finite difference {numeric}"
                );
            }
            let numeric = fd(&|d| loss_at(&c.z, c.theta + d));
            let got = f64::from(got_gt[0]);
            assert!(
                (numeric - got).abs() <= 5e-3 + 3e-2 * numeric.abs(),
                "{what}: dL/dtheta kernel {got}, finite difference {numeric}"
            );
        }
        println!("{what}: forward, backward and autodiff agree");
    }
}
