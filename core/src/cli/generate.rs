//! `dtopp generate RUN_DIR --prompt TEXT`: sampling from a trained run with a KV cache, at
//! the compute it was trained with or one chosen now (`--target T'`, `--threshold p`);
//! `--show-experts` colours each token by the experts it took.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::Backend;
use super::inference_backend::{InferenceJob, on_inference_backend};
use crate::error::{Error, Result};
use crate::infer::{Compute, GenerateOptions, RoutedToken, TrainedRun, generate};
use crate::model::RoutingBackend;
use crate::train::printable_byte;

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    /// Run directory of `dtopp train` (its newest intact checkpoint is used).
    #[arg(value_name = "RUN_DIR")]
    run: PathBuf,
    /// The prompt, as bytes (the runs' tokenizer: a byte is a token).
    #[arg(long, value_name = "TEXT", required_unless_present = "prompt_tokens")]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (for synthetic or shard corpora).
    #[arg(
        long,
        value_name = "IDS",
        value_delimiter = ',',
        conflicts_with = "prompt"
    )]
    prompt_tokens: Vec<u32>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    /// Softmax temperature (0: always the most probable token).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most probable tokens only.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Mean active experts per token to generate at (calibrated on validation batches);
    /// default: the compute the run was trained with.
    #[arg(long, value_name = "T", conflicts_with = "threshold")]
    target: Option<f64>,
    /// Top-p threshold for every layer (Top-p runs).
    #[arg(long, value_name = "P")]
    threshold: Option<f64>,
    /// Colour each token by its experts (mean over the MoE layers), with a legend.
    #[arg(long)]
    show_experts: bool,
    /// Print the tokens with their per-layer experts and probabilities as JSON.
    #[arg(long)]
    json: bool,
    /// Run the whole window for every token instead of using the KV cache (to measure
    /// what the cache saves).
    #[arg(long)]
    no_cache: bool,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
}

pub(crate) fn run(args: GenerateArgs) -> Result<()> {
    on_inference_backend(args.backend, &args)
}

/// `--json`'s document.
#[derive(Serialize)]
struct GenerationJson<'a> {
    run: &'a PathBuf,
    step: u64,
    compute: &'a Compute,
    kv_cache: bool,
    prefill_seconds: f64,
    decode_seconds: f64,
    tokens_per_second: f64,
    tokens: Vec<TokenJson<'a>>,
}

#[derive(Serialize)]
struct TokenJson<'a> {
    text: String,
    #[serde(flatten)]
    routed: &'a RoutedToken,
}

impl InferenceJob for &GenerateArgs {
    type Output = ();

