//! Inference: a trained run's model in a background thread (never on the UI thread). It
//! loads the run directory's newest checkpoint, then answers generation requests at the
//! compute the run was trained with or at a target `T'` (calibrated once per target, on
//! the same validation slice `dtopp eval` uses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};

use burn::backend::NdArray;
use dtopp::infer::{Compute, GenerateOptions, Generation, TrainedRun, generate};
use dtopp::metrics::RoutingSample;
use dtopp::train::printable_byte;

/// What the loaded run is.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    /// The run directory.
    pub dir: PathBuf,
    /// Routing mode name.
    pub mode: String,
    /// Checkpoint step.
    pub step: u64,
    /// Experts per MoE layer.
    pub experts: usize,
    /// The training target `T` (Top-k: `k`).
    pub target: f64,
    /// The trained compute, described.
    pub trained: String,
    /// `(mean active experts, loss)` of `eval.json`, when the run has one.
    pub eval_points: Vec<(f64, f64)>,
}

/// The compute a request asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ComputeChoice {
    /// As the run was trained.
    Trained,
    /// A mean of `T'` active experts per token.
    Target(f64),
}

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt (bytes are tokens).
    pub prompt: String,
    /// Tokens to generate.
    pub tokens: usize,
    /// Softmax temperature.
    pub temperature: f64,
    /// Sampler seed.
    pub seed: u64,
    /// Compute.
    pub compute: ComputeChoice,
}

/// A finished generation, ready to draw.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The request it answers.
    pub request: Request,
    /// The compute used, described.
    pub compute: String,
    /// The text and its routing, in the tokens view's form (step 0).
    pub sample: RoutingSample,
    /// How many of the sample's tokens are the prompt.
    pub prompt_tokens: usize,
    /// Mean experts per generated token, over layers.
    pub active: f64,
    /// Generated tokens per second.
    pub tokens_per_second: f64,
}

enum Reply {
    Loaded(Result<RunInfo, String>),
    Generated(Box<Result<Generated, String>>),
}

/// The worker and what it has answered so far.
#[derive(Debug)]
pub struct InferenceSource {
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    /// The run, once loaded.
    pub info: Option<RunInfo>,
    /// The newest generation, or why it failed.
    pub latest: Option<Result<Generated, String>>,
    /// Why the run could not be loaded.
    pub load_error: Option<String>,
    /// Requests sent and not yet answered.
    pub pending: usize,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

impl InferenceSource {
    /// Starts a worker that loads the run in `dir` (on the CPU: burn ndarray and the CPU
    /// routing reference).
    pub fn open(dir: &Path) -> Self {
        let (requests, jobs) = channel::<Request>();
        let (answer, replies) = channel();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("dtopp-inference".into())
            .spawn(move || worker(&dir, &jobs, &answer))
            .expect("spawning the inference thread");
        Self {
            requests,
            replies,
            info: None,
            latest: None,
            load_error: None,
            pending: 0,
        }
    }

    /// Asks for a generation (answered by [`Self::poll`]).
    pub fn request(&mut self, request: Request) {
        if self.requests.send(request).is_ok() {
            self.pending += 1;
        }
    }

    /// Takes the worker's answers; true when something changed.
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self.replies.try_recv() {
                Ok(Reply::Loaded(Ok(info))) => self.info = Some(info),
                Ok(Reply::Loaded(Err(e))) => self.load_error = Some(e),
                Ok(Reply::Generated(result)) => {
                    self.pending = self.pending.saturating_sub(1);
                    self.latest = Some(*result);
                }
                Err(TryRecvError::Empty) => return changed,
                Err(TryRecvError::Disconnected) => {
                    if self.load_error.is_none() && self.info.is_none() {
                        self.load_error = Some("the inference thread stopped".into());
                    }
                    self.pending = 0;
                    return changed;
                }
            }
            changed = true;
        }
    }
}

