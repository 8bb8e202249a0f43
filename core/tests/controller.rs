//! The PI controller on plants with known behaviour, its anti-windup, its state, and the
//! simulator's closed loop.

use dtopp::controller::{
    ControllerConfig, ControllerState, PiController, ThresholdControl, ThresholdScope,
    calibrate_threshold,
};
use dtopp::cpu::CpuReference;
use dtopp::ops::{Normalization, RouteShape};
use dtopp::sim::{SimConfig, SimMode, StreamConfig, run_simulation};

/// A static plant: activated experts as a smooth increasing function of p (E = 64).
fn plant(p: f64) -> f64 {
    1.0 + 63.0 * p.powf(2.5)
}

#[test]
fn settles_on_a_static_plant() {
    let mut c = PiController::new(ControllerConfig::new(8.0, 64), 0.2).unwrap();
    let mut a = plant(c.threshold());
    for _ in 0..300 {
        c.update(a).unwrap();
        a = plant(c.threshold());
    }
    assert!(
        (a - 8.0).abs() < 1e-3,
        "a = {a} after 300 steps, p = {}",
        c.threshold()
    );
    // The integral alone holds the operating point once the error is gone.
    assert!(c.state().last_error.abs() < 1e-4);
}

#[test]
fn positive_error_raises_p() {
    let mut c = PiController::new(ControllerConfig::new(8.0, 64), 0.5).unwrap();
    assert!(c.update(4.0).unwrap() > 0.5, "too few experts must raise p");
    let mut c = PiController::new(ControllerConfig::new(8.0, 64), 0.5).unwrap();
    assert!(
        c.update(12.0).unwrap() < 0.5,
        "too many experts must lower p"
    );
}

#[test]
fn anti_windup_bounds_the_integral_and_recovers() {
    // Unreachable target: the plant never exceeds 2 experts, so p rails at p_max.
    let mut c = PiController::new(ControllerConfig::new(8.0, 64), 0.5).unwrap();
    for _ in 0..5000 {
        c.update(2.0).unwrap();
    }
    assert_eq!(c.threshold(), 1.0);
    // The integral stops where Ki * I alone reaches p_max: (1.0 - 0.5) / Ki.
    let bound = 0.5 / dtopp::controller::DEFAULT_KI;
    assert!(
        (c.state().integral - bound).abs() < 1e-9,
        "integral wound up to {}",
        c.state().integral
    );
    // Once the plant can reach T again, the controller leaves the clamp quickly.
    let mut a = plant(c.threshold());
    let mut steps = 0;
    while (a - 8.0).abs() > 0.08 && steps < 1000 {
        c.update(a).unwrap();
        a = plant(c.threshold());
        steps += 1;
    }
    assert!(steps < 200, "took {steps} steps to recover from the clamp");
}

#[test]
fn saved_state_resumes_identically() {
    let config = ControllerConfig::new(6.5, 48);
    let mut a = PiController::new(config.clone(), 0.3).unwrap();
    let mut x = 3.0;
    for t in 0..50 {
        x = plant(a.threshold()) * 48.0 / 64.0 + (t % 3) as f64 * 0.1;
        a.update(x).unwrap();
    }
    let json = serde_json::to_string(a.state()).unwrap();
    let restored: ControllerState = serde_json::from_str(&json).unwrap();
    let mut b = PiController::from_state(config, restored).unwrap();
    for _ in 0..50 {
        let pa = a.update(x).unwrap();
        let pb = b.update(x).unwrap();
        assert_eq!(pa.to_bits(), pb.to_bits());
        x = plant(pa) * 48.0 / 64.0;
    }
    assert_eq!(a, b);
}

#[test]
fn invalid_settings_are_named() {
    let cases: [(ControllerConfig, &str); 7] = [
        (ControllerConfig::new(65.0, 64), "at most E = 64"),
        (ControllerConfig::new(0.5, 64), "at least 1"),
        (
            ControllerConfig {
                kp: -1.0,
                ..ControllerConfig::new(8.0, 64)
            },
            "Kp",
        ),
        (
            ControllerConfig {
                ki: f64::NAN,
                ..ControllerConfig::new(8.0, 64)
            },
            "Ki",
        ),
        (
            ControllerConfig {
                p_min: 0.0,
                ..ControllerConfig::new(8.0, 64)
            },
            "p_min",
        ),
        (
            ControllerConfig {
                p_min: 0.6,
                p_max: 0.5,
                ..ControllerConfig::new(8.0, 64)
            },
            "p_max",
        ),
        (ControllerConfig::new(f64::INFINITY, 64), "target T"),
    ];
    for (config, needle) in cases {
        let msg = PiController::new(config, 0.5).unwrap_err().to_string();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    let msg = PiController::new(ControllerConfig::new(8.0, 64), 1.5)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("(0, 1]"), "{msg}");
    let mut c = PiController::new(ControllerConfig::new(8.0, 64), 0.5).unwrap();
    assert!(c.update(f64::NAN).is_err());
}

