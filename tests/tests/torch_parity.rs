//! PyTorch runs a `dtopp export` with the same loss and routing as `dtopp eval`: a tiny
//! run trained here, exported, and evaluated on the same validation batches by
//! `python/dtopp_torch.py` (torch + safetensors). Needs python3 with torch, safetensors
//! and numpy (about 4.2 GB with torch's CUDA libraries, which CI does not install): without
//! them it prints SKIPPED and why, and `DTOPP_REQUIRE_TORCH=1` makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use dtopp::infer::TrainedRun;
use dtopp::io::NpyArray;
use dtopp::model::Precision;
use dtopp_tests::dtopp_binary;
use serde_json::Value;

/// The loss PyTorch and dtopp must agree to (f32 sums in another order).
const LOSS_TOL: f64 = 1e-4;

fn torch_available() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import torch, numpy, safetensors.torch"])
        .output();
    let why = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string(),
        Err(e) => format!("no python3: {e}"),
    };
    assert!(
        std::env::var("DTOPP_REQUIRE_TORCH").as_deref() != Ok("1"),
        "DTOPP_REQUIRE_TORCH=1 but python3 cannot import torch, safetensors and numpy: {why}"
    );
    println!(
        "SKIPPED the PyTorch parity test: python3 cannot import torch, safetensors and numpy ({why}); `pip install torch safetensors numpy` runs it"
    );
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(dtopp_binary()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dtopp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn parity(dir: &Path, mode: &[&str]) {
    let run_dir: PathBuf = dir.join("run");
    let mut train = vec![
        "train",
        "--preset",
        "tiny",
        "--steps",
        "20",
        "--quiet",
        "--out",
        s(&run_dir),
    ];
    train.extend_from_slice(mode);
    run(&train);
    let export = dir.join("tiny.safetensors");
    run(&["export", s(&run_dir), "--safetensors", s(&export)]);

    // dtopp eval's loss at the trained compute, on its default batches.
    let reports: Value = serde_json::from_str(&run(&["eval", s(&run_dir), "--json"])).unwrap();
    let dtopp_loss = reports[0]["points"][0]["loss"].as_f64().unwrap();

    // The same batches, and every token's expert count per layer, through the library.
    let trained = TrainedRun::<NdArray>::load(&run_dir, &Default::default()).unwrap();
    let corpus = trained.corpus(None).unwrap();
    let batches = trained
        .validation_batches(&corpus, 0, trained.config.run.eval_batches)
        .unwrap();
    let plan = trained.plan(&trained.trained_compute());
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut counts: Vec<Vec<i64>> = vec![Vec::new(); trained.moe_layers()];
    for batch in &batches {
        inputs.extend(batch.inputs.iter().map(|&t| t as i32));
        targets.extend(batch.targets.iter().map(|&t| t as i32));
        let tokens = Tensor::<NdArray, 2, Int>::from_data(
            TensorData::new(batch.inputs.clone(), [batch.batch, batch.seq_len]),
            &Default::default(),
        );
        let out = trained
            .model
            .forward(tokens, &plan, Precision::F32)
            .unwrap();
        for (all, layer) in counts.iter_mut().zip(&out.moe) {
            all.extend(
                layer
                    .routing
                    .counts()
                    .unwrap()
                    .iter()
                    .map(|&k| i64::from(k)),
            );
        }
    }
    let rows = batches.len() * batches[0].batch;
    let seq = batches[0].seq_len;
    let write = |name: &str, values: Vec<i32>| {
        let path = dir.join(name);
        std::fs::write(&path, NpyArray::i32(vec![rows, seq], values).to_bytes()).unwrap();
        path
    };
    let (inputs, targets) = (write("inputs.npy", inputs), write("targets.npy", targets));

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/dtopp_torch.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(export.with_extension("json"))
        .args(["--inputs", s(&inputs), "--targets", s(&targets)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let torch: Value = serde_json::from_slice(&out.stdout).unwrap();
    let torch_loss = torch["loss"].as_f64().unwrap();

    let (mut mismatched, mut excused, mut tokens) = (0, 0, 0);
    for (l, ours) in counts.iter().enumerate() {
        let theirs = torch["counts"][l].as_array().unwrap();
        let near = torch["near_threshold"][l].as_array().unwrap();
        assert_eq!(theirs.len(), ours.len());
        for (i, k) in ours.iter().enumerate() {
            tokens += 1;
            if theirs[i].as_i64() != Some(*k) {
                if near[i].as_bool() == Some(true) {
                    excused += 1;
                } else {
                    mismatched += 1;
                }
            }
        }
    }
    println!(
        "PyTorch {} {mode:?}: loss {torch_loss:.7} vs dtopp eval {dtopp_loss:.7} (|diff| {:.2e}); expert counts: {tokens} token-layers, {mismatched} differ, {excused} within 1e-5 of the threshold excused",
        torch["torch"],
        (torch_loss - dtopp_loss).abs()
    );
    assert!(
        (torch_loss - dtopp_loss).abs() <= LOSS_TOL,
        "loss {torch_loss} vs {dtopp_loss}"
    );
    assert_eq!(
        mismatched, 0,
        "expert counts differ away from the threshold"
    );
}

#[test]
fn pytorch_gives_dtopp_evals_loss_and_expert_counts() {
    if !torch_available() {
        return;
    }
    let root = std::env::temp_dir().join(format!("dtopp-torch-parity-{}", std::process::id()));
    for (name, mode) in [
        ("dtopp", &[][..]),
        ("topk", &["--mode", "topk", "--target", "2"][..]),
    ] {
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        parity(&dir, mode);
    }
    std::fs::remove_dir_all(&root).unwrap();
}
