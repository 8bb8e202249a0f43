//! The cross-backend conformance suite: one body of checks, generic over
//! [`RoutingOps`], run against the CPU reference on random inputs. Each backend's test
//! file calls [`assert_conforms`]; a backend that cannot start (no device) skips with a
//! printed reason unless `DTOPP_REQUIRE_GPU=1`.
//!
//! Rules of comparison (DESIGN.md, DEVELOPERS.md):
//! - index outputs (selected experts, counts, dispatch plan) must be equal, except tokens
//!   whose selection is decided within [`THRESHOLD_SLACK`] of the threshold, which are
//!   counted and reported, not failed;
//! - floats within `atol + rtol * |ref|` ([`Tolerance`]);
//! - a failure lists the first mismatching positions.

use dtopp::cpu::{CpuReference, rank_experts as rank};
use dtopp::ops::{DrnGrads, HostSelection, Normalization, RouteShape, RoutingOps};
use dtopp::rng::SplitMix64;
use dtopp::{Error, Result};

/// Tokens whose prefix mass lies within this distance of `p` may legitimately select a
/// different count on a backend that sums in another order.
pub const THRESHOLD_SLACK: f32 = 1e-5;

/// `|x - ref| <= atol + rtol * |ref|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Absolute part.
    pub atol: f32,
    /// Relative part.
    pub rtol: f32,
}

impl Tolerance {
    /// Whether `got` is within tolerance of `want` (never for NaN).
    pub fn accepts(self, got: f32, want: f32) -> bool {
        (got - want).abs() <= self.atol + self.rtol * want.abs()
    }
}

/// Probabilities and combine weights: f32 reductions in another order.
pub const PROBS_TOL: Tolerance = Tolerance {
    atol: 1e-6,
    rtol: 1e-4,
};
/// Gradients: longer chains of f32 arithmetic.
pub const GRAD_TOL: Tolerance = Tolerance {
    atol: 1e-5,
    rtol: 1e-3,
};

/// One routing problem of the suite.
#[derive(Clone, Debug)]
pub struct Case {
    /// A name for messages.
    pub name: String,
    /// `[N, E]`.
    pub shape: RouteShape,
    /// `[N, E]` router logits.
    pub logits: Vec<f32>,
}

/// Problems above this many logits get the light treatment (one normalization, fewer
/// thresholds, hidden size 1): the full grid on N = 65536, E = 256 would take minutes
/// on a 2-core CI machine.
pub const LARGE_CASE: usize = 1 << 16;

/// The suite's problems: N in {1, 7, 1000, 65536} x E in {1, 8, 60, 64, 256}, plus a few
/// more awkward shapes (E = 5, 100, 255, 300), each with normal, wide (6x) and tied (rounded) logits.
pub fn cases(seed: u64) -> Vec<Case> {
    let mut shapes = vec![(5, 1), (33, 5), (128, 64), (17, 100), (9, 255)];
    for n in [1, 7, 1000, 65536] {
        for e in [1, 8, 60, 64, 256] {
            shapes.push((n, e));
        }
    }
    // More experts than the fused CUDA kernels hold in registers (last, so the random
    // streams of the shapes above stay as they were).
    shapes.push((3, 300));
    let mut out = Vec::new();
    for (i, &(n, e)) in shapes.iter().enumerate() {
        for (variant, scale, quantise) in [
            ("normal", 1.0f32, false),
            ("wide", 6.0, false),
            ("ties", 1.0, true),
        ] {
            let mut rng = SplitMix64::substream(seed, i as u64, variant.len() as u64);
            let logits = (0..n * e)
                .map(|_| {
                    let v = rng.normal() as f32 * scale;
                    // Few distinct values, so many tokens hold tied experts.
                    if quantise { v.round() } else { v }
                })
                .collect();
            out.push(Case {
                name: format!("{variant} N={n} E={e}"),
                shape: RouteShape {
                    tokens: n,
                    experts: e,
                },
                logits,
            });
        }
    }
    out
}

/// What a conformance run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Comparisons made.
    pub checks: usize,
    /// Tokens excused for lying within [`THRESHOLD_SLACK`] of the threshold.
    pub near_threshold_tokens: usize,
    /// Token selections compared.
    pub selected_tokens: usize,
    /// Human-readable failures (first mismatches of each failing comparison).
    pub failures: Vec<String>,
}

