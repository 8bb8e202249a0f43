//! The app driven headless through egui_kittest, rendered by wgpu (lavapipe in CI):
//! replaying the fixture runs (`tests/fixtures`, written by `dtopp train`), malformed
//! and growing files, an unreadable directory, the simulator and live training. One
//! snapshot image per view is compared against `tests/snapshots/`.
//!
//! Without a wgpu adapter the rendering tests print why they skip;
//! `DTOPP_REQUIRE_WGPU=1` makes that a failure (CI sets it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dtopp_desktop::sources::SourceKind;
use dtopp_desktop::views::View;
use dtopp_desktop::{DesktopApp, StartOptions};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

const SIZE: [f32; 2] = [1280.0, 820.0];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn harness(app: DesktopApp, render: bool) -> Harness<'static, DesktopApp> {
    let builder = Harness::builder().with_size(SIZE).with_max_steps(20);
    let builder = if render { builder.wgpu() } else { builder };
    builder.build_eframe(move |_| app)
}

/// Whether a wgpu adapter exists to render snapshots with.
fn can_render(test: &str) -> bool {
    match dtopp::backends::WgpuOps::new() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("DTOPP_REQUIRE_WGPU").as_deref() != Ok("1"),
                "{test}: no wgpu adapter ({e}), and DTOPP_REQUIRE_WGPU=1"
            );
            println!("SKIPPED {test}: no wgpu adapter to render with ({e})");
            false
        }
    }
}

fn replay_app(dirs: Vec<PathBuf>) -> DesktopApp {
    DesktopApp::with_settings(
        dtopp_desktop::settings::Settings {
            hide_frame_rate: true,
            ..Default::default()
        },
        StartOptions {
            replay_dirs: dirs,
            ..Default::default()
        },
    )
}

#[test]
fn replaying_a_run_draws_every_step_in_the_controller_plot() {
    let dir = fixture("tiny-dtopp");
    let mut h = harness(replay_app(vec![dir.clone()]), false);
    h.run_steps(3);
    let steps = metrics_lines(&dir);
    assert!(steps >= 30, "fixture has {steps} steps");
    assert_eq!(h.state().controller_points(), steps);
    h.get_by_label(&format!("{steps} steps"));
    h.get_by_label_contains("at step");
    assert!(
        h.state().messages().is_empty(),
        "{:?}",
        h.state().messages()
    );
}

#[test]
fn every_view_renders_a_snapshot() {
    if !can_render("every_view_renders_a_snapshot") {
        return;
    }
    let app = replay_app(vec![fixture("tiny-dtopp"), fixture("tiny-topp")]);
    let mut h = harness(app, true);
    let mut results = egui_kittest::SnapshotResults::new();
    // Inference draws a trained run, not the replayed ones: its own test below.
    for view in View::ALL.into_iter().filter(|&v| v != View::Inference) {
        h.state_mut().settings_mut().view = view;
        h.run_steps(3);
        results.add(h.try_snapshot(format!("view-{}", view.label().to_lowercase())));
    }
    results.unwrap();
}

