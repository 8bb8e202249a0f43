//! Batches of next-token prediction windows, deterministic from the seed and the step
//! (so a resumed run sees the same data as an uninterrupted one): the built-in
//! synthetic language, a byte-level text file or token shards, each with a fixed
//! validation set.

use std::path::Path;

use super::config::{REASONING_SOURCE, SHARDS_PREFIX, TrainConfig};
use crate::data::{ReasoningLanguage, ShardCorpus, SyntheticLanguage, TextCorpus};
use crate::error::Result;
use crate::rng::SplitMix64;

/// `B` windows of `S` input tokens and their `S` next tokens, row-major `[B, S]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// `[B, S]` input tokens.
    pub inputs: Vec<i64>,
    /// `[B, S]` target tokens (inputs shifted by one).
    pub targets: Vec<i64>,
    /// `[B, S]` difficulty in bits of each target (synthetic corpora only).
    pub difficulty: Option<Vec<f32>>,
    /// `[B, S]` class of each target ([`crate::data::TokenClass`] as `u8`;
    /// `synthetic:reasoning` only).
    pub classes: Option<Vec<u8>>,
}

/// Where training windows come from.
#[derive(Debug)]
pub enum Corpus {
    /// The built-in synthetic language; every window is its own stream.
    Synthetic(SyntheticLanguage),
    /// The built-in reasoning language; every window is its own stream.
    Reasoning(ReasoningLanguage),
    /// A byte-level text file, windows at random offsets of the training split.
    Text(TextCorpus),
    /// Token shards, windows at random places of the training shards; tokens are
    /// checked against the vocabulary as they are read.
    Shards {
        /// The shards.
        corpus: ShardCorpus,
        /// `model.vocab`.
        vocab: usize,
    },
}

/// Stream seeds of validation windows live far from those of training windows.
const VALIDATION_STREAMS: u64 = 1 << 62;

impl Corpus {
    /// Opens the corpus a config names (`"synthetic"` or a file path).
    pub fn open(config: &TrainConfig) -> Result<Self> {
        let data = &config.data;
        if data.source == "synthetic" {
            Ok(Corpus::Synthetic(SyntheticLanguage::new(
                data.synthetic.clone(),
            )?))
        } else if data.source == REASONING_SOURCE {
            Ok(Corpus::Reasoning(ReasoningLanguage::new(
                data.reasoning.clone(),
            )?))
        } else if let Some(train) = data.source.strip_prefix(SHARDS_PREFIX) {
            let validation = data
                .validation
                .as_deref()
                .map(|v| v.strip_prefix(SHARDS_PREFIX).unwrap_or(v));
            Ok(Corpus::Shards {
                corpus: ShardCorpus::open(
                    train,
                    validation,
                    data.val_fraction,
                    config.model.seq_len + 1,
                )?,
                vocab: config.model.vocab,
            })
        } else {
            let min = config.model.seq_len + 1;
            Ok(Corpus::Text(TextCorpus::load(
                Path::new(&data.source),
                data.val_fraction,
                min,
            )?))
        }
    }

    /// A short description for the log.
    pub fn describe(&self) -> String {
        match self {
            Corpus::Synthetic(lang) => {
                let c = lang.config();
                format!(
                    "synthetic language (vocab {}, {} phrases of {} tokens, noise runs of {} with p = {})",
                    c.vocab, c.phrases, c.phrase_len, c.noise_len, c.noise_prob
                )
            }
            Corpus::Reasoning(lang) => {
                let c = lang.config();
                format!(
                    "synthetic:reasoning (vocab {}, {} keys, {} values; copy, recall and 2-4 composed lookups among random tokens)",
                    c.vocab, c.keys, c.values
                )
            }
            Corpus::Text(text) => format!(
                "byte-level text: {} training and {} validation tokens",
                text.train.len(),
                text.validation.len()
            ),
            Corpus::Shards { corpus, .. } => format!(
                "token shards: {} files, {} training and {} validation tokens (memory-mapped)",
                corpus.files,
                corpus.train.tokens(),
                corpus.validation.tokens()
            ),
        }
    }