impl Report {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn floats(&mut self, what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
        self.compare(what, got, want, |g, w| tol.accepts(g, w));
    }

    fn ints(&mut self, what: &str, got: &[i32], want: &[i32]) {
        self.compare(what, got, want, |g, w| g == w);
    }

    /// One comparison of two arrays; a failure lists the first five mismatches.
    fn compare<T: Copy + std::fmt::Display>(
        &mut self,
        what: &str,
        got: &[T],
        want: &[T],
        same: impl Fn(T, T) -> bool,
    ) {
        self.checks += 1;
        if got.len() != want.len() {
            return self.fail(format!("{what}: length {} != {}", got.len(), want.len()));
        }
        let bad: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| !same(**g, **w))
            .take(5)
            .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
            .collect();
        if !bad.is_empty() {
            self.fail(format!("{what}: {}", bad.join(", ")));
        }
    }
}

/// Whether a token's Top-p decision is within the slack: some prefix mass of its ranked
/// probabilities lies within [`THRESHOLD_SLACK`] of `p`.
pub fn near_threshold(probs: &[f32], p: f32) -> bool {
    let mut mass = 0.0f32;
    rank(probs).iter().any(|&j| {
        mass += probs[j];
        (mass - p).abs() <= THRESHOLD_SLACK
    })
}

/// Compares a backend selection with the reference, token by token. `threshold`: for
/// Top-p, tokens near it are excused.
fn compare_selection(
    report: &mut Report,
    what: &str,
    got: &HostSelection,
    want: &HostSelection,
    probs: &[f32],
    threshold: Option<f32>,
) {
    report.checks += 1;
    report.selected_tokens += want.shape.tokens;
    let e = want.shape.experts;
    let mut bad = Vec::new();
    for i in 0..want.shape.tokens {
        let row = i * e..(i + 1) * e;
        let same = got.counts.get(i) == Some(&want.counts[i])
            && got.experts.get(row.clone()) == Some(&want.experts[row.clone()]);
        if same {
            // Weights compared in place: formatting a label per token would dominate the
            // run time on 65536-token cases.
            let (g, w) = (&got.weights[row.clone()], &want.weights[row.clone()]);
            if let Some(slot) = (0..e).find(|&s| !PROBS_TOL.accepts(g[s], w[s]))
                && bad.len() < 5
            {
                bad.push(format!(
                    "token {i} slot {slot}: weight {} want {}",
                    g[slot], w[slot]
                ));
            }
        } else if threshold.is_some_and(|p| near_threshold(&probs[row.clone()], p)) {
            report.near_threshold_tokens += 1;
        } else if bad.len() < 5 {
            bad.push(format!(
                "token {i}: got k={:?} experts {:?}, want k={} experts {:?}",
                got.counts.get(i),
                got.experts.get(row.clone()),
                want.counts[i],
                &want.experts[row]
            ));
        }
    }
    if !bad.is_empty() {
        report.fail(format!("{what}: {}", bad.join("; ")));
    }
}

/// The small cases only (N * E <= [`LARGE_CASE`]): enough to exercise every rule, fast
/// enough to run many times (mutation tests, the CPU checking itself).
pub fn small_cases(seed: u64) -> Vec<Case> {
    cases(seed)
        .into_iter()
        .filter(|c| c.shape.len() <= LARGE_CASE)
        .collect()
}

