//! Data-parallel training through the `dtopp` program on CPU "devices" (ranks that
//! share the host, over burn-collective): N ranks with batch B follow one device with
//! batch N*B (losses, p, a_t, validation loss within the tolerances below, step by
//! step); one rank through the data-parallel path equals the plain path; a resumed
//! two-rank run equals an uninterrupted one bit for bit; a failing rank stops the
//! others instead of hanging them; only rank 0 writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dtopp::metrics::StepMetrics;
use dtopp_tests::{
    CPU_DATA_PARALLEL as CPU_TOL, Tolerances, batch_config, dtopp_binary, read_metrics,
};

const STEPS: usize = 16;

/// On a GPU adapter the matrix products of a batch of B and of 2B may sum in different
/// orders (lavapipe measured: as on the CPU), so a few tokens near the threshold may
/// change their count.
const GPU_TOL: Tolerances = Tolerances {
    loss: 1e-4,
    threshold: 1e-4,
    active: 2e-2,
};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dtopp-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dtopp(args: &[&str], env: Option<(&str, &str)>) -> std::process::Output {
    let mut command = Command::new(dtopp_binary());
    command.args(args);
    if let Some((k, v)) = env {
        command.env(k, v);
    }
    command.output().expect("dtopp runs")
}

fn succeeded(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

/// The largest step-by-step differences of the quantities the issue names.
#[derive(Debug, Default)]
struct Deviation {
    loss: f64,
    val_loss: f64,
    threshold: f64,
    active: f64,
}

impl Deviation {
    fn assert_within(&self, tol: &Tolerances) {
        assert!(
            self.loss <= tol.loss && self.val_loss <= tol.loss,
            "losses differ: {self:?}"
        );
        assert!(self.threshold <= tol.threshold, "p differs: {self:?}");
        assert!(self.active <= tol.active, "a_t differs: {self:?}");
    }
}

fn deviation(a: &[StepMetrics], b: &[StepMetrics]) -> Deviation {
    assert_eq!(a.len(), b.len(), "steps");
    let mut d = Deviation::default();
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step);
        assert_eq!(x.tokens, y.tokens, "tokens seen by step {}", x.step);
        d.loss = d
            .loss
            .max((x.loss - y.loss).abs())
            .max((x.ce_loss - y.ce_loss).abs());
        if let (Some(u), Some(v)) = (x.val_loss, y.val_loss) {
            d.val_loss = d.val_loss.max((u - v).abs());
        }
        assert_eq!(x.val_loss.is_some(), y.val_loss.is_some());
        d.threshold = d
            .threshold
            .max((x.threshold.unwrap() - y.threshold.unwrap()).abs());
        d.active = d.active.max((x.active_experts - y.active_experts).abs());
    }
    d
}

fn train(out: &Path, config: &str, steps: usize, extra: &[&str]) -> String {
    let steps = steps.to_string();
    let out = out.display().to_string();
    let mut args = vec![
        "train", "--preset", "tiny", "--config", config, "--steps", &steps, "--quiet", "--out",
        &out,
    ];
    args.extend_from_slice(extra);
    succeeded(&dtopp(&args, None))
}

