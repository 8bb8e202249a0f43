//! The page's machine-readable state: one JSON object per step, written into
//! `<pre id="dtopp-status">` and returned by `window.dtopp.status()`.

use dtopp::sim::TrackingSummary;
use dtopp_desktop::DesktopApp;
use dtopp_desktop::run_data::{RunData, StepPoint};
use serde_json::{Value, json};

/// The status after the simulator's last finished step (`None` before the first):
/// `step`, `mode` (`dtopp`), `backend` (`gpu_name` when the step routed on the GPU, else
/// `cpu`), `target`, `threshold`, `active_experts`, the controller's `integral` and
/// `error`, the shape, `since_target_change` (steps run at the current target) and
/// `settled_after` (steps after the last target change until the 10-step mean of `a_t`
/// stayed within ±2% of `T`; `null` while it has not), and the fixed Top-p and Top-k
/// runs' `threshold` / `active_experts` on the same logits.
pub fn status(app: &DesktopApp, gpu_name: &str) -> Option<Value> {
    let sim = app.simulator()?;
    let dtopp = sim.runs.first()?;
    let last = dtopp.steps.last()?;
    let settings = sim.settings();
    let (since_change, settled_after) = settling_since_change(&dtopp.steps);
    let backend = match sim.last_backend {
        Some("gpu") => gpu_name,
        _ => "cpu",
    };
    let other = |run: Option<&RunData>| {
        run.and_then(|r| r.steps.last()).map(|s| {
            json!({
                "threshold": s.threshold,
                "active_experts": s.active,
            })
        })
    };
    Some(json!({
        "step": last.step,
        "mode": "dtopp",
        "backend": backend,
        "routing": app.sim_routing_label(),
        "running": sim.running,
        "target": last.target,
        "threshold": last.threshold,
        "active_experts": last.active,
        "integral": last.integral,
        "error": last.error,
        "experts": settings.experts,
        "layers": settings.layers,
        "tokens": settings.tokens,
        "since_target_change": since_change,
        "settled_after": settled_after,
        "topp": other(sim.runs.get(1)),
        "topk": other(sim.runs.get(2)),
    }))
}

/// Steps run at the current target, and after how many of them `a_t` settled.
fn settling_since_change(steps: &[StepPoint]) -> (usize, Option<usize>) {
    let Some(last) = steps.last() else {
        return (0, None);
    };
    let since = steps
        .iter()
        .rev()
        .take_while(|s| s.target == last.target)
        .count();
    let tail = &steps[steps.len() - since..];
    let active: Vec<f64> = tail.iter().map(|s| s.active).collect();
    let targets: Vec<f64> = tail.iter().map(|s| s.target).collect();
    (since, TrackingSummary::of(&active, &targets).settled_at)
}

/// The DTop-p run's steps so far (empty before the simulator's first step).
pub fn dtopp_steps(app: &DesktopApp) -> &[StepPoint] {
    app.simulator()
        .and_then(|s| s.runs.first())
        .map(|r| r.steps.as_slice())
        .unwrap_or_default()
}

/// A trajectory as `{ "step": [...], "target": [...], "threshold": [...],
/// "active_experts": [...] }` (for `window.dtopp.history()`).
pub fn history(steps: &[StepPoint]) -> Value {
    json!({
        "step": steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        "target": steps.iter().map(|s| s.target).collect::<Vec<_>>(),
        "threshold": steps.iter().map(|s| s.threshold).collect::<Vec<_>>(),
        "active_experts": steps.iter().map(|s| s.active).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtopp_desktop::StartOptions;
    use dtopp_desktop::settings::Settings;
    use dtopp_desktop::sources::SourceKind;

    #[test]
    fn status_reports_the_last_step_and_the_settling_after_a_target_change() {
        let mut settings = Settings {
            source: SourceKind::Simulator,
            ..Settings::default()
        };
        settings.sim.tokens = 256;
        let mut app = DesktopApp::with_settings(settings, StartOptions::default());
        app.sync_simulator();
        assert!(status(&app, "webgpu").is_none(), "no step yet");
        for _ in 0..60 {
            app.simulator_mut().unwrap().step().unwrap();
        }
        app.settings_mut().sim.target = 16.0;
        app.sync_simulator();
        for _ in 0..60 {
            app.simulator_mut().unwrap().step().unwrap();
        }
        let s = status(&app, "webgpu").unwrap();
        assert_eq!(s["step"], 119);
        assert_eq!(s["mode"], "dtopp");
        assert_eq!(s["backend"], "cpu");
        assert_eq!(s["target"], 16.0);
        assert_eq!(s["since_target_change"], 60);
        let settled = s["settled_after"]
            .as_u64()
            .expect("settled within 60 steps");
        assert!(settled <= 40, "{settled}");
        let a = s["active_experts"].as_f64().unwrap();
        assert!((a - 16.0).abs() < 1.0, "{a}");
        assert_eq!(s["topk"]["active_experts"], 16.0);
        let h = history(dtopp_steps(&app));
        assert_eq!(h["active_experts"].as_array().unwrap().len(), 120);
    }
}