/// Runs every op of `ops` on `cases` and compares it with the CPU reference.
pub fn conformance_report<O: RoutingOps>(ops: &O, cases: Vec<Case>, seed: u64) -> Result<Report> {
    let cpu = CpuReference;
    let mut report = Report::default();
    for case in cases {
        let shape = case.shape;
        let name = format!("{} [{}]", case.name, ops.backend_name());
        let logits = ops.upload_floats(&case.logits)?;
        let large = shape.len() > LARGE_CASE;
        let norms: &[Normalization] = if large {
            &[Normalization::Drn { theta: 1.0 }]
        } else {
            &[
                Normalization::Drn { theta: 1.0 },
                Normalization::Drn { theta: 2.5 },
                Normalization::Softmax,
            ]
        };
        let thresholds: &[f32] = if large {
            &[0.5, 1.0]
        } else {
            &[0.05, 0.5, 0.9, 1.0]
        };
        let caps: &[Option<usize>] = if large {
            &[None]
        } else {
            &[None, Some(shape.experts.div_ceil(2))]
        };
        let ks: Vec<usize> = if large {
            vec![shape.experts.div_ceil(3)]
        } else {
            vec![
                1,
                shape.experts.min(2),
                shape.experts.div_ceil(3),
                shape.experts,
            ]
        };
        let hiddens: &[usize] = if large { &[1] } else { &[1, 3, 16] };
        for &norm in norms {
            let what = format!("{name} {norm:?}");
            // DRN forward.
            let want_probs = cpu.drn_forward(&case.logits, shape, norm)?;
            let probs_buf = ops.drn_forward(&logits, shape, norm)?;
            let got_probs = ops.read_floats(&probs_buf)?;
            report.floats(
                &format!("{what} drn_forward"),
                &got_probs,
                &want_probs,
                PROBS_TOL,
            );

            // DRN backward, with a random upstream gradient.
            let mut rng = SplitMix64::substream(seed, shape.len() as u64, 99);
            let grad: Vec<f32> = (0..shape.len()).map(|_| rng.normal() as f32).collect();
            let want: DrnGrads<Vec<f32>> =
                cpu.drn_backward(&case.logits, &want_probs, &grad, shape, norm)?;
            let got =
                ops.drn_backward(&logits, &probs_buf, &ops.upload_floats(&grad)?, shape, norm)?;
            report.floats(
                &format!("{what} drn_backward dz"),
                &ops.read_floats(&got.logits)?,
                &want.logits,
                GRAD_TOL,
            );
            report.floats(
                &format!("{what} drn_backward dtheta"),
                &ops.read_floats(&got.theta)?,
                &want.theta,
                GRAD_TOL,
            );

            // Selections run on the reference probabilities, so index comparisons test
            // selection alone; `near_threshold` then reads the same numbers.
            let probs_ref = ops.upload_floats(&want_probs)?;
            for &p in thresholds {
                for &k_max in caps {
                    let want = cpu.top_p(&want_probs, shape, &vec![p], k_max)?;
                    let got = ops.top_p(&probs_ref, shape, &ops.upload_floats(&[p])?, k_max)?;
                    let got = ops.read_selection(&got)?;
                    compare_selection(
                        &mut report,
                        &format!("{what} top_p p={p} k_max={k_max:?}"),
                        &got,
                        &want,
                        &want_probs,
                        Some(p),
                    );
                }
            }
            check_fused(ops, &mut report, &what, &logits, &want_probs, shape, norm)?;
            for &k in &ks {
                let want = cpu.top_k(&want_probs, shape, k)?;
                let got = ops.read_selection(&ops.top_k(&probs_ref, shape, k)?)?;
                compare_selection(
                    &mut report,
                    &format!("{what} top_k k={k}"),
                    &got,
                    &want,
                    &want_probs,
                    None,
                );
            }
        }

        // Dispatch, gather, combine on the reference selection (exact integer plan).
        let probs = cpu.drn_forward(&case.logits, shape, Normalization::Drn { theta: 1.0 })?;
        let selection = cpu.top_p(&probs, shape, &vec![0.6], None)?;
        let want_plan = cpu.dispatch_plan(&selection)?;
        let uploaded = dtopp::ops::Selection {
            shape,
            k_bound: selection.k_bound,
            experts: ops.upload_ints(&selection.experts)?,
            weights: ops.upload_floats(&selection.weights)?,
            counts: ops.upload_ints(&selection.counts)?,
        };
        let plan_buf = ops.dispatch_plan(&uploaded)?;
        let got_plan = ops.read_plan(&plan_buf)?;
        report.ints(
            &format!("{name} expert_counts"),
            &got_plan.expert_counts,
            &want_plan.expert_counts,
        );
        report.ints(
            &format!("{name} expert_offsets"),
            &got_plan.expert_offsets,
            &want_plan.expert_offsets,
        );
        report.ints(
            &format!("{name} route_tokens"),
            &got_plan.route_tokens,
            &want_plan.route_tokens,
        );
        report.floats(
            &format!("{name} route_weights"),
            &got_plan.route_weights,
            &want_plan.route_weights,
            Tolerance {
                atol: 0.0,
                rtol: 0.0,
            },
        );
        report.ints(
            &format!("{name} token_routes"),
            &got_plan.token_routes,
            &want_plan.token_routes,
        );

        for &hidden in hiddens {
            let mut rng = SplitMix64::substream(seed, shape.len() as u64, hidden as u64);
            let x: Vec<f32> = (0..shape.tokens * hidden)
                .map(|_| rng.normal() as f32)
                .collect();
            let want_g = cpu.gather(&x, hidden, &want_plan)?;
            let got_g_buf = ops.gather(&ops.upload_floats(&x)?, hidden, &plan_buf)?;
            let mut got_g = ops.read_floats(&got_g_buf)?;
            got_g.truncate(want_g.len());
            report.floats(
                &format!("{name} gather D={hidden}"),
                &got_g,
                &want_g,
                Tolerance {
                    atol: 0.0,
                    rtol: 0.0,
                },
            );

            // Expert outputs: any values per route; a backend's buffer may be longer (C > M).
            let y: Vec<f32> = (0..plan_buf.route_capacity * hidden)
                .map(|_| rng.normal() as f32)
                .collect();
            let want_c = dtopp::cpu::combine(&y[..want_g.len()], hidden, &want_plan)?;
            let got_c =
                ops.read_floats(&ops.combine(&ops.upload_floats(&y)?, hidden, &plan_buf)?)?;
            report.floats(
                &format!("{name} combine D={hidden}"),
                &got_c,
                &want_c,
                PROBS_TOL,
            );
        }
    }
    check_controller(ops, &mut report)?;
    check_non_finite(ops, &mut report)?;
    Ok(report)
}

