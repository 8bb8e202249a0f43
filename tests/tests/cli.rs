//! End-to-end tests of the `dtopp` program: it runs as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dtopp::cpu::CpuReference;
use dtopp::cpu_fast::CpuFast;
use dtopp::io::{NpyArray, NpyData, read_npz};
use dtopp::ops::{Normalization, RouteShape, RoutingOps};
use dtopp::rng::SplitMix64;
use dtopp_tests::dtopp_binary;

fn dtopp(args: &[&str]) -> Output {
    Command::new(dtopp_binary())
        .args(args)
        .output()
        .expect("dtopp runs")
}

/// A per-test directory under the temp dir, removed when the test passes (kept for a
/// look when it fails).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("dtopp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn random_logits(n: usize, e: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n * e).map(|_| rng.normal() as f32 * 2.0).collect()
}

fn write_npy(path: &Path, array: &NpyArray) {
    std::fs::write(path, array.to_bytes()).unwrap();
}

#[test]
fn simulate_writes_metrics_and_prints_a_summary() {
    let dir = scratch("simulate");
    let run = dir.join("run");
    for mode in ["dtopp", "topp", "topk"] {
        let out = dtopp(&[
            "simulate",
            "--mode",
            mode,
            "--experts",
            "16",
            "--target",
            "3",
            "--layers",
            "2",
            "--tokens",
            "64",
            "--steps",
            "40",
            "--out",
            run.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stdout.contains(&format!("summary ({mode}, E=16, T=3)")),
            "{stdout}"
        );
        assert!(stderr.contains("step     40/40"), "{stderr}");
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 40);
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["step"], i);
            assert_eq!(line["mode"], mode);
            assert_eq!(line["target"], 3.0);
            assert_eq!(
                line["active_experts_per_layer"].as_array().unwrap().len(),
                2
            );
            assert!(line["active_experts"].as_f64().unwrap() >= 1.0);
            assert_eq!(line["threshold"].is_null(), mode == "topk");
            assert_eq!(line["integral"].is_null(), mode != "dtopp");
        }
        assert!(run.join("config.toml").exists() && run.join("summary.json").exists());
    }
}

#[test]
fn route_writes_the_arrays_the_library_computes() {
    // `--backend cpu` (the default) is the fast CPU ops, `cpu-reference` the spec: each
    // writes exactly what its library ops compute.
    route_matches(&CpuFast, "cpu");
    route_matches(&CpuReference, "cpu-reference");
}