fn worker(dir: &Path, jobs: &Receiver<Request>, answer: &Sender<Reply>) {
    let device = Default::default();
    let run = match TrainedRun::<NdArray>::load(dir, &device) {
        Ok(run) => run,
        Err(e) => {
            let _ = answer.send(Reply::Loaded(Err(e.to_string())));
            return;
        }
    };
    let info = RunInfo {
        dir: dir.to_path_buf(),
        mode: run.mode().name().to_string(),
        step: run.step,
        experts: run.config.model.experts,
        target: run.config.routing.target,
        trained: run.trained_compute().describe(),
        eval_points: eval_points(dir),
    };
    if answer.send(Reply::Loaded(Ok(info))).is_err() {
        return;
    }
    let mut calibrated: HashMap<u64, Compute> = HashMap::new();
    while let Ok(mut request) = jobs.recv() {
        // Only the newest of several queued requests is worth answering.
        let mut skipped = 0;
        while let Ok(newer) = jobs.try_recv() {
            request = newer;
            skipped += 1;
        }
        for _ in 0..skipped {
            let _ = answer.send(Reply::Generated(Box::new(Err("superseded".into()))));
        }
        let result = answer_request(&run, &mut calibrated, &request).map_err(|e| e.to_string());
        if answer.send(Reply::Generated(Box::new(result))).is_err() {
            return;
        }
    }
}

fn answer_request(
    run: &TrainedRun<NdArray>,
    calibrated: &mut HashMap<u64, Compute>,
    request: &Request,
) -> dtopp::Result<Generated> {
    let compute = match request.compute {
        ComputeChoice::Trained => run.trained_compute(),
        ComputeChoice::Target(target) => match calibrated.get(&target.to_bits()) {
            Some(c) => c.clone(),
            None => {
                let found = run.calibrate_default(target)?.compute;
                calibrated.insert(target.to_bits(), found.clone());
                found
            }
        },
    };
    let prompt: Vec<u32> = request.prompt.bytes().map(u32::from).collect();
    let options = GenerateOptions {
        tokens: request.tokens,
        temperature: request.temperature,
        top_k: None,
        seed: request.seed,
        cache: true,
    };
    let generation = generate(
        &run.model,
        run.config.model.seq_len,
        &run.plan(&compute),
        &prompt,
        &options,
        |_| {},
    )?;
    let text_corpus = run.byte_tokens();
    Ok(Generated {
        request: request.clone(),
        compute: compute.describe(),
        sample: as_sample(&generation, text_corpus),
        prompt_tokens: prompt.len(),
        active: mean_generated(&generation),
        tokens_per_second: generation.tokens_per_second(),
    })
}

/// The generation in the tokens view's form.
fn as_sample(generation: &Generation, text_corpus: bool) -> RoutingSample {
    let tokens = &generation.tokens;
    let layers = tokens.first().map_or(0, |t| t.experts.len());
    RoutingSample {
        step: 0,
        tokens: tokens.iter().map(|t| t.token).collect(),
        text: tokens
            .iter()
            .map(|t| {
                if text_corpus {
                    printable_byte(t.token as u8)
                } else {
                    format!("#{}", t.token)
                }
            })
            .collect(),
        difficulty: None,
        experts: (0..layers)
            .map(|l| tokens.iter().map(|t| t.experts[l].clone()).collect())
            .collect(),
        probs: (0..layers)
            .map(|l| tokens.iter().map(|t| t.probs[l].clone()).collect())
            .collect(),
    }
}

fn mean_generated(generation: &Generation) -> f64 {
    let generated: Vec<f64> = generation
        .tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| t.mean_experts())
        .collect();
    generated.iter().sum::<f64>() / generated.len().max(1) as f64
}

/// `(active, loss)` of every point in the run's `eval.json`, if it has a readable one.
fn eval_points(dir: &Path) -> Vec<(f64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join("eval.json")) else {
        return Vec::new();
    };
    let Ok(report) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    report["points"]
        .as_array()
        .map(|points| {
            let mut xy: Vec<(f64, f64)> = points
                .iter()
                .filter_map(|p| Some((p["active"].as_f64()?, p["loss"].as_f64()?)))
                .collect();
            xy.sort_by(|a, b| a.0.total_cmp(&b.0));
            xy
        })
        .unwrap_or_default()
}
