//! The WGSL kernels against the CPU reference, on whatever adapter wgpu finds (lavapipe in
//! CI). Without an adapter the tests skip and say why, unless DTOPP_REQUIRE_WGPU=1 or
//! DTOPP_REQUIRE_GPU=1, which CI sets so that a missing driver fails the run.

use dtopp::ops::RoutingOps;
use dtopp_tests::{assert_conforms, cases, wgpu_or_skip};

#[test]
fn wgsl_kernels_conform_to_the_cpu_reference() {
    let Some(ops) = wgpu_or_skip() else { return };
    let started = std::time::Instant::now();
    assert_conforms(&ops, cases(2026));
    println!(
        "wgpu conformance took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn inputs_beyond_the_device_limits_are_refused_by_name() {
    let Some(ops) = wgpu_or_skip() else { return };
    let limit = ops
        .kernels()
        .context()
        .device
        .limits()
        .max_storage_buffer_binding_size;
    let too_many = (limit / 4 + 1) as usize;
    let err = ops
        .kernels()
        .storage("probs", too_many)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("probs needs") && err.contains(&limit.to_string()),
        "{err}"
    );
    // The same through the ops: logits of one more value than a binding can hold.
    let err = ops
        .upload_floats(&vec![0.0f32; too_many])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs") && err.contains("split the batch"),
        "{err}"
    );
}

#[test]
fn batched_async_reads_match_the_blocking_reads_and_report_non_finite_inputs() {
    use dtopp::ops::{Normalization, RouteShape};
    let Some(ops) = wgpu_or_skip() else { return };
    // Three selections of odd sizes read back through one mapping.
    let mut arrays = Vec::new();
    for (tokens, experts) in [(1, 3), (37, 64), (5, 129)] {
        let shape = RouteShape::new(tokens, experts).unwrap();
        let logits: Vec<f32> = (0..tokens * experts)
            .map(|i| ((i * 7919) % 23) as f32 * 0.3 - 3.0)
            .collect();
        let probs = ops
            .drn_forward(
                &ops.upload_floats(&logits).unwrap(),
                shape,
                Normalization::Softmax,
            )
            .unwrap();
        arrays.push(ops.top_k(&probs, shape, 2.min(experts)).unwrap().counts);
        let p = ops.upload_floats(&[0.7]).unwrap();
        arrays.push(ops.top_p(&probs, shape, &p, None).unwrap().counts);
    }
    let refs: Vec<_> = arrays.iter().collect();
    let batched = pollster_block_on(ops.read_ints_async(&refs)).unwrap();
    for (array, got) in arrays.iter().zip(&batched) {
        assert_eq!(got, &ops.read_ints(array).unwrap());
    }
    // A NaN logit is reported at read-back, naming the token and column.
    let shape = RouteShape::new(4, 8).unwrap();
    let mut logits = vec![0.5f32; 32];
    logits[2 * 8 + 5] = f32::NAN;
    let probs = ops
        .drn_forward(
            &ops.upload_floats(&logits).unwrap(),
            shape,
            Normalization::Softmax,
        )
        .unwrap();
    let counts = ops.top_k(&probs, shape, 2).unwrap().counts;
    let err = pollster_block_on(ops.read_ints_async(&[&counts]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("token 2, column 5"), "{err}");
}

#[test]
fn the_closed_loop_on_the_gpu_tracks_like_the_cpu_reference() {
    use dtopp::controller::{ControllerConfig, ThresholdScope};
    use dtopp::cpu::CpuReference;
    use dtopp::ops::Normalization;
    use dtopp::sim::{SimConfig, SimMode, StreamConfig, run_simulation};
    let Some(ops) = wgpu_or_skip() else { return };
    let config = SimConfig {
        stream: StreamConfig {
            layers: 3,
            tokens: 200,
            experts: 48,
            seed: 9,
            margin: 3.0,
            noise: 1.0,
            drift: 1.0,
            horizon: 60,
            shock: None,
        },
        mode: SimMode::Dtopp,
        steps: 60,
        controller: ControllerConfig::new(6.0, 48),
        scope: ThresholdScope::Global,
        threshold: None,
        normalization: Normalization::Drn { theta: 1.0 },
        k_max: None,
        target_change: Some((30, 10.0)),
    };
    let mut cpu = Vec::new();
    run_simulation(&CpuReference, &config, |r| {
        cpu.push(r.active_experts);
        Ok(())
    })
    .unwrap();
    let mut gpu = Vec::new();
    let outcome = run_simulation(&ops, &config, |r| {
        gpu.push(r.active_experts);
        Ok(())
    })
    .unwrap();
    // Same logits, probabilities equal to float rounding: only tokens within rounding of
    // the threshold can differ, so the per-step means agree closely.
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 0.05, "largest per-step a_t difference {worst}");
    assert!(
        outcome.tracking.settled_at.is_some(),
        "{:?}",
        outcome.tracking
    );
}

fn pollster_block_on<F: Future>(future: F) -> F::Output {
    // The read-back future completes once the device is polled, which it does itself on
    // native: a no-op waker suffices.
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