/// DRN and selection in one call (`drn_top_p`, `drn_top_k`; one kernel on CUDA):
/// probabilities within tolerance of the reference's, and the selection exactly the
/// reference's selection on the probabilities the backend returned (on the reference's
/// own probabilities, experts a few ulps apart may swap ranks).
fn check_fused<O: RoutingOps>(
    ops: &O,
    report: &mut Report,
    what: &str,
    logits: &O::Floats,
    want_probs: &[f32],
    shape: RouteShape,
    norm: Normalization,
) -> Result<()> {
    let large = shape.len() > LARGE_CASE;
    let rules: &[(f32, Option<usize>)] = if large {
        &[(0.5, None)]
    } else {
        &[
            (0.05, None),
            (0.9, None),
            (1.0, Some(shape.experts.div_ceil(2))),
        ]
    };
    for &(p, k_max) in rules {
        let got = ops.drn_top_p(logits, shape, norm, &ops.upload_floats(&[p])?, k_max)?;
        let label = format!("{what} drn_top_p p={p} k_max={k_max:?}");
        let probs = ops.read_floats(&got.probs)?;
        report.floats(&format!("{label} probs"), &probs, want_probs, PROBS_TOL);
        let want = dtopp::cpu::top_p(&probs, shape, p, k_max)?;
        let got = ops.read_selection(&got.selection)?;
        compare_selection(report, &label, &got, &want, &probs, Some(p));
    }
    let k = shape.experts.div_ceil(3);
    let got = ops.drn_top_k(logits, shape, norm, k)?;
    let label = format!("{what} drn_top_k k={k}");
    let probs = ops.read_floats(&got.probs)?;
    report.floats(&format!("{label} probs"), &probs, want_probs, PROBS_TOL);
    let want = dtopp::cpu::top_k(&probs, shape, k)?;
    let got = ops.read_selection(&got.selection)?;
    compare_selection(report, &label, &got, &want, &probs, None);
    Ok(())
}

/// The device-resident controller: the same state after the same updates, including
/// updates that saturate the clamp.
fn check_controller<O: RoutingOps>(ops: &O, report: &mut Report) -> Result<()> {
    let cpu = CpuReference;
    for (experts, target, len, p0) in [
        (64usize, 8.0f64, 4096usize, 0.45f32),
        (8, 2.0, 7, 0.9),
        (60, 12.0, 1000, 0.05),
    ] {
        let config = dtopp::controller::ControllerConfig::new(target, experts);
        let mut want = dtopp::controller::device_state(p0).to_vec();
        let mut got = ops.upload_floats(&want)?;
        let mut rng = SplitMix64::new(len as u64);
        for step in 0..6 {
            // Counts around, below and far above the target.
            let spread = [experts / 2, 1, experts][step % 3].max(1);
            let counts: Vec<i32> = (0..len).map(|_| 1 + rng.below(spread) as i32).collect();
            cpu.controller_update(&mut want, &counts, &config)?;
            ops.controller_update(&mut got, &ops.upload_ints(&counts)?, &config)?;
            report.floats(
                &format!("controller_update E={experts} T={target} step {step}"),
                &ops.read_floats(&got)?,
                &want,
                Tolerance {
                    atol: 1e-6,
                    rtol: 1e-5,
                },
            );
        }
    }
    Ok(())
}

