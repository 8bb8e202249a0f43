//! `report.md`: the setting, a table per mode, and each of the paper's claims beside what
//! these runs measured, with a plain verdict.

use std::fmt::Write as _;
use std::path::Path;

use super::ReproduceOptions;
use super::analysis::{
    ModeResult, Paired, Verdict, class_active, class_loss, depth_gradient, warmup_end,
};
use crate::error::Result;
use crate::io::write_atomic;
use crate::train::{RoutingMode, TrainConfig};

fn get(results: &[ModeResult], mode: RoutingMode) -> Option<&ModeResult> {
    results.iter().find(|r| r.mode == mode)
}

fn settle_text(r: &ModeResult) -> String {
    let parts: Vec<String> = r
        .settled_at
        .iter()
        .map(|s| s.map_or("never".to_string(), |s| format!("from step {s}")))
        .collect();
    parts.join(", ")
}

fn layers_text(k: &[f64]) -> String {
    k.iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn layers_with_spread(k: &[f64], std: &[f64]) -> String {
    k.iter()
        .zip(std)
        .map(|(v, s)| format!("{v:.2} ± {s:.2}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn verdict_text(v: Verdict, reproduced: &str, refuted: &str) -> String {
    match v {
        Verdict::Reproduced => reproduced.to_string(),
        Verdict::Refuted => refuted.to_string(),
        Verdict::Undetermined => {
            "Undetermined: the paired difference is within 2 standard errors of zero".to_string()
        }
    }
}

/// Writes `out/report.md`.
pub fn write(
    out: &Path,
    options: &ReproduceOptions,
    config: &TrainConfig,
    results: &[ModeResult],
    elapsed_s: Option<f64>,
) -> Result<()> {
    let t = config.routing.target;
    let m = &config.model;
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# DTop-p reproduction ({} scale)\n",
        options.scale.name()
    );
    let _ = writeln!(
        r,
        "Command: `{}`  \nVersion: dtopp {}; backend: {}; {}.\n",
        options.command,
        env!("CARGO_PKG_VERSION"),
        options.backend_name,
        match elapsed_s {
            Some(s) => format!(
                "wall time {s:.0} s ({:.1} min), {} run(s) at a time",
                s / 60.0,
                options.jobs.min(results.iter().map(|x| x.runs.len()).sum())
            ),
            None => {
                let runs: Vec<f64> = results
                    .iter()
                    .flat_map(|x| &x.runs)
                    .map(|r| r.summary.elapsed_s)
                    .collect();
                format!(
                    "report rebuilt from runs trained earlier (--report-only): {} runs of {:.0} s each on average",
                    runs.len(),
                    runs.iter().sum::<f64>() / runs.len().max(1) as f64
                )
            }
        }
    );
    let _ = writeln!(
        r,
        "Model: {} parameters, d_model {}, {} blocks ({} MoE layers), E = {} experts of width {}, T = {}; \
         controller Kp = {}, Ki = {}; {} steps of {} tokens ({} sequences of {}); data: {}; seeds: 0..{}. \
         Every mode trains the same initial weights on the same token windows for a given seed. \
         Statistics of `a_t` exclude the first {} steps (warm-up, 20%).\n",
        m.parameters(),
        m.d_model,
        m.layers,
        m.moe_layers(),
        m.experts,
        m.expert_hidden,
        t,
        config.routing.kp,
        config.routing.ki,
        config.run.steps,
        config.tokens_per_step(),
        config.run.batch_size * config.run.grad_accum,
        m.seq_len,
        config.data.source,
        options.seeds,
        warmup_end(config.run.steps)
    );
    let _ = writeln!(
        r,
        "| mode | final val loss (mean ± std over seeds) | final train CE | a_t after warm-up (mean ± std) | settles within ±2% of T | mean k per layer at the end (shallow → deep) |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|");
    for x in results {
        let _ = writeln!(
            r,
            "| {} | {:.4} ± {:.4} | {:.4} | {:.3} ± {:.3} | {} | {} |",
            x.mode,
            x.val_loss.0,
            x.val_loss.1,
            x.train_loss,
            x.active_mean,
            x.active_std,
            settle_text(x),
            layers_text(&x.active_per_layer)
        );
    }
    per_layer_table(&mut r, results);
    class_table(&mut r, results);
    paired_table(&mut r, results);
    let by_bits = results.iter().any(|x| !x.by_difficulty.is_empty());
    if by_bits && results.iter().all(|x| x.by_class.is_empty()) {
        let _ = writeln!(
            r,
            "\nMean activated experts of validation tokens, by the difficulty (bits) of the token they predict:\n"
        );
        let buckets = &results[0].by_difficulty;
        let header: Vec<String> = buckets
            .iter()
            .map(|b| format!("{:.2} bits ({} tokens)", b.difficulty_bits, b.tokens))
            .collect();
        let _ = writeln!(r, "| mode | {} |", header.join(" | "));
        let _ = writeln!(r, "|---|{}", "---|".repeat(buckets.len()));
        for x in results {
            let cells: Vec<String> = x
                .by_difficulty
                .iter()
                .map(|b| format!("{:.2}", b.mean_active))
                .collect();
            let _ = writeln!(r, "| {} | {} |", x.mode, cells.join(" | "));
        }
    }
    if by_bits {
        let buckets = &results[0].by_difficulty;
        let tokens: u64 = buckets.iter().map(|b| b.tokens).sum();
        let bits: f64 = buckets
            .iter()
            .map(|b| b.tokens as f64 * b.difficulty_bits)
            .sum::<f64>()
            / tokens.max(1) as f64;
        let floor = bits * std::f64::consts::LN_2;
        let (lo, hi) = results.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| {
            (lo.min(x.val_loss.0), hi.max(x.val_loss.0))
        });
        let _ = writeln!(
            r,
            "\nThe generator's entropy over these validation tokens is {floor:.4} nats per token \
             ({bits:.3} bits): no model can do better on average. Final validation losses span \
             {lo:.4}-{hi:.4}, i.e. {:+.4} to {:+.4} from that floor{}.",
            lo - floor,
            hi - floor,
            if results.iter().any(|x| !x.by_class.is_empty()) {
                " (the floor is the random tokens' entropy: every other class is determined by its context)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(r, "\n## The paper's claims against these runs\n");
    claims(&mut r, results, t);
    let _ = writeln!(
        r,
        "\n## Plots\n\n![a_t](active_experts.png)\n\n![training loss](train_loss.png)\n\n\
         ![validation loss](val_loss.png)\n\n![k per layer](k_per_layer.png)\n\n![theta](theta.png)\n"
    );
    if results.iter().any(|x| !x.by_difficulty.is_empty()) {
        let _ = writeln!(r, "![experts by difficulty](experts_by_difficulty.png)\n");
    }
    if get(results, RoutingMode::Dtopp).is_some_and(|x| !x.by_class.is_empty()) {
        let _ = writeln!(r, "![experts by class](experts_by_class.png)\n");
    }
    let _ = writeln!(
        r,
        "Per-run data: `runs/<mode>-seed<s>/` (config.toml, metrics.jsonl, routing_samples.jsonl, summary.json)."
    );
    write_atomic(&out.join("report.md"), r.as_bytes())
}

fn per_layer_table(r: &mut String, results: &[ModeResult]) {
    let layers = results.first().map_or(0, |x| x.active_per_layer.len());
    if layers < 2 {
        return;
    }
    let seeds = results[0].runs.len();
    let _ = writeln!(
        r,
        "\nMean `k` per MoE layer over the last 10% of steps, mean ± std over {seeds} seed(s), shallow → deep:\n"
    );
    let header: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
    let _ = writeln!(r, "| mode | {} |", header.join(" | "));
    let _ = writeln!(r, "|---|{}", "---|".repeat(layers));
    for x in results {
        let _ = writeln!(
            r,
            "| {} | {} |",
            x.mode,
            layers_with_spread(&x.active_per_layer, &x.active_per_layer_std)
        );
    }
}

fn class_table(r: &mut String, results: &[ModeResult]) {
    let Some(first) = results.first().filter(|x| !x.by_class.is_empty()) else {
        return;
    };
    let _ = writeln!(
        r,
        "\nValidation tokens by class (synthetic:reasoning; the class of the token predicted): \
         loss in nats and activated experts per token, mean ± std over seeds. The loss floor is 0 \
         for every class but `random`.\n"
    );
    let header: Vec<String> = first
        .by_class
        .iter()
        .map(|c| {
            format!(
                "{} ({} tokens): loss | {}: experts",
                c.class, c.tokens, c.class
            )
        })
        .collect();
    let _ = writeln!(r, "| mode | {} |", header.join(" | "));
    let _ = writeln!(r, "|---|{}", "---|---|".repeat(first.by_class.len()));
    for x in results {
        let cells: Vec<String> = x
            .by_class
            .iter()
            .map(|c| {
                format!(
                    "{:.4} ± {:.4} | {:.2} ± {:.2}",
                    c.loss.0, c.loss.1, c.active.0, c.active.1
                )
            })
            .collect();
        let _ = writeln!(r, "| {} | {} |", x.mode, cells.join(" | "));
    }
    let _ = writeln!(
        r,
        "\nActivated experts per MoE layer by class, mean over seeds (shallow → deep):\n"
    );
    let _ = writeln!(
        r,
        "| mode | {} |",
        first
            .by_class
            .iter()
            .map(|c| c.class.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(r, "|---|{}", "---|".repeat(first.by_class.len()));
    for x in results {
        let cells: Vec<String> = x
            .by_class
            .iter()
            .map(|c| layers_text(&c.active_per_layer))
            .collect();
        let _ = writeln!(r, "| {} | {} |", x.mode, cells.join(" | "));
    }
}

fn paired_table(r: &mut String, results: &[ModeResult]) {
    let (Some(dtopp), Some(topk)) = (
        get(results, RoutingMode::Dtopp),
        get(results, RoutingMode::Topk),
    ) else {
        return;
    };
    let _ = writeln!(
        r,
        "\nPaired differences, DTop-p minus Top-k, per seed (both modes start from the same weights \
         and read the same windows), then their mean ± standard error. Negative losses favour DTop-p.{}\n",
        match dtopp.runs.len() {
            // Student's t with n - 1 degrees of freedom at t = 2, two-sided.
            2 =>
                " With 2 seeds, 2 standard errors is a paired t-test's p = 0.30 (two-sided): a verdict is a lean, not a proof.",
            3 =>
                " With 3 seeds, 2 standard errors is a paired t-test's p = 0.18 (two-sided): a verdict is a lean, not a proof.",
            _ => "",
        }
    );
    let _ = writeln!(r, "| quantity | per seed | mean ± SE | verdict at 2 SE |");
    let _ = writeln!(r, "|---|---|---|---|");
    let mut row = |name: &str, f: &dyn Fn(&crate::reproduce::RunRecord) -> f64| {
        let per_seed: Vec<String> = dtopp
            .runs
            .iter()
            .filter_map(|a| {
                let b = topk.runs.iter().find(|b| b.seed == a.seed)?;
                Some(format!("{:+.4}", f(a) - f(b)))
            })
            .collect();
        // The claim predicts DTop-p lower: Top-k minus DTop-p is positive.
        let p = Paired::between(topk, dtopp, f);
        let shown = Paired { mean: -p.mean, ..p };
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} |",
            per_seed.join(", "),
            shown.text(),
            match p.verdict() {
                Verdict::Reproduced => "DTop-p lower",
                Verdict::Refuted => "Top-k lower",
                Verdict::Undetermined => "undetermined",
            }
        );
    };
    row("final validation loss", &|x| x.summary.final_val_loss);
    row("final training CE (last 10% of steps)", &|x| {
        x.summary.final_train_loss
    });
    for c in &dtopp.by_class {
        let class = c.class.clone();
        row(&format!("validation loss, {class} tokens"), &|x| {
            class_loss(x, &class)
        });
    }
}

fn claims(r: &mut String, results: &[ModeResult], t: f64) {
    let seeds = results.first().map_or(0, |x| x.runs.len());
    let (Some(dtopp), Some(topp), Some(topk)) = (
        get(results, RoutingMode::Dtopp),
        get(results, RoutingMode::Topp),
        get(results, RoutingMode::Topk),
    ) else {
        return;
    };
    let off = |x: &ModeResult| (x.active_mean - t) / t * 100.0;
    // The running mean can sit on T while the count swings step to step (a limit
    // cycle): locking also needs the per-step spread no wider than the paper's
    // (sigma ~ 1 at T = 8).
    let steady = dtopp.active_std <= t / 8.0;
    let locked = off(dtopp).abs() <= 2.0 && dtopp.settled_at.iter().all(Option::is_some) && steady;
    let _ = writeln!(
        r,
        "1. **DTop-p locks the activated-expert count to T** (paper: within ~1B tokens, σ ≈ 1 at 64E8A). \
         Measured: a_t = {:.3} ± {:.3} after warm-up ({:+.1}% from T = {t}); settled (per seed): {}. **{}**.",
        dtopp.active_mean,
        dtopp.active_std,
        off(dtopp),
        settle_text(dtopp),
        if locked {
            "Reproduced".to_string()
        } else if !steady {
            format!(
                "Not reproduced: a_t swings by {:.2} per step, more than T/8 = {:.2} (the paper's sigma at T = 8, scaled)",
                dtopp.active_std,
                t / 8.0
            )
        } else {
            "Not reproduced".to_string()
        }
    );
    let drift = off(topp).abs() > 5.0;
    let _ = writeln!(
        r,
        "2. **Fixed Top-p drifts** (paper: σ ≈ 4, overshooting T). Measured: a_t = {:.3} ± {:.3} ({:+.1}% from T); settled (per seed): {}. **{}**{}.",
        topp.active_mean,
        topp.active_std,
        off(topp),
        settle_text(topp),
        if drift {
            "Drift reproduced"
        } else {
            "Drift not reproduced"
        },
        if drift && off(topp) < 0.0 {
            ", but downwards (the routers sharpen, so the same p selects fewer experts), not an overshoot"
        } else {
            ""
        }
    );
    let best = results
        .iter()
        .min_by(|a, b| a.val_loss.0.total_cmp(&b.val_loss.0))
        .expect("results");
    let val = |x: &crate::reproduce::RunRecord| x.summary.final_val_loss;
    let gain = Paired::between(topk, dtopp, val);
    let _ = writeln!(
        r,
        "3. **DTop-p gives the best loss and beats Top-k** (paper: best train/val loss; downstream 50.9 vs 49.0). \
         Measured: final val loss dtopp {:.4} ± {:.4}, topk {:.4} ± {:.4}, topp {:.4} ± {:.4}; lowest: {}. \
         Top-k minus DTop-p, paired by seed: {}. **{}**. Downstream tasks are not measured here.",
        dtopp.val_loss.0,
        dtopp.val_loss.1,
        topk.val_loss.0,
        topk.val_loss.1,
        topp.val_loss.0,
        topp.val_loss.1,
        best.mode,
        gain.text(),
        if seeds < 2 {
            "Undetermined: one seed gives no spread to judge the difference against".to_string()
        } else {
            verdict_text(
                gain.verdict(),
                "Reproduced: DTop-p's loss is lower by more than 2 standard errors",
                "Refuted: Top-k's loss is lower by more than 2 standard errors",
            )
        }
    );
    if let (Some(no_drn), Some(drn_only)) = (
        get(results, RoutingMode::DtoppNoDrn),
        get(results, RoutingMode::DrnOnly),
    ) {
        let without_drn = Paired::between(no_drn, dtopp, val);
        let without_pi = Paired::between(drn_only, dtopp, val);
        let verdict = match (without_drn.verdict(), without_pi.verdict()) {
            (Verdict::Reproduced, Verdict::Reproduced) => {
                "Reproduced in loss: removing either raises it beyond 2 standard errors".to_string()
            }
            (Verdict::Refuted, _) | (_, Verdict::Refuted) => format!(
                "Refuted in loss: {} is lower than dtopp beyond 2 standard errors",
                if without_drn.verdict() == Verdict::Refuted {
                    "dtopp-no-drn"
                } else {
                    "drn-only"
                }
            ),
            _ if off(drn_only).abs() > 5.0 => {
                "Partly: without PI the compute drifts; in loss undetermined (within 2 standard errors)"
                    .to_string()
            }
            _ => "Undetermined: the paired differences are within 2 standard errors".to_string(),
        };
        let _ = writeln!(
            r,
            "4. **Both PI and DRN are needed** (paper: removing either hurts). Measured: without DRN \
             (dtopp-no-drn) val loss {:.4} ± {:.4}, a_t {:.3} ({:+.1}% from T), minus dtopp paired: {}; \
             without PI (drn-only) val loss {:.4} ± {:.4}, a_t {:.3} ({:+.1}% from T), minus dtopp paired: {}; \
             dtopp {:.4}. **{verdict}**.",
            no_drn.val_loss.0,
            no_drn.val_loss.1,
            no_drn.active_mean,
            off(no_drn),
            without_drn.text(),
            drn_only.val_loss.0,
            drn_only.val_loss.1,
            drn_only.active_mean,
            off(drn_only),
            without_pi.text(),
            dtopp.val_loss.0,
        );
    }
    let k = &dtopp.active_per_layer;
    if k.len() >= 2 {
        let deeper: Vec<f64> = dtopp.runs.iter().map(depth_gradient).collect();
        let depth = Paired::of(&deeper);
        let _ = writeln!(
            r,
            "5. **Shallow layers use fewer experts, deep layers more** (paper, DTop-p). Measured with dtopp: \
             {} (shallow → deep); the deeper half's mean k minus the shallower half's, per seed: {}. **{}**.",
            layers_text(k),
            depth.text(),
            if k.len() == 2 && seeds < 2 {
                "Undetermined: two layers and one seed".to_string()
            } else {
                verdict_text(
                    depth.verdict(),
                    "Reproduced: the deeper layers use more, beyond 2 standard errors",
                    "Refuted: here the shallower layers use more, beyond 2 standard errors",
                )
            }
        );
    }
    if dtopp.by_class.len() >= 2 {
        let classes: Vec<&str> = dtopp.by_class.iter().map(|c| c.class.as_str()).collect();
        let (easy, hard) = ("copy", "compose");
        if classes.contains(&easy) && classes.contains(&hard) {
            let more: Vec<f64> = dtopp
                .runs
                .iter()
                .map(|x| class_active(x, hard) - class_active(x, easy))
                .collect();
            let more = Paired::of(&more);
            let cells: Vec<String> = dtopp
                .by_class
                .iter()
                .map(|c| format!("{} {:.2}", c.class, c.active.0))
                .collect();
            let _ = writeln!(
                r,
                "6. **Harder tokens get more experts** (the premise of Top-p routing). Measured with dtopp on \
                 synthetic:reasoning, experts per token before a token of each class: {}. Before a {hard} token \
                 (2-4 lookups) minus before a {easy} token (none), per seed: {}. **{}**.",
                cells.join(", "),
                more.text(),
                verdict_text(
                    more.verdict(),
                    "Reproduced: tokens that need more computation get more experts, beyond 2 standard errors",
                    "Refuted: tokens that need more computation get fewer experts, beyond 2 standard errors",
                )
            );
        }
    } else {
        let b = &dtopp.by_difficulty;
        if b.len() >= 2 {
            let (easy, hard) = (&b[0], &b[b.len() - 1]);
            let bucket = |x: &crate::reproduce::RunRecord, bits: f64| {
                x.summary
                    .experts_by_difficulty
                    .iter()
                    .find(|d| d.difficulty_bits == bits)
                    .map_or(f64::NAN, |d| d.mean_active)
            };
            let more: Vec<f64> = dtopp
                .runs
                .iter()
                .map(|x| bucket(x, hard.difficulty_bits) - bucket(x, easy.difficulty_bits))
                .collect();
            let more = Paired::of(&more);
            let _ = writeln!(
                r,
                "6. **Harder tokens get more experts** (the premise of Top-p routing). Measured with dtopp on the \
                 synthetic corpus: {:.2} experts before a {:.2}-bit token, {:.2} before a {:.2}-bit token; \
                 the difference per seed: {}. **{}**. Here difficulty is the token's entropy, which no \
                 amount of computation reduces; synthetic:reasoning measures computational difficulty.",
                easy.mean_active,
                easy.difficulty_bits,
                hard.mean_active,
                hard.difficulty_bits,
                more.text(),
                if seeds < 2 {
                    "Undetermined: one seed gives no spread".to_string()
                } else {
                    verdict_text(
                        more.verdict(),
                        "Reproduced",
                        "Refuted: the higher-entropy tokens get fewer experts, beyond 2 standard errors",
                    )
                }
            );
        } else {
            let _ = writeln!(
                r,
                "6. **Harder tokens get more experts** (the premise of Top-p routing). Not measured: \
                 these tokens carry no difficulty or class label (byte-level text); the built-in \
                 corpora label every token (`synthetic`: entropy, `synthetic:reasoning`: lookups)."
            );
        }
    }
    let _ = writeln!(
        r,
        "7. **The gain over Top-k widens with model size (0.4B → 2.4B) and finer experts.** Not testable at this scale."
    );
}
