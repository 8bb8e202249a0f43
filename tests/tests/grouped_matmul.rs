//! The grouped expert products with their offsets on the device (`grouped_matmul.wgsl` on
//! burn-wgpu's buffers; lavapipe in CI) against a CPU reference in f64: the forward, `dX`
//! and every `dW_e`, through burn's autodiff exactly as the grouped layout calls them.
//!
//! Shapes: empty experts (first, middle, last), one expert with every row, row counts
//! that are not multiples of the 32-row tile, widths that are not multiples of 4 (or of
//! the tile), E not a power of two, one row, and a row bound past the routes (those rows
//! must come out as exact zeros, forward and backward).
//!
//! Tolerance: `|got - want| <= 2e-5 (1 + |want|) + 1e-6 sqrt(K)` for a sum of K products
//! of standard normals: the kernel sums in f32 with fused multiply-adds in its tile
//! order, the reference in f64.

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::host_reads;
use dtopp::model::{GroupedMatmulBackend, Precision, grouped_on_device};
use dtopp::rng::SplitMix64;
use dtopp_tests::wgpu_model_device;

type B = Autodiff<Wgpu>;

/// Rows per expert, the row bound (at least their sum), D and F.
struct Case {
    counts: Vec<usize>,
    rows: usize,
    d: usize,
    f: usize,
}

fn cases() -> Vec<Case> {
    let case = |counts: &[usize], extra: usize, d: usize, f: usize| Case {
        rows: counts.iter().sum::<usize>() + extra,
        counts: counts.to_vec(),
        d,
        f,
    };
    vec![
        // One row, one expert.
        case(&[1], 0, 3, 5),
        // Empty experts first, in the middle and last; E = 5; D, F odd.
        case(&[0, 7, 0, 33, 0], 0, 13, 9),
        // One expert with every row, the others empty; rows past the routes.
        case(&[0, 0, 70, 0], 19, 6, 37),
        // Row counts across tile edges (31, 32, 33, 65); D a multiple of 4 but not of 32.
        case(&[31, 32, 33, 1, 65], 5, 36, 40),
        // Every expert empty: the output is all zeros.
        case(&[0, 0, 0], 11, 5, 7),
        // E = 12, a deeper product (several K tiles, the last partial) and wide columns.
        case(&[9, 0, 14, 3, 40, 2, 0, 17, 5, 1, 0, 26], 8, 70, 66),
    ]
}

fn normals(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal() as f32).collect()
}

/// Reference: y, dX = g_y · Wᵀ and dW_e = x_eᵀ g_y over the routes, in f64.
fn reference(c: &Case, x: &[f32], w: &[f32], up: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (d, f, e) = (c.d, c.f, c.counts.len());
    let mut y = vec![0.0; c.rows * f];
    let mut dx = vec![0.0; c.rows * d];
    let mut dw = vec![0.0; e * d * f];
    let mut row = 0;
    for (expert, &count) in c.counts.iter().enumerate() {
        let wb = expert * d * f;
        for m in row..row + count {
            for j in 0..f {
                y[m * f + j] = (0..d)
                    .map(|k| f64::from(x[m * d + k]) * f64::from(w[wb + k * f + j]))
                    .sum();
            }
            for k in 0..d {
                dx[m * d + k] = (0..f)
                    .map(|j| f64::from(up[m * f + j]) * f64::from(w[wb + k * f + j]))
                    .sum();
                for j in 0..f {
                    dw[wb + k * f + j] += f64::from(x[m * d + k]) * f64::from(up[m * f + j]);
                }
            }
        }
        row += count;
    }
    (y, dx, dw)
}

fn assert_close(got: &[f32], want: &[f64], depth: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let slack = 1e-6 * (depth as f64).sqrt();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 2e-5 * (1.0 + w.abs()) + slack,
            "{what}[{i}]: kernel {g}, reference {w}"
        );
    }
}

