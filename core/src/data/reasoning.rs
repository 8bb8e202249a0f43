//! `synthetic:reasoning`: a built-in language whose tokens are either determined by the
//! context (0 bits) but need different amounts of work to find, or irreducibly random,
//! each labelled with its class.
//!
//! The built-in `synthetic` language's hard tokens are random noise: their difficulty is
//! entropy, which more experts cannot reduce. The paper's claim is about tokens that
//! need more *computation*. Here every determined target needs a known number of steps:
//!
//! | segment | tokens | the determined target needs |
//! |---|---|---|
//! | bind | `BIND k v` | nothing: `k` and `v` are random (the binding is remembered) |
//! | copy | `COPY x x` | the previous token ([`TokenClass::Copy`]) |
//! | recall | `RECALL k v` | one lookup: the value last bound to `k` in the window ([`TokenClass::Recall`]) |
//! | sum | `SUMn k1 .. kn r` | `n` lookups (2-4) and their sum modulo the value alphabet ([`TokenClass::Compose`]) |
//! | filler | `f f f f` | nothing: each is random ([`TokenClass::Random`]) |
//!
//! Markers, keys, bound values, copied symbols and filler are drawn at random: they are
//! [`TokenClass::Random`], with their entropy given the generator's state as difficulty.
//! Every window is its own stream, so every binding a target depends on lies inside the
//! window, before it. The vocabulary is laid out as markers, keys, values, filler.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Token ids of the markers.
pub const BIND: u32 = 0;
/// `COPY x x`.
pub const COPY: u32 = 1;
/// `RECALL k v`.
pub const RECALL: u32 = 2;
/// `SUM2`; `SUM3` and `SUM4` follow (`SUM2 + n - 2`).
pub const SUM2: u32 = 3;
/// Ids below this are markers (3 of them sums).
pub const MARKERS: u32 = 6;

/// The most keys one sum reads.
const MAX_SUM: usize = 4;
/// The segment mix once a key is bound: bind, copy, recall, sum, filler.
const MIX: [f64; 5] = [0.25, 0.15, 0.25, 0.2, 0.15];

/// What a target token needs to be predicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum TokenClass {
    /// Drawn at random: nothing in the context determines it (irreducible).
    Random = 0,
    /// The previous token.
    Copy = 1,
    /// One lookup of a binding seen earlier in the window.
    Recall = 2,
    /// Several lookups combined (a sum modulo the value alphabet).
    Compose = 3,
}

impl TokenClass {
    /// Every class, in label order.
    pub const ALL: [TokenClass; 4] = [Self::Random, Self::Copy, Self::Recall, Self::Compose];

    /// The class's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Copy => "copy",
            Self::Recall => "recall",
            Self::Compose => "compose",
        }
    }
}

/// Shape of the reasoning language (`[data.reasoning]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningConfig {
    /// Vocabulary size: 6 markers, then keys, values and the filler alphabet.
    pub vocab: usize,
    /// Distinct keys.
    pub keys: usize,
    /// Distinct values (bound values, copied symbols and sums live here).
    pub values: usize,
    /// Tokens per filler run.
    pub filler_len: usize,
}

impl Default for ReasoningConfig {
    fn default() -> Self {
        Self {
            vocab: 256,
            keys: 24,
            values: 24,
            filler_len: 4,
        }
    }
}

impl ReasoningConfig {
    /// Checks the sizes, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.keys <= MAX_SUM {
            return Err(Error::param(
                "data.reasoning.keys",
                self.keys,
                format!(
                    "at least {} (a sum reads up to {MAX_SUM} distinct keys, chosen among more)",
                    MAX_SUM + 1
                ),
            ));
        }
        if self.values < 2 {
            return Err(Error::param(
                "data.reasoning.values",
                self.values,
                "at least 2",
            ));
        }
        if self.filler_len < 1 {
            return Err(Error::param("data.reasoning.filler_len", 0, "at least 1"));
        }
        let used = MARKERS as usize + self.keys + self.values;
        if self.vocab < used + 2 {
            return Err(Error::param(
                "data.reasoning.vocab",
                self.vocab,
                format!(
                    "at least 6 markers + keys + values + 2 filler ids = {}",
                    used + 2
                ),
            ));
        }
        Ok(())
    }

    /// The first key id.
    pub fn key_base(&self) -> u32 {
        MARKERS
    }

    /// The first value id.
    pub fn value_base(&self) -> u32 {
        MARKERS + self.keys as u32
    }

    /// The first filler id.
    pub fn filler_base(&self) -> u32 {
        self.value_base() + self.values as u32
    }
}

/// A generated stream: tokens, the entropy of each given the past, and its class.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledStream {
    /// Token ids, `< vocab`.
    pub tokens: Vec<u32>,
    /// Entropy in bits of each token given the past (0 for determined tokens).
    pub difficulty: Vec<f32>,
    /// What each token needs to be predicted.
    pub class: Vec<TokenClass>,
}

