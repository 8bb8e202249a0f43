//! The WGSL kernels against the CPU reference, on whatever adapter wgpu finds (lavapipe in
//! CI). Without an adapter the test skips and says why, unless DTOPP_REQUIRE_WGPU=1 or
//! DTOPP_REQUIRE_GPU=1, which CI sets so that a missing driver fails the run.

use dtopp::backends::WgpuOps;
use dtopp_tests::{assert_conforms, cases};

fn wgpu_required() -> bool {
    dtopp_tests::gpu_required() || std::env::var("DTOPP_REQUIRE_WGPU").is_ok_and(|v| v == "1")
}

#[test]
fn wgsl_kernels_conform_to_the_cpu_reference() {
    let ops = match WgpuOps::new() {
        Ok(ops) => ops,
        Err(e) if !wgpu_required() => {
            println!("SKIPPED: no wgpu adapter: {e}");
            return;
        }
        Err(e) => panic!("DTOPP_REQUIRE_WGPU/GPU is set but no wgpu adapter is available: {e}"),
    };
    println!("wgpu adapter: {}", ops.adapter_name());
    let started = std::time::Instant::now();
    assert_conforms(&ops, cases(2026));
    println!(
        "wgpu conformance took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn inputs_beyond_the_device_limits_are_refused_by_name() {
    let ops = match WgpuOps::new() {
        Ok(ops) => ops,
        Err(e) if !wgpu_required() => {
            println!("SKIPPED: no wgpu adapter: {e}");
            return;
        }
        Err(e) => panic!("DTOPP_REQUIRE_WGPU/GPU is set but no wgpu adapter is available: {e}"),
    };
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
    let err = dtopp::ops::RoutingOps::upload_floats(&ops, &vec![0.0f32; too_many])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs") && err.contains("split the batch"),
        "{err}"
    );
}
