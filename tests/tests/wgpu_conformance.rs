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