#[test]
fn two_ranks_of_batch_b_follow_one_device_of_batch_2b() {
    let root = scratch("equivalence");
    let (b8, b16) = (batch_config(&root, 8), batch_config(&root, 16));

    let single = root.join("single");
    let started = Instant::now();
    train(&single, &b16, STEPS, &[]);
    let single_s = started.elapsed().as_secs_f64();

    let two = root.join("two");
    let started = Instant::now();
    let log = train(&two, &b8, STEPS, &["--devices", "cpu:0,cpu:1"]);
    let two_s = started.elapsed().as_secs_f64();
    assert!(
        !log.contains("data parallel"),
        "--quiet prints nothing: {log}"
    );

    let d = deviation(&read_metrics(&two), &read_metrics(&single));
    println!(
        "2 ranks x batch 8 vs 1 device x batch 16, {STEPS} steps: max |d loss| {:.2e}, |d val loss| {:.2e}, |d p| {:.2e}, |d a_t| {:.4} ({two_s:.1} s vs {single_s:.1} s)",
        d.loss, d.val_loss, d.threshold, d.active
    );
    d.assert_within(&CPU_TOL);

    // The run directory is written once, by rank 0, and records the device count.
    let config = std::fs::read_to_string(two.join("config.toml")).unwrap();
    assert!(config.contains("devices = 2"), "{config}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(two.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], STEPS);
    let checkpoints: Vec<_> = std::fs::read_dir(two.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");

    // One device through the data-parallel path is the plain path: the same model
    // trajectory bit for bit (p, a_t, theta, gradient norm); the losses are reported
    // through an f32 all-reduce.
    let one = root.join("one");
    train(&one, &b16, STEPS, &["--devices", "cpu:0"]);
    for (x, y) in read_metrics(&one).iter().zip(&read_metrics(&single)) {
        assert_eq!(x.threshold, y.threshold, "step {}", x.step);
        assert_eq!(x.active_experts, y.active_experts, "step {}", x.step);
        assert_eq!(x.theta_per_layer, y.theta_per_layer, "step {}", x.step);
        assert_eq!(x.grad_norm, y.grad_norm, "step {}", x.step);
        assert!(
            (x.loss - y.loss).abs() <= 1e-6 * y.loss.abs(),
            "step {}",
            x.step
        );
        assert_eq!(x.val_loss, y.val_loss, "step {}", x.step);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_two_rank_run_resumes_exactly_and_only_with_two_devices() {
    let root = scratch("resume");
    let b8 = batch_config(&root, 8);
    let devices = ["--devices", "cpu:0,cpu:1"];
    let reference = root.join("reference");
    train(&reference, &b8, 8, &devices);

    let resumed = root.join("resumed");
    train(&resumed, &b8, 4, &devices);
    let dir = resumed.display().to_string();
    let out = dtopp(
        &[
            "train",
            "--resume",
            &dir,
            "--steps",
            "8",
            "--devices",
            "cpu:0",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--devices") && err.contains("the 2 device(s)"),
        "{err}"
    );
    let args = [
        "train", "--resume", &dir, "--steps", "8", "--quiet", devices[0], devices[1],
    ];
    succeeded(&dtopp(&args, None));
    let (a, b) = (read_metrics(&resumed), read_metrics(&reference));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        let key = |m: &StepMetrics| {
            (
                m.loss.to_bits(),
                m.threshold.map(f64::to_bits),
                m.active_experts.to_bits(),
                m.grad_norm.to_bits(),
                m.val_loss.map(f64::to_bits),
            )
        };
        assert_eq!(key(x), key(y), "step {}", x.step);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_failing_rank_stops_the_others_with_its_error() {
    let root = scratch("failure");
    let b8 = batch_config(&root, 8);
    let out_dir = root.join("run");
    let out = out_dir.display().to_string();
    let started = Instant::now();
    let result = dtopp(
        &[
            "train",
            "--preset",
            "tiny",
            "--config",
            &b8,
            "--steps",
            "8",
            "--quiet",
            "--out",
            &out,
            "--devices",
            "cpu:0,cpu:1,cpu:2",
        ],
        Some(("DTOPP_TEST_FAIL_RANK", "2:3")),
    );
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(
        err.contains("rank 2") && err.contains("DTOPP_TEST_FAIL_RANK"),
        "the failing rank's own error is reported: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(300));
    // Steps 1 and 2 were written by rank 0 before rank 2 failed in step 3.
    assert_eq!(read_metrics(&out_dir).len(), 2);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn two_wgpu_ranks_follow_one_wgpu_device() {
    // Two ranks on the one adapter the machine has (lavapipe in CI): the collective
    // path of a cubecl backend, not the speed-up of two GPUs.
    if dtopp_tests::wgpu_or_skip().is_none() {
        return;
    }
    let root = scratch("wgpu");
    let (b4, b8) = (batch_config(&root, 4), batch_config(&root, 8));
    let (two, single) = (root.join("two"), root.join("single"));
    train(&two, &b4, 4, &["--devices", "wgpu:default,wgpu:default"]);
    train(&single, &b8, 4, &["--backend", "wgpu"]);
    let d = deviation(&read_metrics(&two), &read_metrics(&single));
    println!(
        "wgpu: 2 ranks x batch 4 vs 1 device x batch 8, 4 steps: max |d loss| {:.2e}, |d val loss| {:.2e}, |d p| {:.2e}, |d a_t| {:.4}",
        d.loss, d.val_loss, d.threshold, d.active
    );
    d.assert_within(&GPU_TOL);
    std::fs::remove_dir_all(&root).unwrap();
}
