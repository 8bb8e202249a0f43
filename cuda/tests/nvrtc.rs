//! The `.cu` sources compile with NVRTC (no GPU needed), and every kernel the host code
//! launches is in the PTX. Skips, saying why, where NVRTC cannot be loaded (put its lib
//! directory on LD_LIBRARY_PATH); DTOPP_REQUIRE_NVRTC=1 (set by CI, which installs it)
//! makes that a failure.
#![cfg(feature = "cuda")]

use dtopp_cuda::source::MODULES;
use dtopp_cuda::{compiled_modules, nvrtc_present};

/// Whether NVRTC can be loaded; if not, says the test is skipped, or fails where
/// DTOPP_REQUIRE_NVRTC=1 (CI).
fn nvrtc_or_skip() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("DTOPP_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "NVRTC is required (DTOPP_REQUIRE_NVRTC=1) but libnvrtc could not be loaded"
    );
    eprintln!("SKIPPED: libnvrtc could not be loaded (LD_LIBRARY_PATH)");
    false
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !nvrtc_or_skip() {
        return;
    }
    let modules = compiled_modules().unwrap_or_else(|e| panic!("{e}"));
    for ((file, ptx), (_, _, kernels)) in modules.iter().zip(MODULES.iter()) {
        let text = ptx.to_src();
        for k in kernels.iter() {
            assert!(
                text.contains(&format!(".entry {k}(")),
                "{file}: no kernel {k} in the PTX"
            );
        }
        println!("{file}: {} bytes of PTX, kernels {kernels:?}", text.len());
    }
}

#[test]
fn without_a_driver_the_backend_says_what_is_missing() {
    if dtopp_cuda::driver_present() {
        return;
    }
    let err = dtopp_cuda::CudaKernels::new(0).unwrap_err().to_string();
    assert!(err.contains("NVIDIA driver (libcuda)"), "{err}");
}

/// The fused kernels keep each token's row in registers: an array the compiler could not
/// promote (indexed by a run-time value) would show up as a `.local` stack in the PTX.
#[test]
fn fused_routing_kernels_keep_rows_in_registers() {
    if !nvrtc_or_skip() {
        return;
    }
    let modules = compiled_modules().unwrap_or_else(|e| panic!("{e}"));
    let (_, ptx) = modules
        .iter()
        .find(|(file, _)| *file == "route.cu")
        .expect("route.cu is a module");
    let text = ptx.to_src();
    let entries: Vec<&str> = text.split(".entry ").skip(1).collect();
    assert_eq!(entries.len(), 4, "one entry per register width");
    for entry in entries {
        let name = entry.split('(').next().unwrap_or_default();
        assert!(
            !entry.contains(".local"),
            "{name} uses local memory: its row does not stay in registers"
        );
    }
}

/// The grouped products keep their accumulators and fragments in registers: the MMA
/// kernels' 32 accumulators and 16 operand words per thread, the f32 kernels' 16
/// accumulators. A `.local` stack in the PTX would mean the compiler spilled an array
/// it could not index statically.
#[test]
fn grouped_matmul_kernels_use_no_local_memory() {
    if !nvrtc_or_skip() {
        return;
    }
    let modules = compiled_modules().unwrap_or_else(|e| panic!("{e}"));
    let (_, ptx) = modules
        .iter()
        .find(|(file, _)| *file == "grouped_matmul.cu")
        .expect("grouped_matmul.cu is a module");
    let text = ptx.to_src();
    let entries: Vec<&str> = text.split(".entry ").skip(1).collect();
    assert_eq!(
        entries.len(),
        4,
        "f32, bf16, f16 forward and the f32 weight gradient"
    );
    for entry in entries {
        let name = entry.split('(').next().unwrap_or_default();
        assert!(!entry.contains(".local"), "{name} uses local memory");
        if name.contains("bf16") || name.contains("f16") {
            let mmas = entry.matches("mma.sync.aligned.m16n8k16").count();
            assert!(
                mmas >= 8,
                "{name}: {mmas} tensor-core MMAs, want 8 per k step unrolled"
            );
        }
    }
}

