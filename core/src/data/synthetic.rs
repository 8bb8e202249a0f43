//! The built-in synthetic language: a token stream whose every token has a known
//! difficulty, so adaptive routing has something to adapt to and runs need no download.
//!
//! The stream alternates two kinds of segment:
//! - a **phrase**: one of `phrases` fixed token sequences of length `phrase_len`. Its
//!   first token (the key) is chosen uniformly among the phrases, so it carries
//!   `log2(phrases)` bits; every later token is fully determined by the key and the
//!   position (0 bits): easy tokens a model can memorise;
//! - a **noise run**: `noise_len` tokens drawn uniformly from the noise alphabet, each
//!   carrying `log2(noise_vocab)` bits: hard tokens nothing can predict.
//!
//! Phrase tokens and noise tokens come from disjoint parts of the vocabulary, so the
//! kind of a token is visible in the data. Each token's difficulty is the entropy (in
//! bits) of its distribution given everything before it under this generator.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Shape of the synthetic language.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Vocabulary size; the first `vocab - noise_vocab` ids form the phrases.
    pub vocab: usize,
    /// Size of the noise alphabet (the last ids of the vocabulary).
    pub noise_vocab: usize,
    /// Number of distinct phrases.
    pub phrases: usize,
    /// Tokens per phrase, key included.
    pub phrase_len: usize,
    /// Probability that the next segment is a noise run rather than a phrase.
    pub noise_prob: f64,
    /// Tokens per noise run.
    pub noise_len: usize,
    /// Seed of the language itself (the phrase table).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            vocab: 256,
            noise_vocab: 64,
            phrases: 64,
            phrase_len: 12,
            noise_prob: 0.3,
            noise_len: 8,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    /// Checks sizes and the probability.
    pub fn validate(&self) -> Result<()> {
        if self.noise_vocab < 2 || self.noise_vocab + 2 > self.vocab {
            return Err(Error::param(
                "noise_vocab",
                self.noise_vocab,
                format!(
                    "at least 2 and at most vocab - 2 = {}",
                    self.vocab.saturating_sub(2)
                ),
            ));
        }
        if self.phrases < 1 || self.phrase_len < 1 || self.noise_len < 1 {
            return Err(Error::param(
                "phrases / phrase_len / noise_len",
                format!(
                    "{} / {} / {}",
                    self.phrases, self.phrase_len, self.noise_len
                ),
                "each at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.noise_prob) {
            return Err(Error::param(
                "noise_prob",
                self.noise_prob,
                "a probability in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// A generated stream: tokens and the difficulty (bits) of each.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStream {
    /// Token ids, `< vocab`.
    pub tokens: Vec<u32>,
    /// Entropy in bits of each token given the past (0 for determined tokens).
    pub difficulty: Vec<f32>,
}

/// The language: its phrase table, fixed by the config's seed.
#[derive(Clone, Debug)]
pub struct SyntheticLanguage {
    config: SyntheticConfig,
    table: Vec<Vec<u32>>,
}

impl SyntheticLanguage {
    /// Builds the phrase table. Keys are distinct, so a key identifies its phrase.
    pub fn new(config: SyntheticConfig) -> Result<Self> {
        config.validate()?;
        let phrase_ids = (config.vocab - config.noise_vocab) as u64;
        if (config.phrases as u64) > phrase_ids {
            return Err(Error::param(
                "phrases",
                config.phrases,
                format!(
                    "at most vocab - noise_vocab = {phrase_ids} (every phrase needs its own key)"
                ),
            ));
        }
        let mut rng = SplitMix64::new(config.seed);
        // Distinct keys: a shuffled prefix of the phrase ids.
        let mut keys: Vec<u32> = (0..phrase_ids as u32).collect();
        for i in (1..keys.len()).rev() {
            keys.swap(i, rng.below(i + 1));
        }
        let table = keys[..config.phrases]
            .iter()
            .map(|&key| {
                std::iter::once(key)
                    .chain((1..config.phrase_len).map(|_| rng.below(phrase_ids as usize) as u32))
                    .collect()
            })
            .collect();
        Ok(Self { config, table })
    }

    /// The settings.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// The phrase table (for tests and visualisations).
    pub fn phrases(&self) -> &[Vec<u32>] {
        &self.table
    }

    /// `len` tokens of the stream with seed `stream_seed` (train and validation use
    /// different stream seeds over the same language).
    pub fn generate(&self, len: usize, stream_seed: u64) -> TokenStream {
        let c = &self.config;
        let mut rng = SplitMix64::substream(c.seed, stream_seed, 0x5EED);
        let key_bits = (c.phrases as f32).log2();
        let noise_bits = (c.noise_vocab as f32).log2();
        // Where the segment kind is itself random, choosing it adds its entropy to the
        // segment's first token.
        let choice_bits = binary_entropy(c.noise_prob);
        let noise_base = (c.vocab - c.noise_vocab) as u32;
        let mut out = TokenStream {
            tokens: Vec::with_capacity(len),
            difficulty: Vec::with_capacity(len),
        };
        while out.tokens.len() < len {
            if rng.uniform() < c.noise_prob {
                for i in 0..c.noise_len {
                    out.tokens
                        .push(noise_base + rng.below(c.noise_vocab) as u32);
                    out.difficulty
                        .push(noise_bits + if i == 0 { choice_bits } else { 0.0 });
                }
            } else {
                let phrase = &self.table[rng.below(c.phrases)];
                for (i, &t) in phrase.iter().enumerate() {
                    out.tokens.push(t);
                    out.difficulty
                        .push(if i == 0 { key_bits + choice_bits } else { 0.0 });
                }
            }
        }
        out.tokens.truncate(len);
        out.difficulty.truncate(len);
        out
    }
}

fn binary_entropy(p: f64) -> f32 {
    if p <= 0.0 || p >= 1.0 {
        return 0.0;
    }
    (-(p * p.log2()) - (1.0 - p) * (1.0 - p).log2()) as f32
}