    /// Micro-batch `micro` of optimizer step `step` (1-based).
    pub fn train_batch(
        &self,
        seed: u64,
        step: u64,
        micro: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Batch> {
        // Windows are numbered by their place in the whole optimizer step, so `grad_accum`
        // micro-batches of `B` see the same windows as one batch of `grad_accum * B`.
        let window = |b: usize| {
            let index = step * 1_000_003 + (micro * batch + b) as u64;
            match self {
                Corpus::Synthetic(lang) => Ok(synthetic_window(lang, seed, index, seq_len)),
                Corpus::Reasoning(lang) => Ok(reasoning_window(lang, seed, index, seq_len)),
                Corpus::Text(text) => {
                    let mut rng = SplitMix64::substream(seed, index, 0x7E47);
                    let start = rng.below(text.train.len() - seq_len);
                    Ok(Window::tokens(
                        text.train[start..start + seq_len + 1].to_vec(),
                    ))
                }
                Corpus::Shards { corpus, vocab } => {
                    let mut rng = SplitMix64::substream(seed, index, 0x7E47);
                    let n = rng.below(corpus.train.windows());
                    Ok(Window::tokens(corpus.train.window(n, *vocab)?))
                }
            }
        };
        assemble(batch, seq_len, window)
    }

    /// Validation batch `index`: the same windows at every evaluation.
    pub fn validation_batch(
        &self,
        seed: u64,
        index: usize,
        batch: usize,
        seq_len: usize,
    ) -> Result<Batch> {
        let window = |b: usize| {
            let n = (index * batch + b) as u64;
            match self {
                Corpus::Synthetic(lang) => Ok(synthetic_window(
                    lang,
                    seed,
                    VALIDATION_STREAMS + n,
                    seq_len,
                )),
                Corpus::Reasoning(lang) => Ok(reasoning_window(
                    lang,
                    seed,
                    VALIDATION_STREAMS + n,
                    seq_len,
                )),
                Corpus::Text(text) => {
                    // Evenly spaced windows over the validation split, wrapping around.
                    let span = text.validation.len() - seq_len;
                    let start = (n as usize * (seq_len / 2 + 1)) % span;
                    Ok(Window::tokens(
                        text.validation[start..start + seq_len + 1].to_vec(),
                    ))
                }
                Corpus::Shards { corpus, vocab } => {
                    // Windows half a sequence apart from the start of the validation set.
                    let n = n as usize * (seq_len / 2 + 1);
                    Ok(Window::tokens(corpus.validation.window(n, *vocab)?))
                }
            }
        };
        assemble(batch, seq_len, window)
    }
}

fn synthetic_window(lang: &SyntheticLanguage, seed: u64, index: u64, seq_len: usize) -> Window {
    let stream = lang.generate(seq_len + 1, seed.wrapping_mul(0x9E37).wrapping_add(index));
    Window {
        tokens: stream.tokens,
        difficulty: Some(stream.difficulty),
        classes: None,
    }
}

fn reasoning_window(lang: &ReasoningLanguage, seed: u64, index: u64, seq_len: usize) -> Window {
    let stream = lang.generate(seq_len + 1, seed.wrapping_mul(0x9E37).wrapping_add(index));
    Window {
        tokens: stream.tokens,
        difficulty: Some(stream.difficulty),
        classes: Some(stream.class.into_iter().map(|c| c as u8).collect()),
    }
}

/// One window's `S + 1` tokens and, for a synthetic corpus, their labels.
struct Window {
    tokens: Vec<u32>,
    difficulty: Option<Vec<f32>>,
    classes: Option<Vec<u8>>,
}

impl Window {
    fn tokens(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            difficulty: None,
            classes: None,
        }
    }
}

fn assemble(
    batch: usize,
    seq_len: usize,
    window: impl Fn(usize) -> Result<Window>,
) -> Result<Batch> {
    let mut out = Batch {
        batch,
        seq_len,
        inputs: Vec::with_capacity(batch * seq_len),
        targets: Vec::with_capacity(batch * seq_len),
        difficulty: None,
        classes: None,
    };
    let (mut difficulty, mut classes) = (Vec::new(), Vec::new());
    for b in 0..batch {
        let w = window(b)?;
        out.inputs
            .extend(w.tokens[..seq_len].iter().map(|&t| i64::from(t)));
        out.targets
            .extend(w.tokens[1..].iter().map(|&t| i64::from(t)));
        if let Some(d) = w.difficulty {
            difficulty.extend_from_slice(&d[1..]);
        }
        if let Some(c) = w.classes {
            classes.extend_from_slice(&c[1..]);
        }
    }
    if difficulty.len() == batch * seq_len {
        out.difficulty = Some(difficulty);
    }
    if classes.len() == batch * seq_len {
        out.classes = Some(classes);
    }
    Ok(out)
}