    fn run<B: RoutingBackend>(self, device: &B::Device, name: &'static str) -> Result<()> {
        let run = TrainedRun::<B>::load(&self.run, device)?;
        for damaged in &run.skipped {
            eprintln!("skipping a damaged checkpoint: {damaged}");
        }
        let prompt: Vec<u32> = match &self.prompt {
            Some(text) => text.bytes().map(u32::from).collect(),
            None => self.prompt_tokens.clone(),
        };
        let compute = match (self.target, self.threshold) {
            (Some(target), _) => {
                let found = run.calibrate_default(target)?;
                eprintln!(
                    "T' = {target}: {} ({:.3} active experts on the calibration slice)",
                    found.compute.describe(),
                    found.active
                );
                found.compute
            }
            (None, Some(p)) => {
                if !run.mode().uses_threshold() {
                    return Err(Error::param(
                        "--threshold",
                        p,
                        "a Top-p run: this run routes Top-k (use --target k)",
                    ));
                }
                crate::ops::check_threshold(p as f32)
                    .map_err(|_| Error::param("--threshold", p, "a threshold p in (0, 1]"))?;
                Compute::Thresholds(vec![p; run.moe_layers()])
            }
            (None, None) => run.trained_compute(),
        };
        let text_corpus = run.byte_tokens();
        let show = |t: u32| -> String {
            if text_corpus {
                match t as u8 {
                    b'\n' => "\n".into(),
                    b => printable_byte(b),
                }
            } else {
                format!("#{t} ")
            }
        };
        eprintln!(
            "{} ({} run, step {}) on {name}, {}; {}",
            self.run.display(),
            run.mode().name(),
            run.step,
            compute.describe(),
            if self.no_cache {
                "no KV cache"
            } else {
                "KV cache"
            }
        );
        let reference = match &compute {
            Compute::TopK(k) => *k as f64,
            Compute::Thresholds(_) => self.target.unwrap_or(run.config.routing.target),
        };
        let palette = Palette::new(reference);
        if self.show_experts && !self.json {
            eprintln!("{}", palette.legend());
        }
        let options = GenerateOptions {
            tokens: self.tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            seed: self.seed,
            cache: !self.no_cache,
        };
        let mut stdout = std::io::stdout().lock();
        let json = self.json;
        let colour = self.show_experts;
        let generation = generate(
            &run.model,
            run.config.model.seq_len,
            &run.plan(&compute),
            &prompt,
            &options,
            |t| {
                if json {
                    return;
                }
                let text = show(t.token);
                let _ = if colour {
                    write!(stdout, "{}", palette.paint(&text, t.mean_experts()))
                } else {
                    write!(stdout, "{text}")
                };
                let _ = stdout.flush();
            },
        )?;
        if json {
            let doc = GenerationJson {
                run: &self.run,
                step: run.step,
                compute: &compute,
                kv_cache: options.cache,
                prefill_seconds: generation.prefill_seconds,
                decode_seconds: generation.decode_seconds,
                tokens_per_second: generation.tokens_per_second(),
                tokens: generation
                    .tokens
                    .iter()
                    .map(|t| TokenJson {
                        text: show(t.token),
                        routed: t,
                    })
                    .collect(),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("generation serializes")
            );
        } else {
            println!();
        }
        let generated = generation.tokens.len() - prompt.len();
        eprintln!(
            "generated {generated} tokens in {:.3} s: {:.1} tokens/s ({}; prompt of {} tokens in {:.3} s; {} cache restarts)",
            generation.decode_seconds,
            generation.tokens_per_second(),
            if options.cache {
                "KV cache"
            } else {
                "no KV cache"
            },
            prompt.len(),
            generation.prefill_seconds,
            generation.cache_restarts
        );
        Ok(())
    }
}

/// Terminal colours for a token's mean number of experts, blue (few) to red (many),
/// in bins relative to the reference `T`.
struct Palette {
    /// Upper edges of the bins but the last.
    edges: Vec<f64>,
}

const COLOURS: [(u8, u8, u8); 7] = [
    (66, 133, 244),
    (0, 172, 193),
    (67, 160, 71),
    (192, 202, 51),
    (251, 140, 0),
    (229, 57, 53),
    (173, 20, 87),
];

impl Palette {
    fn new(reference: f64) -> Self {
        let t = reference.max(1.0);
        Self {
            edges: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
                .iter()
                .map(|f| f * t)
                .collect(),
        }
    }

    fn bin(&self, experts: f64) -> usize {
        self.edges.iter().take_while(|&&e| experts >= e).count()
    }

    fn paint(&self, text: &str, experts: f64) -> String {
        let (r, g, b) = COLOURS[self.bin(experts)];
        format!("\x1b[38;2;{r};{g};{b}m{text}\x1b[0m")
    }

    fn legend(&self) -> String {
        let mut parts = Vec::new();
        for (i, _) in COLOURS.iter().enumerate() {
            let label = match i {
                0 => format!("< {:.2}", self.edges[0]),
                i if i == self.edges.len() => format!(">= {:.2}", self.edges[i - 1]),
                i => format!("{:.2}-{:.2}", self.edges[i - 1], self.edges[i]),
            };
            parts.push(self.paint(
                &format!("\u{2588} {label}"),
                if i == 0 { 0.0 } else { self.edges[i - 1] },
            ));
        }
        format!(
            "experts per token (mean over MoE layers): {}",
            parts.join("  ")
        )
    }
}
