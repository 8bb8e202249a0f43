//! The PI law as a backend op (`ControllerBackend`): burn-wgpu's `controller.wgsl` and
//! burn-cuda's `controller.cu` on burn's buffers against the burn-op default on ndarray (which equals the CPU reference
//! bit for bit, `core/src/train/device_control.rs`), for the global scope (one controller
//! over every layer) and the per-layer one (a workgroup per controller), with gains that
//! saturate the clamp and with Ki = 0.

use burn::backend::{NdArray, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::controller::{ControllerConfig, ThresholdControl, ThresholdScope};
use dtopp::rng::SplitMix64;
use dtopp::train::{ControllerBackend, DeviceControl};

fn sums<B: Backend>(v: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

fn state<B: ControllerBackend>(control: &DeviceControl<B>) -> Vec<f32> {
    control
        .flat_state()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

#[test]
fn the_controller_kernel_on_burn_wgpu_follows_the_burn_op_law() {
    let Some(wgpu) = dtopp_tests::wgpu_model_device() else {
        return;
    };
    follows_the_burn_op_law::<Wgpu>(&wgpu, "wgpu");
}

/// `controller.cu` on burn-cuda's buffers, the same way (skipped, saying why, without a
/// GPU).
#[cfg(feature = "cuda")]
#[test]
fn the_controller_kernel_on_burn_cuda_follows_the_burn_op_law() {
    if dtopp_tests::cuda_or_skip().is_none() {
        return;
    }
    follows_the_burn_op_law::<burn::backend::Cuda>(&Default::default(), "cuda");
}

/// 25 updates of each scope and gain setting on `B` against the burn-op law on ndarray.
fn follows_the_burn_op_law<B: ControllerBackend>(device: &B::Device, backend: &str) {
    let (layers, experts, tokens) = (5usize, 7usize, 300usize);
    let mut compared = 0;
    for scope in [ThresholdScope::Global, ThresholdScope::PerLayer] {
        for (target, ki) in [(2.0, 0.5), (6.5, 0.5), (1.0, 0.0), (3.0, 4.0)] {
            let mut config = ControllerConfig::new(target, experts);
            config.ki = ki;
            let starts: Vec<f64> = match scope {
                ThresholdScope::Global => vec![0.6],
                ThresholdScope::PerLayer => vec![0.6, 0.3, 0.9, 0.5, 0.75],
            };
            let control = ThresholdControl::new(&config, scope, layers, &starts).unwrap();
            let mut want = DeviceControl::<NdArray>::upload(&control, &Default::default());
            let mut got = DeviceControl::<B>::upload(&control, device);
            let mut rng = SplitMix64::new(11);
            for step in 0..25 {
                // Per layer, between 1 and E experts for each of the tokens.
                let k_sum: Vec<i64> = (0..layers)
                    .map(|_| {
                        (0..tokens)
                            .map(|_| 1 + (rng.next_u64() % experts as u64) as i64)
                            .sum()
                    })
                    .collect();
                want.update(sums::<NdArray>(&k_sum, &Default::default()), tokens);
                got.update(sums::<B>(&k_sum, device), tokens);
                let (g, w) = (state(&got), state(&want));
                assert_eq!(g.len(), w.len());
                for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "{scope:?} T={target} Ki={ki} step {step}: state[{i}] {backend} {a} burn ops {b}"
                    );
                }
                compared += 1;
            }
            let p: Vec<f32> = got.thresholds().into_data().to_vec().unwrap();
            assert_eq!(p.len(), layers, "one threshold per layer");
        }
    }
    println!("{compared} controller updates on {backend} equal the burn-op law");
}