fn route_matches<O: RoutingOps<Floats = Vec<f32>, Ints = Vec<i32>>>(cpu: &O, backend: &str) {
    let dir = scratch(&format!("route-{backend}"));
    let (n, e) = (37, 10);
    let logits = random_logits(n, e, 5);
    let input = dir.join("logits.npy");
    write_npy(&input, &NpyArray::f32(vec![n, e], logits.clone()));
    let shape = RouteShape::new(n, e).unwrap();
    let norm = Normalization::Drn { theta: 1.5 };
    let probs = cpu.drn_forward(&logits, shape, norm).unwrap();

    for (mode, extra, selection) in [
        (
            "topp",
            ["--threshold", "0.7"],
            cpu.top_p(&probs, shape, &vec![0.7], None).unwrap(),
        ),
        ("topk", ["--k", "3"], cpu.top_k(&probs, shape, 3).unwrap()),
    ] {
        let out_path = dir.join(format!("{mode}.npz"));
        let out = dtopp(&[
            "route",
            "--logits",
            input.to_str().unwrap(),
            "--mode",
            mode,
            extra[0],
            extra[1],
            "--theta",
            "1.5",
            "--backend",
            backend,
            "--out",
            out_path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{:?}", text(&out));
        let plan = cpu.dispatch_plan(&selection).unwrap();
        let m = plan.route_tokens.len();
        let want: Vec<(&str, NpyArray)> = vec![
            ("probs", NpyArray::f32(vec![n, e], probs.clone())),
            (
                "experts",
                NpyArray::i32(vec![n, e], selection.experts.clone()),
            ),
            ("counts", NpyArray::i32(vec![n], selection.counts.clone())),
            (
                "weights",
                NpyArray::f32(vec![n, e], selection.weights.clone()),
            ),
            (
                "offsets",
                NpyArray::i32(vec![e + 1], plan.expert_offsets.clone()),
            ),
            (
                "route_tokens",
                NpyArray::i32(vec![m], plan.route_tokens.clone()),
            ),
            (
                "route_weights",
                NpyArray::f32(vec![m], plan.route_weights.clone()),
            ),
        ];
        let got = read_npz(&out_path).unwrap();
        assert_eq!(got.len(), want.len());
        for ((gn, ga), (wn, wa)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            assert_eq!(ga, wa, "array {wn} of {mode}");
        }
        if mode == "topk" {
            assert!(matches!(&got[2].1.data, NpyData::I32(c) if c.iter().all(|&k| k == 3)));
        }
    }
}

#[test]
fn bad_input_fails_with_a_clear_message_and_no_output() {
    let dir = scratch("bad");
    let good = dir.join("good.npy");
    write_npy(&good, &NpyArray::f32(vec![4, 6], random_logits(4, 6, 1)));
    let garbage = dir.join("garbage.npy");
    std::fs::write(&garbage, b"this is not numpy").unwrap();
    let truncated = dir.join("truncated.npy");
    let bytes = NpyArray::f32(vec![4, 6], random_logits(4, 6, 1)).to_bytes();
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    let ints = dir.join("ints.npy");
    write_npy(&ints, &NpyArray::i32(vec![2, 3], vec![1; 6]));
    let f64s = dir.join("f64.npy");
    // Same bytes with the dtype declared as float64.
    let mut as_f64 = bytes.clone();
    let at = as_f64.windows(3).position(|w| w == b"<f4").unwrap();
    as_f64[at + 2] = b'8';
    std::fs::write(&f64s, as_f64).unwrap();
    let rank1 = dir.join("rank1.npy");
    write_npy(&rank1, &NpyArray::f32(vec![5], vec![0.0; 5]));
    let nan = dir.join("nan.npy");
    let mut z = random_logits(3, 4, 2);
    z[6] = f32::NAN;
    write_npy(&nan, &NpyArray::f32(vec![3, 4], z));
    let out = dir.join("out.npz");
    let o = out.to_str().unwrap();
    let route = |input: &Path, extra: &[&str]| {
        let mut args = vec!["route", "--logits", input.to_str().unwrap(), "--out", o];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let sim = |extra: &[&str]| {
        let mut args = vec!["simulate", "--steps", "3", "--tokens", "8"];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (route(&garbage, &["--threshold", "0.5"]), "not a .npy file"),
        (route(&truncated, &["--threshold", "0.5"]), "truncated data"),
        (
            route(&ints, &["--threshold", "0.5"]),
            "dtype int32, expected float32",
        ),
        (
            route(&f64s, &["--threshold", "0.5"]),
            "dtype '<f8' is not supported",
        ),
        (route(&rank1, &["--threshold", "0.5"]), "rank 1"),
        (
            route(&nan, &["--threshold", "0.5"]),
            "token 1, column 2 is NaN",
        ),
        (
            route(&dir.join("missing.npy"), &["--threshold", "0.5"]),
            "cannot read",
        ),
        (
            route(&good, &["--threshold", "1.5"]),
            "threshold p = 1.5: a value in (0, 1]",
        ),
        (route(&good, &["--threshold", "0"]), "a value in (0, 1]"),
        (route(&good, &[]), "--threshold P"),
        (route(&good, &["--mode", "topk"]), "--k K"),
        (route(&good, &["--mode", "topk", "--k", "7"]), "k = 7"),
        (
            route(&good, &["--threshold", "0.5", "--k-max", "9"]),
            "k_max = 9",
        ),
        (sim(&["--target", "65"]), "at most E = 64"),
        (sim(&["--target", "0.5"]), "at least 1"),
        (sim(&["--threshold", "1.2"]), "(0, 1]"),
        (sim(&["--kp", "-1"]), "Kp = -1"),
        (sim(&["--ki", "NaN"]), "Ki = NaN"),
        (sim(&["--mode", "topk", "--target", "2.5"]), "whole number"),
        (
            sim(&["--out", "/proc/dtopp-cannot-be-here"]),
            "cannot create run directory",
        ),
    ];
    for (args, needle) in cases {
        let result = Command::new(dtopp_binary()).args(&args).output().unwrap();
        let (_, stderr) = text(&result);
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(needle),
            "{args:?}: stderr {stderr:?} should mention {needle:?}"
        );
        assert!(!out.exists(), "{args:?} left {o} behind");
    }
    // An unwritable output path: the error names it, and no temporary file is left.
    let blocked = dir.join("no-such-dir").join("out.npz");
    let result = dtopp(&[
        "route",
        "--logits",
        good.to_str().unwrap(),
        "--threshold",
        "0.5",
        "--out",
        blocked.to_str().unwrap(),
    ]);
    let (_, stderr) = text(&result);
    assert!(
        !result.status.success() && stderr.contains("cannot write") && stderr.contains("out.npz"),
        "{stderr}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn route_on_wgpu_writes_the_same_arrays_as_on_cpu() {
    if dtopp_tests::wgpu_or_skip().is_none() {
        return;
    }
    let dir = scratch("route-wgpu");
    let (n, e) = (300, 60);
    let input = dir.join("logits.npy");
    write_npy(&input, &NpyArray::f32(vec![n, e], random_logits(n, e, 9)));
    for extra in [["--threshold", "0.6"], ["--k-max", "5"]] {
        let mut outputs = Vec::new();
        for backend in ["cpu", "wgpu"] {
            let out_path = dir.join(format!("{backend}.npz"));
            let mut args = vec![
                "route",
                "--logits",
                input.to_str().unwrap(),
                "--backend",
                backend,
                "--out",
                out_path.to_str().unwrap(),
            ];
            args.extend_from_slice(&extra);
            if extra[0] == "--k-max" {
                args.extend_from_slice(&["--threshold", "0.9"]);
            }
            let out = dtopp(&args);
            let (_, stderr) = text(&out);
            assert!(out.status.success(), "{backend}: {stderr}");
            if backend == "wgpu" {
                assert!(
                    stderr.contains("wgpu adapter:"),
                    "the wgpu backend must say which adapter it uses: {stderr}"
                );
            }
            outputs.push(read_npz(&out_path).unwrap());
        }
        for ((name, cpu), (_, gpu)) in outputs[0].iter().zip(&outputs[1]) {
            assert_eq!(cpu.shape, gpu.shape, "{name}");
            match (&cpu.data, &gpu.data) {
                (NpyData::I32(a), NpyData::I32(b)) => assert_eq!(a, b, "{name} {extra:?}"),
                (NpyData::F32(a), NpyData::F32(b)) => {
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-6 + 1e-4 * x.abs(),
                            "{name}[{i}]: cpu {x}, wgpu {y}"
                        );
                    }
                }
                _ => panic!("{name}: dtypes differ"),
            }
        }
    }
}

#[test]
fn simulate_on_wgpu_tracks_like_the_cpu() {
    if dtopp_tests::wgpu_or_skip().is_none() {
        return;
    }
    let dir = scratch("simulate-wgpu");
    let mut means = Vec::new();
    for backend in ["cpu", "wgpu"] {
        let run = dir.join(backend);
        let out = dtopp(&[
            "simulate",
            "--backend",
            backend,
            "--experts",
            "32",
            "--target",
            "4",
            "--layers",
            "2",
            "--tokens",
            "128",
            "--steps",
            "30",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{:?}", text(&out));
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let a: Vec<f64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["active_experts"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        means.push(a);
    }
    // Same stream, same controller: identical counts but for tokens at the threshold.
    for (step, (c, g)) in means[0].iter().zip(&means[1]).enumerate() {
        assert!((c - g).abs() < 0.02, "step {step}: a_t cpu {c}, wgpu {g}");
    }
}

#[test]
fn train_writes_a_run_directory_and_refuses_bad_input() {
    let dir = scratch("train");
    let config = dir.join("small.toml");
    std::fs::write(
        &config,
        "[run]\nbatch_size = 4\neval_every = 5\nsample_every = 5\nlog_every = 5\n",
    )
    .unwrap();
    let run = dir.join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--config", config.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run_str = run.to_str().unwrap();
    let refs = |a: &[String]| -> Vec<String> { a.to_vec() };
    let call = |a: Vec<String>| dtopp(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let out = call(refs(&args(&["--steps", "10", "--out", run_str])));
    let (_, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("selection and dispatch plan: dtopp fast CPU routing ops"),
        "{err}"
    );
    assert!(err.contains("step 10/10"), "{err}");
    assert!(
        err.contains("memory: about"),
        "the estimate is printed: {err}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 10);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for field in [
        "step",
        "mode",
        "target",
        "threshold",
        "integral",
        "active_experts",
        "active_experts_per_layer",
        "theta_per_layer",
        "k_histogram_per_layer",
        "expert_load_per_layer",
        "loss",
        "val_loss",
        "lr",
        "tokens_per_sec",
    ] {
        assert!(!last[field].is_null(), "{field} missing from {last}");
    }
    assert_eq!(
        last["k_histogram_per_layer"][0].as_array().unwrap().len(),
        16
    );
    let samples = std::fs::read_to_string(run.join("routing_samples.jsonl")).unwrap();
    let sample: serde_json::Value = serde_json::from_str(samples.lines().last().unwrap()).unwrap();
    assert_eq!(sample["step"], 10);
    assert_eq!(
        sample["experts"].as_array().unwrap().len(),
        2,
        "two MoE layers"
    );

    // The run ends with a checkpoint, which `dtopp export` writes as safetensors.
    export_loads_in_numpy(&dir, &run);

    // The same directory again: refused, the first run untouched.
    let again = call(refs(&args(&["--steps", "3", "--out", run_str])));
    assert!(!again.status.success());
    assert!(text(&again).1.contains("already holds metrics.jsonl"));
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        metrics
    );

    let fresh = dir.join("fresh");
    let fresh = fresh.to_str().unwrap();
    for (extra, expected) in [
        (vec!["--target", "20"], "routing.target"),
        (vec!["--mode", "topk", "--target", "2.5"], "whole number"),
        (
            vec!["--data", "/nonexistent/corpus.txt"],
            "/nonexistent/corpus.txt",
        ),
    ] {
        let mut a = args(&extra);
        a.extend(["--out".to_string(), fresh.to_string()]);
        let out = call(a);
        let (_, err) = text(&out);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(err.contains(expected), "{extra:?}: {err}");
    }
    std::fs::write(&config, "[routing]\ntreshold = 0.5\n").unwrap();
    let out = call(args(&["--out", fresh]));
    assert!(text(&out).1.contains("treshold"), "{}", text(&out).1);
    let tiny_text = dir.join("tiny.txt");
    std::fs::write(&tiny_text, "too short").unwrap();
    std::fs::write(&config, "").unwrap();
    let out = call(args(&[
        "--data",
        tiny_text.to_str().unwrap(),
        "--out",
        fresh,
    ]));
    assert!(
        text(&out).1.contains("use a larger file"),
        "{}",
        text(&out).1
    );
}

#[test]
fn train_on_wgpu_follows_the_cpu_run() {
    if dtopp_tests::wgpu_or_skip().is_none() {
        return;
    }
    let dir = scratch("train-wgpu");
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        "[run]\nbatch_size = 4\neval_every = 0\nsample_every = 0\nlog_every = 1\n",
    )
    .unwrap();
    let mut runs = Vec::new();
    // One routing path: the backend's routing ops on the model's tensors (the fast CPU
    // ops on ndarray, the WGSL kernels on burn-wgpu's buffers), with the experts' rows in
    // the backend's default layout (exact on the CPU, grouped on wgpu) or another one.
    for (name, backend, layout, log) in [
        (
            "cpu",
            "cpu",
            None,
            "selection and dispatch plan: dtopp fast CPU routing ops on burn ndarray's host tensors; experts on exact slices",
        ),
        (
            "wgpu",
            "wgpu",
            None,
            "grouped products reading the offsets on the device",
        ),
        (
            "wgpu-padded",
            "wgpu",
            Some("padded"),
            "padded expert rows: ",
        ),
        (
            "wgpu-exact",
            "wgpu",
            Some("exact"),
            "; experts on exact slices",
        ),
    ] {
        let out_dir = dir.join(name);
        let mut args = vec![
            "train",
            "--config",
            config.to_str().unwrap(),
            "--steps",
            "6",
            "--backend",
            backend,
            "--out",
            out_dir.to_str().unwrap(),
        ];
        if let Some(layout) = layout {
            args.extend(["--layout", layout]);
        }
        let out = dtopp(&args);
        let (_, err) = text(&out);
        assert!(out.status.success(), "{name}: {err}");
        assert!(err.contains(log), "{name}: {err}");
        if backend == "wgpu" {
            assert!(
                err.contains(
                    "selection and dispatch plan: dtopp WGSL kernels on burn's wgpu buffers"
                ),
                "{name}: {err}"
            );
        }
        let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        let steps: Vec<serde_json::Value> = metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        runs.push(steps);
    }
    // Same seed, same initial weights and data: the runs differ only by float rounding
    // (and by any token whose probability mass sits on the threshold).
    for (cpu, gpu) in runs[1..].iter().flat_map(|gpu| runs[0].iter().zip(gpu)) {
        let (a, b) = (cpu["loss"].as_f64().unwrap(), gpu["loss"].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-2 + 2e-3 * a.abs(),
            "loss cpu {a} wgpu {b}"
        );
        let (a, b) = (
            cpu["active_experts"].as_f64().unwrap(),
            gpu["active_experts"].as_f64().unwrap(),
        );
        assert!((a - b).abs() <= 0.05, "a_t cpu {a} wgpu {b}");
    }
}

#[test]
fn a_batch_past_the_adapters_loop_limit_trains_on_wgpu_as_on_the_cpu() {
    let Some(ops) = dtopp_tests::wgpu_or_skip() else {
        return;
    };
    // 4500 x 16 = 72,000 tokens, 144,000 routes: more than lavapipe runs loop iterations,
    // where burn's scatters (the gradients of its row gathers) and its reductions along
    // an axis would stop short (the losses came out 9% low). A narrow model keeps three
    // steps of it short on a CPU.
    println!("wgpu adapter: {}", ops.adapter_name());
    let dir = scratch("loop-limit");
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        "[run]\nbatch_size = 4500\neval_every = 0\neval_batches = 1\nsample_every = 0\n\
         log_every = 1\n[model]\nd_model = 16\nlayers = 1\nheads = 2\nseq_len = 16\n\
         experts = 4\nexpert_hidden = 8\n\
         [routing]\nmode = \"topk\"\ntarget = 2.0\n\
         [optimizer]\nwarmup_steps = 0\n",
    )
    .unwrap();
    let mut losses = Vec::new();
    for backend in ["cpu", "wgpu"] {
        let out_dir = dir.join(backend);
        let out = dtopp(&[
            "train",
            "--config",
            config.to_str().unwrap(),
            "--steps",
            "3",
            "--backend",
            backend,
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        let (_, err) = text(&out);
        assert!(out.status.success(), "{backend}: {err}");
        let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
        let steps: Vec<f64> = metrics
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps.len(), 3, "{backend}: {metrics}");
        losses.push(steps);
    }
    println!("losses cpu {:?} wgpu {:?}", losses[0], losses[1]);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!(
            (a - b).abs() <= 1e-3 + 1e-4 * a.abs(),
            "loss cpu {a} wgpu {b}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_it_allocates() {
    // 10^8 experts: the router alone is 25.6 GB; this used to abort in the allocator.
    let dir = scratch("does-not-fit");
    let config = dir.join("c.toml");
    std::fs::write(&config, "[model]\nexperts = 100000000\n").unwrap();
    let out_dir = dir.join("run");
    let out = dtopp(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean error, not a signal: {err}"
    );
    for needle in [
        "does not fit on",
        "parameters",
        "AdamW moments",
        "host memory available",
        "model.experts",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(!out_dir.exists(), "refused before anything is written");
}

#[test]
fn a_tensor_past_the_adapters_largest_binding_is_refused_on_wgpu() {
    let Some(ops) = dtopp_tests::wgpu_or_skip() else {
        return;
    };
    if !ops.adapter_name().contains("llvmpipe") {
        println!(
            "SKIPPED: the 128 MiB binding limit is lavapipe's, not {}'s",
            ops.adapter_name()
        );
        return;
    }
    // 64 experts x 64 x 16384 x 4 bytes = 256 MiB per expert weight, past lavapipe's
    // 128 MiB per storage binding, while the whole run fits in the host's memory.
    let dir = scratch("binding-limit");
    let config = dir.join("c.toml");
    std::fs::write(&config, "[model]\nexperts = 64\nexpert_hidden = 16384\n").unwrap();
    let out_dir = dir.join("run");
    let out = dtopp(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--backend",
        "wgpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("does not fit on")
            && err.contains("max_storage_buffer_binding_size")
            && err.contains("model.expert_hidden"),
        "{err}"
    );
    assert!(!out_dir.exists(), "refused before anything is written");
}

#[test]
fn a_vocabulary_past_the_adapters_loop_limit_is_refused_on_lavapipe() {
    let Some(ops) = dtopp_tests::wgpu_or_skip() else {
        return;
    };
    if !ops.adapter_name().contains("llvmpipe") {
        println!("SKIPPED: {} does not cut shader loops", ops.adapter_name());
        return;
    }
    // The cross-entropy's softmax over 300,000 logits would cover 262,128 of them there.
    let dir = scratch("vocab-limit");
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        "[model]\nvocab = 300000\nd_model = 16\n[data.synthetic]\nvocab = 300000\n",
    )
    .unwrap();
    let out_dir = dir.join("run");
    let out = dtopp(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--backend",
        "wgpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid model.vocab = 300000")
            && err.contains("at most 262128")
            && err.contains("ends shader loops after 65535 iterations"),
        "{err}"
    );
    assert!(!out_dir.exists(), "refused before anything is written");
}

#[test]
fn reproduce_ci_scale_writes_the_report_and_plots() {
    let dir = scratch("reproduce");
    let out = dir.join("repro");
    // Two seeds, two runs at a time: the paired statistics and the parallel runner.
    let run = dtopp(&[
        "reproduce",
        "--scale",
        "ci",
        "--data",
        "synthetic:reasoning",
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (_, err) = text(&run);
    assert!(run.status.success(), "{err}");
    assert!(
        err.contains("10 runs (5 modes x 2 seeds), 2 at a time"),
        "{err}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for mode in ["topk", "topp", "dtopp", "dtopp-no-drn", "drn-only"] {
        assert!(
            report.contains(&format!("| {mode} |")),
            "{mode} row missing"
        );
        for seed in 0..2 {
            assert!(
                out.join("runs")
                    .join(format!("{mode}-seed{seed}"))
                    .join("metrics.jsonl")
                    .exists()
            );
        }
    }
    for section in [
        "| mode | layer 0 | layer 1 |",
        "compose (",
        "| final validation loss |",
        "| validation loss, compose tokens |",
        "(SE, n = 2)",
    ] {
        assert!(
            report.contains(section),
            "{section} missing from the report"
        );
    }
    for claim in [
        "1. **DTop-p locks",
        "2. **Fixed Top-p drifts",
        "3. **DTop-p gives the best loss",
        "5. **Shallow layers",
        "6. **Harder tokens get more experts** (the premise of Top-p routing). Measured with dtopp on synthetic:reasoning",
    ] {
        assert!(report.contains(claim), "{claim} missing from the report");
    }
    for png in [
        "active_experts.png",
        "train_loss.png",
        "val_loss.png",
        "k_per_layer.png",
        "theta.png",
        "experts_by_difficulty.png",
        "experts_by_class.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        assert!(bytes.len() > 10_000, "{png} is only {} bytes", bytes.len());
    }
    let again = dtopp(&["reproduce", "--scale", "ci", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(text(&again).1.contains("already holds runs/"));
    // The report again from the runs on disk: the same numbers, no training.
    std::fs::remove_file(out.join("report.md")).unwrap();
    let rebuilt = |seeds: &str| {
        dtopp(&[
            "reproduce",
            "--scale",
            "ci",
            "--data",
            "synthetic:reasoning",
            "--seeds",
            seeds,
            "--report-only",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let run = rebuilt("2");
    assert!(run.status.success(), "{}", text(&run).1);
    let again = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(again.contains("report rebuilt from runs trained earlier"));
    let claims = |r: &str| r[r.find("## The paper's claims").unwrap()..].to_string();
    assert_eq!(claims(&again), claims(&report));
    let missing = rebuilt("3");
    assert!(!missing.status.success());
    assert!(
        text(&missing).1.contains("topk-seed2"),
        "{}",
        text(&missing).1
    );
}

/// `dtopp export` of a finished run: the weights file follows the safetensors layout, its
/// tensors match the JSON config, and (where Python has numpy and safetensors; required
/// with DTOPP_REQUIRE_SAFETENSORS_PY=1, which CI sets) `safetensors.numpy.load_file`
/// reads every tensor with the documented names and shapes. Bad requests fail clearly.
fn export_loads_in_numpy(dir: &Path, run: &Path) {
    let weights = dir.join("export/tiny.safetensors");
    let out = dtopp(&[
        "export",
        run.to_str().unwrap(),
        "--safetensors",
        weights.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&out);
    assert!(out.status.success(), "{err}");
    assert!(stdout.contains("(step 10)"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("export/tiny.json")).unwrap()).unwrap();
    assert_eq!(config["step"], 10);
    assert!(
        config["policy"]["Controlled"].is_array(),
        "{}",
        config["policy"]
    );
    let tensors = config["tensors"].as_array().unwrap();
    let names: Vec<&str> = tensors
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for expected in ["embed", "head", "final_norm.gamma", "blocks.1.moe.router"] {
        assert!(
            names.iter().any(|n| n.starts_with(expected)),
            "{expected} not among {names:?}"
        );
    }

    // The layout, read back by hand: header length, JSON header, contiguous data.
    let bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut total = 0u64;
    for t in tensors {
        let entry = &header[t["name"].as_str().unwrap()];
        assert_eq!(entry["dtype"], "F32");
        assert_eq!(entry["shape"], t["shape"]);
        let [begin, end] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap());
        let elements: u64 = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product();
        assert_eq!(end - begin, 4 * elements);
        total += end - begin;
    }
    assert_eq!(bytes.len() as u64, 8 + n as u64 + total);

    let script = r#"
import json, sys
import numpy
from safetensors.numpy import load_file
t = load_file(sys.argv[1])
c = json.load(open(sys.argv[2]))
assert sorted(t) == sorted(e["name"] for e in c["tensors"]), "names differ"
for e in c["tensors"]:
    a = t[e["name"]]
    assert list(a.shape) == e["shape"], (e["name"], a.shape)
    assert str(a.dtype) == "float32" and numpy.isfinite(a).all(), e["name"]
print(len(t), sum(a.size for a in t.values()))
"#;
    let py = Command::new("python3")
        .args(["-c", script])
        .arg(&weights)
        .arg(dir.join("export/tiny.json"))
        .output();
    match py {
        Ok(o) if o.status.success() => {
            let printed = String::from_utf8_lossy(&o.stdout);
            assert_eq!(
                printed.split_whitespace().next(),
                Some(&*tensors.len().to_string())
            );
            println!("numpy loaded the export: {printed}");
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let missing = err.contains("No module named");
            if !missing || std::env::var("DTOPP_REQUIRE_SAFETENSORS_PY").as_deref() == Ok("1") {
                panic!("python could not load the export: {err}");
            }
            eprintln!(
                "SKIPPED the numpy load of the export: {}",
                err.lines().last().unwrap_or("")
            );
        }
        Err(e) => {
            assert!(
                std::env::var("DTOPP_REQUIRE_SAFETENSORS_PY").as_deref() != Ok("1"),
                "no python3: {e}"
            );
            eprintln!("SKIPPED the numpy load of the export: no python3 ({e})");
        }
    }

    // A directory without checkpoints, and a weights path that would collide with the
    // config, are refused by name.
    let empty = dir.join("no-run");
    std::fs::create_dir_all(&empty).unwrap();
    let out = dtopp(&[
        "export",
        empty.to_str().unwrap(),
        "--safetensors",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("no-run"), "{}", text(&out).1);
    let out = dtopp(&[
        "export",
        run.to_str().unwrap(),
        "--safetensors",
        dir.join("x.json").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("extension is not .json"),
        "{}",
        text(&out).1
    );
    assert!(!dir.join("x.json").exists());
}

#[test]
fn bench_train_reports_throughput_mfu_and_memory() {
    let dir = scratch("bench-train");
    let config = dir.join("tiny.json");
    let out = dtopp(&[
        "bench",
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-tflops",
        "0.5",
        "--json",
        "--write-config",
        config.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let tokens_per_sec = r["tokens_per_sec"].as_f64().unwrap();
    assert!(tokens_per_sec > 0.0, "{r}");
    assert_eq!(r["tokens_per_step"], 16 * 64);
    assert_eq!(r["steps"], 2);
    let active = r["active_experts"].as_f64().unwrap();
    assert!((1.0..=16.0).contains(&active), "{r}");
    // The FLOP count is the model's, at the measured a_t; MFU is against the given peak.
    let model = dtopp::train::Preset::Tiny.config().model;
    let flops = model.training_flops_per_token(active);
    assert!((r["flops_per_token"].as_f64().unwrap() - flops).abs() < 1e-6 * flops);
    let tflops = flops * tokens_per_sec / 1e12;
    assert!((r["mfu"].as_f64().unwrap() - tflops / 0.5).abs() < 1e-9 + 1e-9 * tflops);
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    // The estimate made before the run is printed beside the measured peak.
    let estimate = r["memory_estimate_bytes"].as_f64().unwrap();
    assert!(estimate > 4.0 * 3.0 * model.parameters() as f64, "{r}");
    assert!(r["last_loss"].as_f64().unwrap().is_finite());
    // The config handed to bench/torch_moe.py is the resolved one.
    let written: dtopp::train::TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(written, dtopp::train::Preset::Tiny.config());
    assert!(r["padded"].is_null(), "{r}");
    assert_eq!(r["layout"], "exact", "the CPU's default layout: {r}");
    // In padded expert buffers the report says how many micro-batches were redone.
    let out = dtopp(&[
        "bench", "train", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--layout",
        "padded", "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["layout"], "padded", "{r}");
    assert_eq!(r["padded"]["micro_batches"], 3, "{r}");
    assert!(r["padded"]["redone"].as_u64().unwrap() <= 2, "{r}");
    // Rows computed per route: at least one, and at most the E/k a full buffer costs.
    let (rows, routes) = (&r["padded"]["buffer_rows"], &r["padded"]["routes"]);
    let per_route = rows.as_f64().unwrap() / routes.as_f64().unwrap();
    assert!((1.0..=16.0).contains(&per_route), "{r}");
    assert!(r["backend"].as_str().unwrap().contains("padded"), "{r}");
    let bad = dtopp(&["bench", "train", "--preset", "tiny", "--steps", "0"]);
    assert!(text(&bad).1.contains("--steps"), "{}", text(&bad).1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `dtopp bench moe` times one MoE layer forward and backward in each layout (ndarray:
/// the grouped and padded layouts through the host offsets), and refuses a bad shape by
/// name.
#[test]
fn bench_moe_times_one_layer_in_every_layout() {
    let shape = [
        "--tokens",
        "37",
        "--hidden",
        "6",
        "--experts",
        "5",
        "--expert-hidden",
        "7",
        "--top-k",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ];
    for layout in ["exact", "grouped", "padded"] {
        let mut args = vec!["bench", "moe", "--backend", "cpu", "--layout", layout];
        args.extend(shape);
        let out = dtopp(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{layout}: {stderr}");
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(result["layout"], layout);
        assert_eq!(result["tokens"], 37);
        assert!(result["median_ms"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["expert_tflops"].as_f64().unwrap() > 0.0, "{result}");
    }
    let out = dtopp(&["bench", "moe", "--experts", "4", "--top-k", "5"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("--top-k"), "{}", text(&out).1);
}
