//! The CUDA kernels against the CPU reference, on CUDA device 0. Without the `cuda`
//! feature, a driver, NVRTC or a device the tests skip and say why, unless
//! DTOPP_REQUIRE_GPU=1 (set on the GPU machine), which makes that a failure.

use dtopp_tests::{assert_conforms, cases, cuda_or_skip};

#[test]
fn cuda_kernels_conform_to_the_cpu_reference() {
    let Some(ops) = cuda_or_skip() else { return };
    let started = std::time::Instant::now();
    assert_conforms(&ops, cases(2026));
    println!(
        "cuda conformance took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn without_the_backend_the_error_names_what_is_missing() {
    if cuda_or_skip().is_some() {
        return;
    }
    let err = dtopp::backends::CudaOps::new(0).unwrap_err().to_string();
    assert!(
        err.contains("backend cuda")
            && (err.contains("not in this build")
                || err.contains("libcuda")
                || err.contains("libnvrtc")
                || err.contains("no CUDA device")),
        "{err}"
    );
}

#[test]
fn the_cli_names_what_the_cuda_backend_lacks_and_writes_nothing() {
    if cuda_or_skip().is_some() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dtopp-cuda-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(dtopp_tests::dtopp_binary())
        .args(["simulate", "--steps", "3", "--backend", "cuda", "--out"])
        .arg(dir.join("sim"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("error: backend cuda:"), "{err}");
    assert!(!dir.join("sim/metrics.jsonl").exists());
    std::fs::remove_dir_all(&dir).ok();
}