impl LabelledStream {
    fn push(&mut self, token: u32, bits: f64, class: TokenClass) {
        self.tokens.push(token);
        self.difficulty.push(bits as f32);
        self.class.push(class);
    }
}

/// The reasoning language.
#[derive(Clone, Debug)]
pub struct ReasoningLanguage {
    config: ReasoningConfig,
}

impl ReasoningLanguage {
    /// The language `config` describes.
    pub fn new(config: ReasoningConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The settings.
    pub fn config(&self) -> &ReasoningConfig {
        &self.config
    }

    /// `len` tokens of the stream with seed `stream_seed`, starting with no binding.
    pub fn generate(&self, len: usize, stream_seed: u64) -> LabelledStream {
        let c = &self.config;
        let mut rng = SplitMix64::substream(0x4EA5, stream_seed, 0x5EED);
        let (keys, values) = (c.value_base() - c.key_base(), c.values as u32);
        let filler = c.vocab as u32 - c.filler_base();
        let mut bound: Vec<Option<u32>> = vec![None; c.keys];
        let mut out = LabelledStream {
            tokens: Vec::with_capacity(len + 8),
            difficulty: Vec::with_capacity(len + 8),
            class: Vec::with_capacity(len + 8),
        };
        let random = TokenClass::Random;
        while out.tokens.len() < len {
            let known: Vec<u32> = (0..keys).filter(|&k| bound[k as usize].is_some()).collect();
            // Segments that can run now, and the entropy of choosing among them.
            let mut weights = MIX;
            // A random token always has a choice: a recall picks among two keys or more,
            // a sum's last key among two or more (otherwise they would be determined
            // and mislabelled).
            if known.is_empty() {
                weights = [1.0, 0.0, 0.0, 0.0, 0.0];
            }
            if known.len() < 2 {
                weights[2] = 0.0;
            }
            if known.len() < 3 {
                weights[3] = 0.0;
            }
            let largest_sum = (known.len().saturating_sub(1)).min(MAX_SUM);
            let choice = pick(&mut rng, &weights);
            let choice_bits = entropy(&weights);
            let value_of = |k: u32, bound: &[Option<u32>]| bound[k as usize].unwrap_or(0);
            match choice {
                0 => {
                    let k = rng.below(keys as usize) as u32;
                    let v = rng.below(values as usize) as u32;
                    out.push(BIND, choice_bits, random);
                    out.push(c.key_base() + k, f64::from(keys).log2(), random);
                    out.push(c.value_base() + v, f64::from(values).log2(), random);
                    bound[k as usize] = Some(v);
                }
                1 => {
                    let x = c.value_base() + rng.below(values as usize) as u32;
                    out.push(COPY, choice_bits, random);
                    out.push(x, f64::from(values).log2(), random);
                    out.push(x, 0.0, TokenClass::Copy);
                }
                2 => {
                    let k = known[rng.below(known.len())];
                    out.push(RECALL, choice_bits, random);
                    out.push(c.key_base() + k, (known.len() as f64).log2(), random);
                    out.push(
                        c.value_base() + value_of(k, &bound),
                        0.0,
                        TokenClass::Recall,
                    );
                }
                3 => {
                    // The sum's size is part of the choice: uniform over what fits.
                    let sizes = largest_sum - 1;
                    let n = 2 + rng.below(sizes);
                    let bits = choice_bits + (sizes as f64).log2();
                    out.push(SUM2 + n as u32 - 2, bits, random);
                    let mut pool = known.clone();
                    let mut sum = 0;
                    for _ in 0..n {
                        let k = pool.swap_remove(rng.below(pool.len()));
                        out.push(c.key_base() + k, ((pool.len() + 1) as f64).log2(), random);
                        sum = (sum + value_of(k, &bound)) % values;
                    }
                    out.push(c.value_base() + sum, 0.0, TokenClass::Compose);
                }
                _ => {
                    for i in 0..c.filler_len {
                        let f = c.filler_base() + rng.below(filler as usize) as u32;
                        let bits =
                            f64::from(filler).log2() + if i == 0 { choice_bits } else { 0.0 };
                        out.push(f, bits, random);
                    }
                }
            }
        }
        out.tokens.truncate(len);
        out.difficulty.truncate(len);
        out.class.truncate(len);
        out
    }
}

/// An index drawn with probability proportional to `weights`.
fn pick(rng: &mut SplitMix64, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Entropy in bits of choosing by `weights`.
fn entropy(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().sum();
    weights
        .iter()
        .filter(|&&w| w > 0.0)
        .map(|&w| {
            let p = w / total;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{
        BIND, COPY, MARKERS, RECALL, ReasoningConfig, ReasoningLanguage, SUM2, TokenClass,
    };

    /// What a reader of the grammar expects next.
    enum Expect {
        Marker,
        BindKey,
        BindValue(u32),
        CopySymbol,
        CopyTarget(u32),
        RecallKey,
        RecallValue(u32),
        SumKeys { left: usize, sum: u32 },
        SumResult(u32),
        Filler(usize),
    }

    /// Predicts each token from the tokens before it, knowing only the grammar (not the
    /// generator): `Some(token)` where the context determines it.
    fn solve(tokens: &[u32], c: &ReasoningConfig) -> Vec<Option<u32>> {
        let (v0, f0) = (c.value_base(), c.filler_base());
        let mut table: HashMap<u32, u32> = HashMap::new();
        let mut expect = Expect::Marker;
        let mut predictions = Vec::with_capacity(tokens.len());
        for &t in tokens {
            predictions.push(match expect {
                Expect::CopyTarget(x) => Some(x),
                Expect::RecallValue(k) => Some(v0 + table[&k]),
                Expect::SumResult(sum) => Some(v0 + sum),
                _ => None,
            });
            expect = match expect {
                Expect::Marker | Expect::Filler(0) => match t {
                    BIND => Expect::BindKey,
                    COPY => Expect::CopySymbol,
                    RECALL => Expect::RecallKey,
                    t if (SUM2..MARKERS).contains(&t) => Expect::SumKeys {
                        left: (t - SUM2 + 2) as usize,
                        sum: 0,
                    },
                    t => {
                        assert!(t >= f0, "a segment starts with a marker or filler: {t}");
                        Expect::Filler(c.filler_len - 1)
                    }
                },
                Expect::Filler(left) => Expect::Filler(left - 1),
                Expect::BindKey => Expect::BindValue(t),
                Expect::BindValue(k) => {
                    table.insert(k, t - v0);
                    Expect::Marker
                }
                Expect::CopySymbol => Expect::CopyTarget(t),
                Expect::RecallKey => Expect::RecallValue(t),
                Expect::SumKeys { left, sum } => {
                    let sum = (sum + table[&t]) % c.values as u32;
                    if left == 1 {
                        Expect::SumResult(sum)
                    } else {
                        Expect::SumKeys {
                            left: left - 1,
                            sum,
                        }
                    }
                }
                Expect::CopyTarget(_) | Expect::RecallValue(_) | Expect::SumResult(_) => {
                    Expect::Marker
                }
            };
        }
        predictions
    }

    #[test]
    fn a_solver_of_the_grammar_predicts_every_determined_token_and_no_other() {
        for config in [
            ReasoningConfig::default(),
            // Few keys (sums use every one), odd sizes, one-token filler runs.
            ReasoningConfig {
                vocab: 31,
                keys: 5,
                values: 7,
                filler_len: 1,
            },
        ] {
            let lang = ReasoningLanguage::new(config.clone()).unwrap();
            let mut counts = HashMap::new();
            for seed in 0..20 {
                let s = lang.generate(2_000, seed);
                assert!(s.tokens.iter().all(|&t| (t as usize) < config.vocab));
                let predicted = solve(&s.tokens, &config);
                for (i, (p, class)) in predicted.iter().zip(&s.class).enumerate() {
                    *counts.entry(*class).or_insert(0usize) += 1;
                    match class {
                        TokenClass::Random => {
                            assert_eq!(*p, None, "token {i} is labelled random");
                            // Irreducible: it carries information (the stream's first
                            // token, the first binding's marker, excepted).
                            assert!(i == 0 || s.difficulty[i] > 0.0, "token {i}");
                        }
                        _ => {
                            assert_eq!(*p, Some(s.tokens[i]), "token {i} ({class:?})");
                            assert_eq!(s.difficulty[i], 0.0);
                        }
                    }
                }
            }
            // Every class is there in a useful share (the mix: 25% of segments recall,
            // 20% sums, 15% copies).
            let total: usize = counts.values().sum();
            for class in TokenClass::ALL {
                let share = counts.get(&class).copied().unwrap_or(0) as f64 / total as f64;
                assert!(share > 0.03, "{class:?}: {share} of {total}");
            }
        }
    }

    #[test]
    fn streams_are_deterministic_per_seed() {
        let lang = ReasoningLanguage::new(ReasoningConfig::default()).unwrap();
        assert_eq!(lang.generate(500, 7), lang.generate(500, 7));
        assert_ne!(lang.generate(500, 7).tokens, lang.generate(500, 8).tokens);
        // A prefix is the start of the longer stream.
        assert_eq!(
            lang.generate(100, 7).tokens,
            lang.generate(500, 7).tokens[..100]
        );
    }

    #[test]
    fn bad_sizes_are_refused_by_name() {
        let bad = |c: ReasoningConfig| ReasoningLanguage::new(c).unwrap_err().to_string();
        let base = ReasoningConfig::default();
        assert!(
            bad(ReasoningConfig {
                keys: 3,
                ..base.clone()
            })
            .contains("data.reasoning.keys")
        );
        assert!(
            bad(ReasoningConfig {
                vocab: 40,
                ..base.clone()
            })
            .contains("data.reasoning.vocab")
        );
        assert!(
            bad(ReasoningConfig {
                filler_len: 0,
                ..base
            })
            .contains("filler_len")
        );
    }
}