/// NaN and infinities in the logits: every backend fails, naming the same first element.
fn check_non_finite<O: RoutingOps>(ops: &O, report: &mut Report) -> Result<()> {
    let shape = RouteShape {
        tokens: 4,
        experts: 6,
    };
    for (at, bad) in [
        (7usize, f32::NAN),
        (13, f32::INFINITY),
        (23, f32::NEG_INFINITY),
    ] {
        let mut logits = vec![0.5f32; shape.len()];
        logits[at] = bad;
        logits[at + 1..].iter_mut().for_each(|v| *v = f32::NAN);
        // A device backend may report it when the result is read, not in the op itself.
        let probs = ops
            .drn_forward(
                &ops.upload_floats(&logits)?,
                shape,
                Normalization::Drn { theta: 1.0 },
            )
            .and_then(|p| ops.read_floats(&p));
        // The fused op reports the logit too, from the selection as from the probabilities.
        let logits = ops.upload_floats(&logits)?;
        let threshold = ops.upload_floats(&[0.5])?;
        let norm = Normalization::Drn { theta: 1.0 };
        let fused = ops
            .drn_top_p(&logits, shape, norm, &threshold, None)
            .and_then(|r| ops.read_selection(&r.selection));
        let fused_probs = ops
            .drn_top_k(&logits, shape, norm, 2)
            .and_then(|r| ops.read_floats(&r.probs));
        for (op, result) in [
            ("drn_forward", probs.map(drop)),
            ("drn_top_p", fused.map(drop)),
            ("drn_top_k", fused_probs.map(drop)),
        ] {
            report.checks += 1;
            match result {
                Err(Error::NonFinite { token, column, .. })
                    if (token, column) == (at / 6, at % 6) => {}
                other => report.fail(format!(
                    "{op}: non-finite logit {bad} at {at}: expected NonFinite at token {}, column {}, got {:?}",
                    at / 6,
                    at % 6,
                    other.map(|_| "a result")
                )),
            }
        }
    }
    Ok(())
}

