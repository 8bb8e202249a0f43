//! `--precision`: the large matrix products in f16 on a wgpu adapter with 16-bit float
//! shaders (lavapipe has them) track the f32 run; a precision the backend lacks is
//! refused by name before anything is written (bf16 on wgpu, half types on the CPU).
//! bf16 on CUDA is in cuda_training.rs.

use std::path::Path;

use dtopp_tests::{read_metrics, train_tiny, wgpu_or_skip};

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    train_tiny(out, 4, extra)
}

#[test]
fn half_precision_products_track_the_f32_run_and_missing_dtypes_are_refused() {
    let root = std::env::temp_dir().join(format!("dtopp-precision-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    for (backend, precision, reason) in [
        ("cpu", "f16", "Unsupported dtype"),
        ("cpu", "bf16", "Unsupported dtype"),
        ("wgpu", "bf16", "BF16"),
    ] {
        if backend == "wgpu" && wgpu_or_skip().is_none() {
            continue;
        }
        let dir = root.join(format!("{backend}-{precision}"));
        let out = train(&dir, &["--backend", backend, "--precision", precision]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backend} {precision} ran");
        assert!(
            err.contains(&format!("error: invalid precision = {precision}"))
                && err.contains(reason),
            "{backend} {precision}: {err}"
        );
        assert!(!dir.exists(), "{backend} {precision}: nothing is written");
    }

    if wgpu_or_skip().is_none() {
        return;
    }
    let f32_dir = root.join("wgpu-f32");
    let f16_dir = root.join("wgpu-f16");
    for (dir, precision) in [(&f32_dir, "f32"), (&f16_dir, "f16")] {
        let out = train(dir, &["--backend", "wgpu", "--precision", precision]);
        assert!(
            out.status.success(),
            "{precision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = std::fs::read_to_string(f16_dir.join("config.toml")).unwrap();
    assert!(config.contains("precision = \"f16\""), "{config}");
    let (full, half) = (read_metrics(&f32_dir), read_metrics(&f16_dir));
    assert_eq!(full.len(), half.len());
    let mut worst = (0.0f64, 0.0f64);
    for (h, f) in half.iter().zip(&full) {
        worst.0 = worst.0.max((h.loss - f.loss).abs() / f.loss);
        worst.1 = worst.1.max((h.active_experts - f.active_experts).abs());
    }
    println!(
        "f16 vs f32 products on wgpu, 4 steps: max relative |d loss| {:.2e}, max |d a_t| {:.4}",
        worst.0, worst.1
    );
    // f16 rounds each product to 11 mantissa bits: the runs differ, but only slightly.
    assert!(
        half.iter().zip(&full).any(|(h, f)| h.loss != f.loss),
        "the f16 run equals the f32 run bit for bit: nothing was cast"
    );
    assert!(worst.0 < 1e-3 && worst.1 < 0.05, "{worst:?}");
    std::fs::remove_dir_all(&root).unwrap();
}
