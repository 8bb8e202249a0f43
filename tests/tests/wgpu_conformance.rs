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
