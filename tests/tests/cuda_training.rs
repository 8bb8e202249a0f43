//! `dtopp train --backend cuda` (burn-cuda for the model; by default the grouped layout,
//! whose selection (`select.cu`) and expert products (`grouped_matmul.cu`) run as dtopp's
//! kernels on burn-cuda's buffers and stream; the padded layout with `--layout padded`, and
//! burn's sliced products on `dispatch.cu`'s plan with `--layout exact`) against the CPU run of the same config,
//! also through the data-parallel path with one device, and with bf16 products (the
//! tensor-core kernels in the grouped layout). Without a GPU: the error names what is
//! missing and no run directory is written (`DTOPP_REQUIRE_GPU=1` makes that a failure).

use std::path::Path;

use dtopp_tests::{cuda_or_skip, dtopp_binary, read_metrics, train_tiny};

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    train_tiny(out, 8, extra)
}

/// As [`train`], with the log (not `--quiet`) and `env` set.
fn train_logged(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let out = out.display().to_string();
    let mut args = vec!["train", "--preset", "tiny", "--steps", "8", "--out", &out];
    args.extend_from_slice(extra);
    std::process::Command::new(dtopp_binary())
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("dtopp runs")
}

#[test]
fn cuda_training_follows_the_cpu_run_or_names_what_is_missing() {
    let root = std::env::temp_dir().join(format!("dtopp-cuda-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    if cuda_or_skip().is_none() {
        for extra in [&["--backend", "cuda"][..], &["--devices", "cuda:0"][..]] {
            let dir = root.join("refused");
            let out = train(&dir, extra);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(err.contains("error: backend cuda:"), "{extra:?}: {err}");
            assert!(!dir.exists(), "{extra:?}: nothing is written");
        }
        std::fs::remove_dir_all(&root).unwrap();
        return;
    }
    let cpu = root.join("cpu");
    assert!(train(&cpu, &[]).status.success());
    let reference = read_metrics(&cpu);
    // Tolerances: another summation order on another device is close, not equal; bf16
    // products (8 mantissa bits) move the loss further.
    // `DTOPP_CUDA_KERNELS=off`: burn tensor ops instead of dtopp's kernels, as before them.
    let off = [("DTOPP_CUDA_KERNELS", "off")];
    for (name, extra, tolerance) in [
        ("cuda", &["--backend", "cuda"][..], (1e-2, 0.1)),
        ("cuda-kernels-off", &["--backend", "cuda"][..], (1e-2, 0.1)),
        (
            "cuda-exact",
            &["--backend", "cuda", "--layout", "exact"][..],
            (1e-2, 0.1),
        ),
        (
            "cuda-exact-bf16",
            &[
                "--backend",
                "cuda",
                "--layout",
                "exact",
                "--precision",
                "bf16",
            ][..],
            (5e-2, 0.3),
        ),
        (
            "cuda-padded",
            &["--backend", "cuda", "--layout", "padded"][..],
            (1e-2, 0.1),
        ),
        ("cuda-dp", &["--devices", "cuda:0"][..], (1e-2, 0.1)),
        (
            "cuda-bf16",
            &["--backend", "cuda", "--precision", "bf16"][..],
            (5e-2, 0.3),
        ),
    ] {
        let dir = root.join(name);
        let env: &[(&str, &str)] = if name == "cuda-kernels-off" {
            &off
        } else {
            &[]
        };
        let out = train_logged(&dir, extra, env);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = String::from_utf8_lossy(&out.stderr);
        if name == "cuda" {
            assert!(
                log.contains("dtopp CUDA kernels")
                    && log.contains("grouped products reading the offsets on the device")
                    && log.contains("dtopp drn.cu kernels on burn-cuda's buffers")
                    && log.contains("dtopp rows.cu kernels on burn-cuda's buffers"),
                "the default CUDA run routes, normalizes and moves rows with dtopp's kernels on burn's buffers: {log}"
            );
        }
        if name == "cuda-kernels-off" {
            assert!(
                log.contains("DTOPP_CUDA_KERNELS=off") && !log.contains("dtopp CUDA kernels"),
                "the switch is logged: {log}"
            );
        }
        let got = read_metrics(&dir);
        assert_eq!(got.len(), reference.len());
        let mut worst = (0.0f64, 0.0f64);
        for (g, r) in got.iter().zip(&reference) {
            worst.0 = worst.0.max((g.loss - r.loss).abs());
            worst.1 = worst.1.max((g.active_experts - r.active_experts).abs());
        }
        println!(
            "{name} vs cpu, 8 steps: max |d loss| {:.2e}, max |d a_t| {:.4}",
            worst.0, worst.1
        );
        assert!(
            worst.0 < tolerance.0 && worst.1 < tolerance.1,
            "{name}: {worst:?}"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