#[test]
fn per_layer_controllers_track_each_layer() {
    let config = ControllerConfig::new(8.0, 64);
    let mut control =
        ThresholdControl::new(&config, ThresholdScope::PerLayer, 2, &[0.3, 0.3]).unwrap();
    // Layer 1 needs a higher threshold for the same count.
    let layer = |l: usize, p: f64| if l == 0 { plant(p) } else { plant(p * 0.8) };
    for _ in 0..400 {
        let t = control.thresholds();
        control.update(&[layer(0, t[0]), layer(1, t[1])]).unwrap();
    }
    let t = control.thresholds();
    assert!((layer(0, t[0]) - 8.0).abs() < 1e-2 && (layer(1, t[1]) - 8.0).abs() < 1e-2);
    assert!(t[1] > t[0]);
    // A global controller holds the mean instead.
    let mut global = ThresholdControl::new(&config, ThresholdScope::Global, 2, &[0.3]).unwrap();
    for _ in 0..400 {
        let t = global.thresholds();
        global.update(&[layer(0, t[0]), layer(1, t[1])]).unwrap();
    }
    let t = global.thresholds();
    assert_eq!(t[0], t[1]);
    assert!(((layer(0, t[0]) + layer(1, t[1])) / 2.0 - 8.0).abs() < 1e-2);
    assert!(ThresholdControl::new(&config, ThresholdScope::Global, 2, &[0.3, 0.3]).is_err());
}

#[test]
fn calibration_puts_the_first_batch_at_t() {
    let shape = RouteShape::new(3, 4).unwrap();
    let probs = [
        0.4, 0.3, 0.2, 0.1, 0.25, 0.25, 0.25, 0.25, 0.7, 0.1, 0.1, 0.1,
    ];
    let p = calibrate_threshold(&probs, shape, 2.0).unwrap();
    assert!((p - (0.7 + 0.5 + 0.8) / 3.0).abs() < 1e-6, "{p}");
    // T = 2.5 interpolates half of the third expert's mass.
    let p = calibrate_threshold(&probs, shape, 2.5).unwrap();
    assert!((p - (0.8 + 0.625 + 0.85) / 3.0).abs() < 1e-6, "{p}");
    assert!(calibrate_threshold(&probs, shape, 5.0).is_err());
}

fn sim(mode: SimMode, steps: u64) -> SimConfig {
    SimConfig {
        stream: StreamConfig {
            layers: 2,
            tokens: 256,
            experts: 24,
            seed: 3,
            margin: 3.0,
            noise: 1.0,
            drift: 1.0,
            horizon: steps,
            shock: None,
        },
        mode,
        steps,
        controller: ControllerConfig::new(4.0, 24),
        scope: ThresholdScope::Global,
        threshold: None,
        normalization: Normalization::Drn { theta: 1.0 },
        k_max: None,
        target_change: None,
    }
}

#[test]
fn closed_loop_locks_while_fixed_top_p_drifts() {
    let run = |mode| run_simulation(&CpuReference, &sim(mode, 300), |_| Ok(())).unwrap();
    let dtopp = run(SimMode::Dtopp);
    let topp = run(SimMode::Topp);
    let topk = run(SimMode::Topk);
    let settled = dtopp.tracking.settled_at.expect("dtopp settles");
    assert!(settled < 100, "dtopp settled only at step {settled}");
    assert!(
        (dtopp.tracking.mean - 4.0).abs() < 0.08,
        "{:?}",
        dtopp.tracking
    );
    assert!(
        topp.tracking.settled_at.is_none(),
        "fixed top-p should drift: {:?}",
        topp.tracking
    );
    assert!(topp.tracking.mean < 3.8, "{:?}", topp.tracking);
    assert_eq!((topk.tracking.mean, topk.tracking.std), (4.0, 0.0));
}

#[test]
fn simulation_is_deterministic_and_steps_the_target() {
    let mut config = sim(SimMode::Dtopp, 120);
    config.target_change = Some((60, 6.0));
    let trace = |c: &SimConfig| {
        let mut a = Vec::new();
        run_simulation(&CpuReference, c, |r| {
            a.push((r.active_experts, r.threshold, r.target));
            Ok(())
        })
        .unwrap();
        a
    };
    let first = trace(&config);
    assert_eq!(first, trace(&config));
    assert_eq!(first[59].2, 4.0);
    assert_eq!(first[60].2, 6.0);
    let tail: f64 = first[100..].iter().map(|x| x.0).sum::<f64>() / 20.0;
    assert!(
        (tail - 6.0).abs() < 0.15,
        "mean a_t {tail} after the step to T = 6"
    );
}
