//! Exact resume through the `dtopp` program: a run killed (SIGKILL at an arbitrary
//! moment, or aborted halfway through writing a checkpoint) and continued with
//! `dtopp train --resume` has the same losses, thresholds and `a_t` at every step as an
//! uninterrupted run; a damaged newest checkpoint is named and the one before it used.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dtopp::metrics::StepMetrics;
use dtopp_tests::{dtopp_binary, read_metrics};

const STEPS: &str = "12";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dtopp-resume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--preset",
        "tiny",
        "--steps",
        STEPS,
        "--checkpoint-every",
        "3",
        "--quiet",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn run(args: &[String], env: Option<(&str, &str)>) -> std::process::Output {
    let mut command = Command::new(dtopp_binary());
    command.args(args);
    if let Some((k, v)) = env {
        command.env(k, v);
    }
    command.output().expect("dtopp runs")
}

/// Every quantity that does not depend on wall time, step by step, bit for bit.
fn assert_same_run(resumed: &[StepMetrics], reference: &[StepMetrics]) {
    assert_eq!(resumed.len(), reference.len(), "steps");
    for (r, e) in resumed.iter().zip(reference) {
        let key = |m: &StepMetrics| {
            (
                m.step,
                m.loss.to_bits(),
                m.ce_loss.to_bits(),
                m.threshold.map(f64::to_bits),
                m.integral.map(f64::to_bits),
                m.active_experts.to_bits(),
                m.val_loss.map(f64::to_bits),
                m.grad_norm.to_bits(),
                m.theta_per_layer
                    .iter()
                    .map(|t| t.to_bits())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(key(r), key(e), "step {}: resumed run differs", e.step);
    }
}

fn resume(dir: &Path) -> std::process::Output {
    run(
        &[
            "train".into(),
            "--resume".into(),
            dir.display().to_string(),
            "--quiet".into(),
        ],
        None,
    )
}

#[test]
fn killed_runs_resume_to_exactly_the_uninterrupted_losses() {
    let root = scratch("exact");
    let reference_dir = root.join("reference");
    let out = run(&train_args(&reference_dir), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = read_metrics(&reference_dir);
    assert_eq!(reference.len(), 12);

    // 1. Aborted halfway through writing the step-9 checkpoint: the half-written
    // temporary file is ignored, the run continues from step 6.
    let aborted = root.join("aborted");
    let out = run(
        &train_args(&aborted),
        Some(("DTOPP_TEST_ABORT_IN_CHECKPOINT", "9")),
    );
    assert!(!out.status.success(), "the abort hook stopped the run");
    let names: Vec<String> = std::fs::read_dir(aborted.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().any(|n| n.contains(".tmp")), "{names:?}");
    assert_eq!(read_metrics(&aborted).len(), 9, "metrics up to the crash");
    let out = resume(&aborted);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_run(&read_metrics(&aborted), &reference);

    // 2. SIGKILL at an arbitrary moment after the first checkpoint.
    let killed = root.join("killed");
    let mut child = Command::new(dtopp_binary())
        .args(train_args(&killed))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !killed.join("checkpoints/step-00000003.ckpt").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let done = read_metrics(&killed).len();
    println!("SIGKILL after {done} of 12 steps ({status})");
    let out = resume(&killed);
    if done == 12 && status.success() {
        // The run finished before the kill: resuming it is refused, by name.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("already taken"), "{err}");
    } else {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_same_run(&read_metrics(&killed), &reference);

    // 3. The newest checkpoint corrupted on disk: named, skipped, the previous one used.
    let damaged = root.join("damaged");
    let out = run(&train_args(&damaged), None);
    assert!(out.status.success());
    let newest = damaged.join("checkpoints/step-00000012.ckpt");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&newest, &bytes).unwrap();
    let out = run(
        &[
            "train".into(),
            "--resume".into(),
            damaged.display().to_string(),
            "--steps".into(),
            "12".into(),
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step-00000012.ckpt") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(out.status.success(), "{err}");
    assert_same_run(&read_metrics(&damaged), &reference);

    // Only the newest checkpoints are kept (keep_checkpoints = 3).
    let kept = std::fs::read_dir(reference_dir.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(kept, 3);
    std::fs::remove_dir_all(&root).unwrap();
}