#[test]
fn grouped_products_on_the_device_match_the_cpu_reference() {
    let Some(device) = wgpu_model_device() else {
        return;
    };
    assert!(<B as GroupedMatmulBackend>::DEVICE_OFFSETS);
    let mut rng = SplitMix64::new(24);
    for c in cases() {
        let (d, f, e) = (c.d, c.f, c.counts.len());
        let x = normals(&mut rng, c.rows * d);
        let w = normals(&mut rng, e * d * f);
        let up = normals(&mut rng, c.rows * f);
        let mut offsets = vec![0i32];
        for &count in &c.counts {
            offsets.push(offsets.last().unwrap() + count as i32);
        }
        let xs = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [c.rows, d]), &device)
            .require_grad();
        let wt =
            Tensor::<B, 3>::from_data(TensorData::new(w.clone(), [e, d, f]), &device).require_grad();
        let ut = Tensor::<B, 2>::from_data(TensorData::new(up.clone(), [c.rows, f]), &device);
        let on_device =
            Tensor::<B, 1, Int>::from_data(TensorData::new(offsets.clone(), [e + 1]), &device);

        let reads = host_reads::total();
        let y = grouped_on_device(xs.clone(), wt.clone(), &on_device, Precision::F32);
        let grads = (y.clone() * ut).sum().backward();
        assert_eq!(
            host_reads::total(),
            reads,
            "{:?}: the grouped products read nothing back",
            c.counts
        );
        let values = |t: Tensor<Wgpu, 2>| t.into_data().to_vec::<f32>().unwrap();
        let (want_y, want_dx, want_dw) = reference(&c, &x, &w, &up);
        let what = format!("counts {:?}, rows {}, D {d}, F {f}", c.counts, c.rows);
        let got_y = values(y.inner());
        let got_dx = values(xs.grad(&grads).unwrap());
        let got_dw = wt.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        assert_close(&got_y, &want_y, d, &format!("{what}: y"));
        assert_close(&got_dx, &want_dx, f, &format!("{what}: dX"));
        let routes = offsets[e] as usize;
        assert_close(&got_dw, &want_dw, routes, &format!("{what}: dW"));
        // Past the routes: exact zeros, forward and backward.
        assert!(got_y[routes * f..].iter().all(|&v| v == 0.0), "{what}: y past the routes");
        assert!(got_dx[routes * d..].iter().all(|&v| v == 0.0), "{what}: dX past the routes");
        // An expert without rows: an exact zero gradient.
        for (expert, &count) in c.counts.iter().enumerate() {
            if count == 0 {
                let block = &got_dw[expert * d * f..(expert + 1) * d * f];
                assert!(block.iter().all(|&v| v == 0.0), "{what}: dW of empty expert {expert}");
            }
        }
        // The same products again: bit for bit (each output summed by one thread in order).
        let again = values(grouped_on_device(xs.clone(), wt.clone(), &on_device, Precision::F32).inner());
        assert_eq!(again, got_y, "{what}: repeatable");
    }
}

/// Offsets past the row bound (a micro-batch that outgrew its bound, which the trainer
/// detects and redoes) are clamped: the kernel writes nothing outside its buffers.
#[test]
fn offsets_past_the_row_bound_stay_inside_the_buffers() {
    let Some(device) = wgpu_model_device() else {
        return;
    };
    let (rows, d, f) = (10, 4, 3);
    let xs = Tensor::<Wgpu, 2>::ones([rows, d], &device);
    let w = Tensor::<Wgpu, 3>::ones([2, d, f], &device);
    let offsets = Tensor::<Wgpu, 1, Int>::from_data(TensorData::new(vec![0i32, 6, 25], [3]), &device);
    // Expert 0 on rows 0..6, expert 1 on 6..10 (its offset 25 clamped to the bound).
    let y = Wgpu::grouped_matmul_on_device(xs.clone(), w.clone(), offsets.clone(), false, Precision::F32);
    assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![4.0; rows * f]);
    let g = Tensor::<Wgpu, 2>::ones([rows, f], &device);
    let dw = Wgpu::grouped_weight_grad_on_device(xs, g, [2, d, f], offsets, Precision::F32);
    let dw = dw.into_data().to_vec::<f32>().unwrap();
    assert_eq!(&dw[..d * f], vec![6.0; d * f].as_slice());
    assert_eq!(&dw[d * f..], vec![4.0; d * f].as_slice());
}
