//! `dtopp eval` and `dtopp generate` on runs trained by `dtopp train`, as a user runs them:
//! compute chosen at inference, the KV cache against the full window, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dtopp_tests::dtopp_binary;
use serde_json::Value;

fn dtopp(args: &[&str]) -> Output {
    Command::new(dtopp_binary())
        .args(args)
        .output()
        .expect("dtopp runs")
}

fn ok(args: &[&str]) -> (String, String) {
    let out = dtopp(args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "dtopp {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

fn fails(args: &[&str], says: &str) {
    let out = dtopp(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dtopp {args:?} should fail");
    assert!(
        stderr.contains(says),
        "dtopp {args:?}: expected {says:?} in\n{stderr}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(dir: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "train",
        "--preset",
        "tiny",
        "--steps",
        "15",
        "--quiet",
        "--out",
        s(dir),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    dir.to_path_buf()
}

#[test]
fn eval_sweeps_compute_and_generate_decodes_with_a_kv_cache() {
    let root = std::env::temp_dir().join(format!("dtopp-inference-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dtopp_run = train(&root.join("dtopp"), &[]);
    let topk_run = train(&root.join("topk"), &["--mode", "topk", "--target", "2"]);

    // One sweep over both runs: eval.json in each, one plot with both curves.
    let plot = root.join("compare.png");
    let (table, _) = ok(&[
        "eval",
        s(&dtopp_run),
        s(&topk_run),
        "--target",
        "1",
        "3",
        "--batches",
        "2",
        "--calibration-batches",
        "2",
        "--plot",
        s(&plot),
    ]);
    assert!(
        table.contains("T' = 3") && table.contains("trained"),
        "{table}"
    );
    assert_eq!(&std::fs::read(&plot).unwrap()[..4], b"\x89PNG");
    let report = |run: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap()
    };
    let dtopp_report = report(&dtopp_run);
    assert_eq!(dtopp_report["mode"], "dtopp");
    let points = dtopp_report["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "{dtopp_report}");
    assert_eq!(points[0]["setting"], "trained");
    for (point, target) in points[1..].iter().zip([1.0, 3.0]) {
        let calibrated = point["calibration_active"].as_f64().unwrap();
        assert!((calibrated - target).abs() <= 0.01 * target, "{point}");
        // The evaluated tokens are not the calibration slice: a_t follows within sampling.
        let active = point["active"].as_f64().unwrap();
        assert!((active - target).abs() <= 0.15 * target, "{point}");
        assert!(point["loss"].as_f64().unwrap().is_finite());
    }
    // Fewer experts cost fewer FLOPs.
    assert!(points[1]["flops_per_token"].as_f64() < points[2]["flops_per_token"].as_f64());
    let topk_points = report(&topk_run)["points"].clone();
    assert_eq!(topk_points[0]["compute"]["top_k"], 2);
    assert_eq!(topk_points[2]["compute"]["top_k"], 3);
    assert_eq!(topk_points[2]["active"], 3.0);

    // Greedy decoding gives the same tokens and experts with the KV cache as with the
    // whole window run again (20 new tokens stay inside seq_len = 64).
    let generate = |extra: &[&str]| -> Value {
        let mut args = vec![
            "generate",
            s(&dtopp_run),
            "--prompt-tokens",
            "5,17,33,2",
            "--tokens",
            "20",
            "--temperature",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args).0).unwrap()
    };
    let cached = generate(&[]);
    let full = generate(&["--no-cache"]);
    assert_eq!(cached["kv_cache"], true);
    assert_eq!(full["kv_cache"], false);
    let tokens = cached["tokens"].as_array().unwrap();
    let full_tokens = full["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), full_tokens.len());
    for (a, b) in tokens.iter().zip(full_tokens) {
        assert_eq!((&a["token"], &a["experts"]), (&b["token"], &b["experts"]));
        // The probabilities agree to f32 rounding (the sums run in another order).
        let probs = |t: &Value| -> Vec<f64> {
            t["probs"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|l| l.as_array().unwrap().iter().map(|p| p.as_f64().unwrap()))
                .collect()
        };
        for (x, y) in probs(a).iter().zip(probs(b)) {
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
    }
    assert_eq!(tokens.len(), 24);
    assert!(
        tokens
            .iter()
            .all(|t| t["experts"].as_array().unwrap().len() == 2)
    );
    // A lower target routes the same text to fewer experts.
    let lean = generate(&["--target", "1"]);
    let mean = |doc: &Value| -> f64 {
        let t = doc["tokens"].as_array().unwrap();
        t.iter()
            .flat_map(|t| t["experts"].as_array().unwrap().iter())
            .map(|l| l.as_array().unwrap().len() as f64)
            .sum::<f64>()
            / t.len() as f64
    };
    assert!(
        mean(&lean) < mean(&cached),
        "{} vs {}",
        mean(&lean),
        mean(&cached)
    );

    // Coloured text with a legend; past seq_len the cache restarts instead of failing.
    let (coloured, log) = ok(&[
        "generate",
        s(&dtopp_run),
        "--prompt",
        "hello",
        "--tokens",
        "100",
        "--show-experts",
    ]);
    assert!(coloured.contains("\x1b[38;2;"), "{coloured}");
    assert!(
        log.contains("experts per token") && log.contains("cache restarts"),
        "{log}"
    );

    // Bad input, each named.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails(&["eval", s(&empty)], "config.toml");
    std::fs::copy(dtopp_run.join("config.toml"), empty.join("config.toml")).unwrap();
    fails(&["eval", s(&empty)], "no checkpoint");
    let reshaped = root.join("reshaped");
    std::fs::create_dir_all(reshaped.join("checkpoints")).unwrap();
    let config = std::fs::read_to_string(dtopp_run.join("config.toml")).unwrap();
    assert!(config.contains("d_model = 64"));
    std::fs::write(
        reshaped.join("config.toml"),
        config.replace("d_model = 64", "d_model = 32"),
    )
    .unwrap();
    for entry in std::fs::read_dir(dtopp_run.join("checkpoints")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            reshaped.join("checkpoints").join(entry.file_name()),
        )
        .unwrap();
    }
    fails(&["eval", s(&reshaped)], "differs from config.toml");
    fails(&["eval", s(&dtopp_run), "--target", "0.5"], "[1, 16]");
    fails(&["eval", s(&dtopp_run), "--target", "17"], "[1, 16]");
    fails(&["eval", s(&topk_run), "--threshold", "0.5"], "Top-k");
    fails(&["eval", s(&topk_run), "--target", "2.5"], "whole number");
    fails(
        &["generate", s(&dtopp_run), "--prompt-tokens", "1,300"],
        "vocabulary, 0..256",
    );
    fails(
        &["generate", s(&dtopp_run), "--prompt", ""],
        "at least one token",
    );
    fails(
        &[
            "generate",
            s(&dtopp_run),
            "--prompt",
            "x",
            "--threshold",
            "1.5",
        ],
        "(0, 1]",
    );
    std::fs::remove_dir_all(&root).unwrap();
}