/// Runs the suite on `cases` and panics with the first mismatches if any comparison
/// failed, or if more than 0.1% of token selections differed near the threshold.
pub fn assert_conforms<O: RoutingOps>(ops: &O, cases: Vec<Case>) {
    let report = conformance_report(ops, cases, 2026)
        .unwrap_or_else(|e| panic!("{} backend failed to run: {e}", ops.backend_name()));
    println!(
        "{}: {} comparisons, {} of {} token selections excused within {THRESHOLD_SLACK} of the threshold, {} failures",
        ops.backend_name(),
        report.checks,
        report.near_threshold_tokens,
        report.selected_tokens,
        report.failures.len()
    );
    for f in report.failures.iter().take(10) {
        println!("FAILURE: {f}");
    }
    assert!(
        report.near_threshold_tokens * 1000 <= report.selected_tokens,
        "{} of {} token selections differed near the threshold: more than the 0.1% rounding explains",
        report.near_threshold_tokens,
        report.selected_tokens
    );
    assert!(
        report.failures.is_empty(),
        "{} backend differs from the CPU reference in {} comparisons; first ones:\n{}",
        ops.backend_name(),
        report.failures.len(),
        report
            .failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// For GPU backends: whether a missing device should fail the test (`DTOPP_REQUIRE_GPU=1`)
/// rather than skip it.
pub fn gpu_required() -> bool {
    std::env::var("DTOPP_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The `dtopp` binary of this build (`target/<profile>/dtopp`), built by
/// `cargo test --workspace` together with the tests.
pub fn dtopp_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/dtopp
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let bin = dir.join(format!("dtopp{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p dtopp` first)",
        bin.display()
    );
    bin
}

/// The wgpu backend, or `None` after printing why when no adapter exists. With
/// `DTOPP_REQUIRE_WGPU=1` or `DTOPP_REQUIRE_GPU=1` (CI sets the first) a missing adapter
/// panics instead, so a broken driver install cannot pass as a skip.
pub fn wgpu_or_skip() -> Option<dtopp::backends::WgpuOps> {
    match dtopp::backends::WgpuOps::new() {
        Ok(ops) => {
            println!("wgpu adapter: {}", ops.adapter_name());
            Some(ops)
        }
        Err(e) => {
            let required =
                gpu_required() || std::env::var("DTOPP_REQUIRE_WGPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "DTOPP_REQUIRE_WGPU/GPU is set but wgpu has no adapter: {e}"
            );
            println!("SKIPPED: no wgpu adapter: {e}");
            None
        }
    }
}

/// burn's default wgpu device, set up so that dtopp's WGSL routing runs on its buffers
/// (`dtopp::model::wgpu_routing::setup`), or `None` after printing why when no adapter
/// exists (a failure under `DTOPP_REQUIRE_WGPU` / `DTOPP_REQUIRE_GPU`, as
/// [`wgpu_or_skip`]). Every test that trains or routes on burn-wgpu takes its device here,
/// before making any tensor on it.
pub fn wgpu_model_device() -> Option<burn::backend::wgpu::WgpuDevice> {
    wgpu_or_skip()?;
    let device = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    let adapter = dtopp::model::wgpu_routing::setup(&device)
        .unwrap_or_else(|e| panic!("setting up burn's wgpu device for dtopp: {e}"));
    println!("burn wgpu device: {adapter}");
    Some(device)
}

/// The CUDA backend on device 0, or `None` with the reason printed (no `cuda` feature,
/// no driver, no NVRTC, no device). With `DTOPP_REQUIRE_GPU=1` a missing device fails.
pub fn cuda_or_skip() -> Option<dtopp::backends::CudaOps> {
    match dtopp::backends::CudaOps::new(0) {
        Ok(ops) => {
            println!("cuda device: {}", ops.device_name());
            Some(ops)
        }
        Err(e) => {
            assert!(
                !gpu_required(),
                "DTOPP_REQUIRE_GPU is set but the CUDA backend cannot start: {e}"
            );
            println!("SKIPPED: no CUDA backend: {e}");
            None
        }
    }
}

/// The `metrics.jsonl` of a run directory, one entry per optimizer step.
pub fn read_metrics(dir: &std::path::Path) -> Vec<dtopp::metrics::StepMetrics> {
    let path = dir.join("metrics.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics line"))
        .collect()
}

/// Runs `dtopp train --preset tiny --steps STEPS --quiet --out OUT EXTRA...` and returns
/// its output (exit status, stdout, stderr).
pub fn train_tiny(out: &std::path::Path, steps: u32, extra: &[&str]) -> std::process::Output {
    let (out, steps) = (out.display().to_string(), steps.to_string());
    let mut args = vec![
        "train", "--preset", "tiny", "--steps", &steps, "--quiet", "--out", &out,
    ];
    args.extend_from_slice(extra);
    std::process::Command::new(dtopp_binary())
        .args(&args)
        .output()
        .expect("dtopp runs")
}

/// The tiny preset in `mode` for `steps` steps, with two micro-batches of 4 sequences per
/// step (gradient accumulation) and no evaluation, samples or checkpoints in between:
/// the in-process training tests' run.
pub fn tiny_two_micro_batches(
    mode: dtopp::train::RoutingMode,
    steps: u64,
) -> dtopp::train::TrainConfig {
    let mut config = dtopp::train::Preset::Tiny.config();
    config.routing.mode = mode;
    config.run.steps = steps;
    config.run.batch_size = 4;
    config.run.grad_accum = 2;
    config.run.eval_every = 0;
    config.run.eval_batches = 1;
    config.run.sample_every = 0;
    config
}

/// A TOML laid over `--preset tiny` for the data-parallel tests: `batch` sequences per
/// rank, validation every 4 steps, a routing sample every 8. Written in `root`; returns
/// its path.
pub fn batch_config(root: &std::path::Path, batch: usize) -> String {
    let path = root.join(format!("batch{batch}.toml"));
    std::fs::write(
        &path,
        format!("[run]\nbatch_size = {batch}\neval_every = 4\nsample_every = 8\n"),
    )
    .unwrap();
    path.display().to_string()
}

/// How far two data-parallel runs of the same global batch may drift apart, step by step.
#[derive(Debug)]
pub struct Tolerances {
    /// Losses (training, cross-entropy, validation).
    pub loss: f64,
    /// The threshold p.
    pub threshold: f64,
    /// a_t, the mean active experts.
    pub active: f64,
}

/// On the CPU: N ranks with batch B against one device with batch N*B. The same windows,
/// the same global routing counts and balance loss, sums taken in another order (per-rank
/// means then their mean, instead of one mean over N*B sequences), so the trajectories
/// agree to float rounding that grows slowly with the steps.
pub const CPU_DATA_PARALLEL: Tolerances = Tolerances {
    loss: 1e-5,
    threshold: 1e-6,
    active: 2e-3,
};

/// The grouped expert products' conformance cases and CPU reference, shared by the WGSL
/// (`tests/grouped_matmul.rs`) and CUDA (`tests/cuda_conformance.rs`) tests.
pub mod grouped {
    use dtopp::rng::SplitMix64;

    /// Rows per expert, the row bound (at least their sum), D and F.
    #[derive(Debug)]
    pub struct Case {
        pub counts: Vec<usize>,
        pub rows: usize,
        pub d: usize,
        pub f: usize,
    }

    pub fn cases() -> Vec<Case> {
        let case = |counts: &[usize], extra: usize, d: usize, f: usize| Case {
            rows: counts.iter().sum::<usize>() + extra,
            counts: counts.to_vec(),
            d,
            f,
        };
        vec![
            // One row, one expert.
            case(&[1], 0, 3, 5),
            // Empty experts first, in the middle and last; E = 5; D, F odd.
            case(&[0, 7, 0, 33, 0], 0, 13, 9),
            // One expert with every row, the others empty; rows past the routes.
            case(&[0, 0, 70, 0], 19, 6, 37),
            // Row counts across tile edges (31, 32, 33, 65); D a multiple of 4 but not of 32.
            case(&[31, 32, 33, 1, 65], 5, 36, 40),
            // Every expert empty: the output is all zeros.
            case(&[0, 0, 0], 11, 5, 7),
            // E = 12, a deeper product (several K tiles, the last partial) and wide columns.
            case(&[9, 0, 14, 3, 40, 2, 0, 17, 5, 1, 0, 26], 8, 70, 66),
        ]
    }

    pub fn normals(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    /// Reference: y, dX = g_y · Wᵀ and dW_e = x_eᵀ g_y over the routes, in f64.
    pub fn reference(c: &Case, x: &[f32], w: &[f32], up: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, f, e) = (c.d, c.f, c.counts.len());
        let mut y = vec![0.0; c.rows * f];
        let mut dx = vec![0.0; c.rows * d];
        let mut dw = vec![0.0; e * d * f];
        let mut row = 0;
        for (expert, &count) in c.counts.iter().enumerate() {
            let wb = expert * d * f;
            for m in row..row + count {
                for j in 0..f {
                    y[m * f + j] = (0..d)
                        .map(|k| f64::from(x[m * d + k]) * f64::from(w[wb + k * f + j]))
                        .sum();
                }
                for k in 0..d {
                    dx[m * d + k] = (0..f)
                        .map(|j| f64::from(up[m * f + j]) * f64::from(w[wb + k * f + j]))
                        .sum();
                    for j in 0..f {
                        dw[wb + k * f + j] += f64::from(x[m * d + k]) * f64::from(up[m * f + j]);
                    }
                }
            }
            row += count;
        }
        (y, dx, dw)
    }

    pub fn assert_close(got: &[f32], want: &[f64], depth: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let slack = 1e-6 * (depth as f64).sqrt();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 2e-5 * (1.0 + w.abs()) + slack,
                "{what}[{i}]: kernel {g}, reference {w}"
            );
        }
    }

    /// The experts' offsets of `counts`, from 0.
    pub fn offsets(counts: &[usize]) -> Vec<i32> {
        let mut offsets = vec![0i32];
        for &count in counts {
            offsets.push(offsets.last().unwrap() + count as i32);
        }
        offsets
    }
}