#[test]
fn malformed_and_partial_lines_are_reported_not_fatal() {
    let dir = std::env::temp_dir().join(format!("dtopp-desktop-malformed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let source = fixture("tiny-dtopp");
    let text = std::fs::read_to_string(source.join("metrics.jsonl")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.pop().unwrap();
    let (head, tail) = last.split_at(last.len() / 2);
    let mut body = String::new();
    for (i, line) in lines.iter().enumerate() {
        body.push_str(line);
        body.push('\n');
        if i == 3 {
            body.push_str("{\"step\": oops}\n");
        }
    }
    // The writer is mid-line: half of the last record, no newline yet.
    body.push_str(head);
    std::fs::write(dir.join("metrics.jsonl"), &body).unwrap();

    let mut h = harness(replay_app(vec![dir.clone()]), false);
    h.run_steps(2);
    assert_eq!(h.state().controller_points(), lines.len());
    h.get_by_label_contains("line 5: not a metrics record");

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .unwrap();
    writeln!(f, "{tail}").unwrap();
    drop(f);
    std::thread::sleep(dtopp_desktop::sources::replay::POLL_INTERVAL + Duration::from_millis(50));
    h.run_steps(2);
    assert_eq!(h.state().controller_points(), lines.len() + 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreadable_run_directory_is_a_message() {
    let missing = std::env::temp_dir().join("dtopp-desktop-no-such-run");
    let mut h = harness(replay_app(vec![missing]), false);
    h.run_steps(2);
    h.get_by_label_contains("cannot open run directory");
    assert!(h.state().replays().is_empty());
}

#[test]
fn the_simulator_runs_three_modes_side_by_side() {
    let mut app = DesktopApp::with_settings(Default::default(), StartOptions::default());
    app.settings_mut().source = SourceKind::Simulator;
    app.settings_mut().sim.tokens = 128;
    app.settings_mut().sim.steps_per_second = 500.0;
    let mut h = harness(app, false);
    let start = Instant::now();
    while h.state().simulator().map_or(0, |s| s.runs[0].steps.len()) < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the simulator did not advance"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    let sim = h.state().simulator().unwrap();
    let modes: Vec<&str> = sim.runs.iter().map(|r| r.mode.as_str()).collect();
    assert_eq!(modes, ["dtopp", "topp", "topk"]);
    assert!(h.state().controller_points() > 0);
}

#[test]
fn the_simulator_routes_on_the_gpu_when_asked_and_says_so() {
    if !can_render("the_simulator_routes_on_the_gpu_when_asked_and_says_so") {
        return;
    }
    let run = |gpu: bool| {
        let mut app = DesktopApp::with_settings(Default::default(), StartOptions::default());
        let s = app.settings_mut();
        s.source = SourceKind::Simulator;
        s.sim.tokens = 128;
        s.sim.gpu = gpu;
        app.sync_simulator();
        let sim = app.simulator_mut().unwrap();
        for _ in 0..40 {
            sim.step().unwrap();
        }
        let backend = sim.last_backend;
        let active: Vec<Vec<f64>> = sim
            .runs
            .iter()
            .map(|r| r.steps.iter().map(|p| p.active).collect())
            .collect();
        (backend, app.sim_routing_label(), active)
    };
    let (cpu_backend, cpu_label, cpu) = run(false);
    let (gpu_backend, gpu_label, gpu) = run(true);
    assert_eq!(cpu_backend, Some("cpu"));
    assert_eq!(cpu_label, "CPU reference");
    assert_eq!(gpu_backend, Some("gpu"), "{gpu_label}");
    assert!(gpu_label.starts_with("GPU: "), "{gpu_label}");
    // Top-k counts are exact; the Top-p modes differ only where a token sits within
    // float rounding of the threshold.
    assert_eq!(cpu[2], gpu[2]);
    for mode in 0..2 {
        let worst = cpu[mode]
            .iter()
            .zip(&gpu[mode])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 0.05, "mode {mode}: a_t differs by {worst}");
    }
}

#[test]
fn live_training_advances_and_takes_a_new_target() {
    let app = DesktopApp::with_settings(
        Default::default(),
        StartOptions {
            live: true,
            ..Default::default()
        },
    );
    let mut h = harness(app, false);
    let steps = |h: &Harness<'_, DesktopApp>| h.state().live().map_or(0, |l| l.run.steps.len());
    let start = Instant::now();
    while steps(&h) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "live training made {} steps in 300 s; problems: {:?}",
            steps(&h),
            h.state().live().map(|l| l.problems.clone())
        );
        h.step();
        std::thread::sleep(Duration::from_millis(50));
    }
    let live = h.state().live().unwrap();
    assert!(live.problems.is_empty(), "{:?}", live.problems);
    assert!(!live.description.is_empty());
    assert!(live.run.steps.iter().all(|s| s.threshold.is_some()));
    assert!(h.state().controller_points() >= 1);
    // A new target reaches the worker between steps.
    h.state_mut().settings_mut().live.target = 6.0;
    let before = steps(&h);
    let start = Instant::now();
    while !h
        .state()
        .live()
        .is_some_and(|l| l.run.steps[before..].iter().any(|s| s.target == 6.0))
    {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "T = 6 never arrived"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(50));
    }
    h.get_by_label("⏸ Pause").click();
    h.run_steps(2);
    assert!(!h.state().live().unwrap().running);
}

/// A tiny run trained here for a few steps (the fixtures hold no checkpoint), with an
/// `eval.json` for the view's plot. Always the same path, so snapshots show the same text.
#[cfg(feature = "live")]
fn trained_run() -> PathBuf {
    use burn::backend::{Autodiff, NdArray};
    use dtopp::infer::{SweepRequest, TrainedRun, evaluate_sweep};
    use dtopp::model::ExpertLayout;
    use dtopp::train::{Preset, TrainOptions, train};

    let dir = std::env::temp_dir().join("dtopp-desktop-inference-run");
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = Preset::Tiny.config();
    config.run.steps = 20;
    let options = TrainOptions {
        out: &dir,
        progress: false,
        backend_name: "ndarray",
        label: "",
    };
    train::<Autodiff<NdArray>>(&config, &Default::default(), ExpertLayout::Exact, &options)
        .unwrap();
    let run = TrainedRun::<NdArray>::load(&dir, &Default::default()).unwrap();
    let corpus = run.corpus(None).unwrap();
    let batches = run.validation_batches(&corpus, 0, 1).unwrap();
    let calibration = run.validation_batches(&corpus, 1, 1).unwrap();
    let request = SweepRequest {
        targets: vec![1.0, 2.0, 6.0],
        thresholds: Vec::new(),
    };
    let report = evaluate_sweep(
        &run,
        &batches,
        &calibration,
        &request,
        "synthetic".into(),
        |_| {},
    )
    .unwrap();
    std::fs::write(
        dir.join("eval.json"),
        serde_json::to_string(&report).unwrap(),
    )
    .unwrap();
    dir
}

#[cfg(feature = "live")]
#[test]
fn inference_generates_from_a_trained_run_and_regenerates_at_a_new_target() {
    let dir = trained_run();
    let render =
        can_render("inference_generates_from_a_trained_run_and_regenerates_at_a_new_target");
    let mut app = replay_app(Vec::new());
    app.settings_mut().view = View::Inference;
    app.inference_mut().open(&dir);
    let mut h = harness(app, render);
    let wait = |h: &mut Harness<'_, DesktopApp>, what: &str| {
        let start = Instant::now();
        loop {
            h.step();
            let panel = h.state_mut().inference_mut();
            let source = panel.source().unwrap();
            assert!(source.load_error.is_none(), "{:?}", source.load_error);
            if source.pending == 0 && source.latest.is_some() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{what}: no generation in 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(&mut h, "trained compute");
    let latest = |h: &mut Harness<'_, DesktopApp>| {
        h.state_mut()
            .inference_mut()
            .source()
            .unwrap()
            .latest
            .clone()
            .unwrap()
            .unwrap()
    };
    let trained = latest(&mut h);
    assert_eq!(trained.sample.tokens.len(), trained.prompt_tokens + 120);
    assert_eq!(trained.sample.experts.len(), 2);
    h.run_steps(2);
    h.get_by_label_contains("experts per generated token");
    h.get_by_label_contains("loss against compute");
    if render {
        h.snapshot("view-inference");
    }
    // T' = 1 through the slider's setting: one expert for every token.
    {
        let panel = h.state_mut().inference_mut();
        panel.use_target = true;
        panel.target = 1.0;
        panel.generate();
    }
    wait(&mut h, "T' = 1");
    let lean = latest(&mut h);
    assert!(lean.compute.starts_with("p = "), "{}", lean.compute);
    assert!(
        lean.active < trained.active,
        "{} vs {}",
        lean.active,
        trained.active
    );
    assert!((lean.active - 1.0).abs() < 0.1, "{}", lean.active);
}

#[cfg(feature = "live")]
#[test]
fn inference_on_a_directory_without_a_checkpoint_is_a_message() {
    let mut app = replay_app(Vec::new());
    app.settings_mut().view = View::Inference;
    app.inference_mut().open(&fixture("tiny-dtopp"));
    let mut h = harness(app, false);
    let start = Instant::now();
    while h
        .state_mut()
        .inference_mut()
        .source()
        .unwrap()
        .load_error
        .is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no error reported"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(2);
    h.get_by_label_contains("no checkpoint");
}
