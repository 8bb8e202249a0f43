//! The grouped expert products with their offsets on the device (`grouped_matmul.wgsl` on
//! burn-wgpu's buffers, lavapipe in CI; `grouped_matmul.cu` on burn-cuda's buffers where a
//! GPU is present) against a CPU reference in f64: the forward, `dX` and every `dW_e`,
//! through burn's autodiff exactly as the grouped layout calls them.
//!
//! Shapes: empty experts (first, middle, last), one expert with every row, row counts
//! that are not multiples of the 32-row tile, widths that are not multiples of 4 (or of
//! the tile), E not a power of two, one row, and a row bound past the routes (those rows
//! must come out as exact zeros, forward and backward).
//!
//! Tolerance: `|got - want| <= 2e-5 (1 + |want|) + 1e-6 sqrt(K)` for a sum of K products
//! of standard normals (`dtopp_tests::grouped`): the kernel sums in f32 with fused
//! multiply-adds in its tile order, the reference in f64. The CUDA kernels' bf16 and f16
//! forms are checked in `cuda_conformance.rs`.

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::host_reads;
use dtopp::model::{GroupedMatmulBackend, Precision, grouped_on_device};
use dtopp::rng::SplitMix64;
use dtopp_tests::grouped::{assert_close, cases, normals, offsets, reference};
use dtopp_tests::wgpu_model_device;

#[test]
fn grouped_products_on_the_device_match_the_cpu_reference() {
    let Some(device) = wgpu_model_device() else {
        return;
    };
    products_match_the_reference::<Wgpu>(&device);
}

#[test]
fn offsets_past_the_row_bound_stay_inside_the_buffers() {
    let Some(device) = wgpu_model_device() else {
        return;
    };
    offsets_are_clamped::<Wgpu>(&device);
}

/// The same checks on burn-cuda's buffers (skipped with the reason without a GPU).
#[cfg(feature = "cuda")]
#[test]
fn grouped_products_on_burn_cuda_buffers_match_the_cpu_reference() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    let device = burn::backend::cuda::CudaDevice::default();
    products_match_the_reference::<burn::backend::Cuda>(&device);
    offsets_are_clamped::<burn::backend::Cuda>(&device);
}

fn products_match_the_reference<Inner: GroupedMatmulBackend>(device: &Inner::Device) {
    let device = device.clone();
    assert!(<Autodiff<Inner> as GroupedMatmulBackend>::device_offsets());
    let mut rng = SplitMix64::new(24);
    for c in cases() {
        let (d, f, e) = (c.d, c.f, c.counts.len());
        let x = normals(&mut rng, c.rows * d);
        let w = normals(&mut rng, e * d * f);
        let up = normals(&mut rng, c.rows * f);
        let offsets = offsets(&c.counts);
        let xs = Tensor::<Autodiff<Inner>, 2>::from_data(
            TensorData::new(x.clone(), [c.rows, d]),
            &device,
        )
        .require_grad();
        let wt =
            Tensor::<Autodiff<Inner>, 3>::from_data(TensorData::new(w.clone(), [e, d, f]), &device)
                .require_grad();
        let ut = Tensor::<Autodiff<Inner>, 2>::from_data(
            TensorData::new(up.clone(), [c.rows, f]),
            &device,
        );
        let on_device = Tensor::<Autodiff<Inner>, 1, Int>::from_data(
            TensorData::new(offsets.clone(), [e + 1]),
            &device,
        );

        let reads = host_reads::total();
        let y = grouped_on_device(xs.clone(), wt.clone(), &on_device, Precision::F32);
        let grads = (y.clone() * ut).sum().backward();
        assert_eq!(
            host_reads::total(),
            reads,
            "{:?}: the grouped products read nothing back",
            c.counts
        );
        let values = |t: Tensor<Inner, 2>| t.into_data().to_vec::<f32>().unwrap();
        let (want_y, want_dx, want_dw) = reference(&c, &x, &w, &up);
        let what = format!("counts {:?}, rows {}, D {d}, F {f}", c.counts, c.rows);
        let got_y = values(y.inner());
        let got_dx = values(xs.grad(&grads).unwrap());
        let got_dw = wt
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_close(&got_y, &want_y, d, &format!("{what}: y"));
        assert_close(&got_dx, &want_dx, f, &format!("{what}: dX"));
        let routes = offsets[e] as usize;
        assert_close(&got_dw, &want_dw, routes, &format!("{what}: dW"));
        // Past the routes: exact zeros, forward and backward.
        assert!(
            got_y[routes * f..].iter().all(|&v| v == 0.0),
            "{what}: y past the routes"
        );
        assert!(
            got_dx[routes * d..].iter().all(|&v| v == 0.0),
            "{what}: dX past the routes"
        );
        // An expert without rows: an exact zero gradient.
        for (expert, &count) in c.counts.iter().enumerate() {
            if count == 0 {
                let block = &got_dw[expert * d * f..(expert + 1) * d * f];
                assert!(
                    block.iter().all(|&v| v == 0.0),
                    "{what}: dW of empty expert {expert}"
                );
            }
        }
        // The same products again: bit for bit (each output summed by one thread in order).
        let again =
            values(grouped_on_device(xs.clone(), wt.clone(), &on_device, Precision::F32).inner());
        assert_eq!(again, got_y, "{what}: repeatable");
    }
}

/// Offsets past the row bound (a micro-batch that outgrew its bound, which the trainer
/// detects and redoes) are clamped: the kernel writes nothing outside its buffers.
fn offsets_are_clamped<Inner: GroupedMatmulBackend>(device: &Inner::Device) {
    let device = device.clone();
    let (rows, d, f) = (10, 4, 3);
    let xs = Tensor::<Inner, 2>::ones([rows, d], &device);
    let w = Tensor::<Inner, 3>::ones([2, d, f], &device);
    let offsets =
        Tensor::<Inner, 1, Int>::from_data(TensorData::new(vec![0i32, 6, 25], [3]), &device);
    // Expert 0 on rows 0..6, expert 1 on 6..10 (its offset 25 clamped to the bound).
    let y = Inner::grouped_matmul_on_device(
        xs.clone(),
        w.clone(),
        offsets.clone(),
        false,
        Precision::F32,
    );
    assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![4.0; rows * f]);
    let g = Tensor::<Inner, 2>::ones([rows, f], &device);
    let dw = Inner::grouped_weight_grad_on_device(xs, g, [2, d, f], offsets, Precision::F32);
    let dw = dw.into_data().to_vec::<f32>().unwrap();
    assert_eq!(&dw[..d * f], vec![6.0; d * f].as_slice());
    assert_eq!(&dw[d * f..], vec![4.0; d * f].as_slice());
}