/// The kernels dtopp launches through burn-cuda's own client (core's
/// `routing_backend/cuda_launch.rs`) compile as cubecl-cuda 0.10 compiles a kernel's text
/// (`--gpu-architecture=sm_XY[a]` for the device, `-lineinfo`, no other option), and take
/// cubecl's arguments: the buffers as pointers, then the scalar struct by value, as large
/// as the host's copy in `dtopp_cuda::params`.
#[test]
fn kernels_on_burn_buffers_compile_as_cubecl_compiles_them() {
    use dtopp_cuda::{ControllerParams, DrnDims, GroupedDims, PlanDims, RowDims, SelectDims};
    if !nvrtc_or_skip() {
        return;
    }
    // (file, text, [(entry, buffers)], bytes of the scalar struct)
    type Launched = (
        &'static str,
        &'static str,
        &'static [(&'static str, usize)],
        usize,
    );
    let launched: [Launched; 6] = [
        (
            "grouped_matmul.cu",
            dtopp_cuda::source::GROUPED_MATMUL,
            &[
                ("grouped_forward_f32", 4),
                ("grouped_forward_bf16", 4),
                ("grouped_forward_f16", 4),
                ("grouped_weight_grad_f32", 4),
            ],
            size_of::<GroupedDims>(),
        ),
        (
            "select.cu",
            dtopp_cuda::source::SELECT,
            &[("top_p", 6), ("top_k", 5)],
            size_of::<SelectDims>(),
        ),
        (
            "dispatch.cu",
            dtopp_cuda::source::DISPATCH,
            &[("plan_count", 3), ("plan_scan", 3), ("plan_scatter", 7)],
            size_of::<PlanDims>(),
        ),
        (
            "drn.cu",
            dtopp_cuda::source::DRN,
            &[
                ("drn_forward", 4),
                ("drn_backward", 7),
                ("drn_theta_sum", 2),
            ],
            size_of::<DrnDims>(),
        ),
        (
            "rows.cu",
            dtopp_cuda::source::ROWS,
            &[
                ("gather_rows", 3),
                ("sum_rows", 3),
                ("sum_rows_weighted", 4),
                ("row_dots", 3),
            ],
            size_of::<RowDims>(),
        ),
        (
            "controller.cu",
            dtopp_cuda::source::CONTROLLER,
            &[("controller_update", 2)],
            size_of::<ControllerParams>(),
        ),
    ];
    // Ampere (the oldest the kernels accept) and Hopper, as cubecl names them.
    for arch in ["sm_80", "sm_90a"] {
        for (file, source, entries, struct_bytes) in launched {
            let opts = cudarc::nvrtc::CompileOptions {
                options: vec![format!("--gpu-architecture={arch}"), "-lineinfo".into()],
                name: Some(file.into()),
                ..Default::default()
            };
            let ptx =
                cudarc::nvrtc::compile_ptx_with_opts(dtopp_cuda::source::expanded(source), opts)
                    .unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
            let text = ptx.to_src();
            for &(entry, buffers) in entries {
                let head = text
                    .split(&format!(".entry {entry}("))
                    .nth(1)
                    .unwrap_or_else(|| panic!("{file} ({arch}): no kernel {entry}"));
                let params = head.split(')').next().unwrap_or_default();
                let pointers = params.matches(".param .u64").count();
                assert_eq!(pointers, buffers, "{entry} ({arch}): buffers");
                assert!(
                    params.contains(&format!(".b8 {entry}_param_{buffers}[{struct_bytes}]")),
                    "{entry} ({arch}): the scalar struct of {struct_bytes} bytes last: {params}"
                );
                assert_eq!(
                    params.matches(".param").count(),
                    buffers + 1,
                    "{entry} ({arch}): nothing after the struct"
                );
            }
        }
    }
}
