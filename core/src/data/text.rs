//! Plain UTF-8 (or any) text files as byte-level tokens (vocabulary 256), split into a
//! training part and a validation tail.

use std::path::Path;

use crate::error::{Error, Result};

/// A byte-level corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct TextCorpus {
    /// Training tokens (bytes).
    pub train: Vec<u32>,
    /// Validation tokens: the last `val_fraction` of the file.
    pub validation: Vec<u32>,
}

/// Vocabulary size of byte-level tokens.
pub const BYTE_VOCAB: usize = 256;

impl TextCorpus {
    /// Reads `path`; the last `val_fraction` (in (0, 1)) of its bytes is the validation
    /// split. Both splits must hold at least `min_tokens` tokens (one training window).
    pub fn load(path: &Path, val_fraction: f64, min_tokens: usize) -> Result<Self> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(Error::param(
                "validation fraction",
                val_fraction,
                "a value in (0, 1)",
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
        let split = bytes.len() - (bytes.len() as f64 * val_fraction).round() as usize;
        let (train, validation) = bytes.split_at(split);
        for (name, part) in [("training", train), ("validation", validation)] {
            if part.len() < min_tokens.max(1) {
                return Err(Error::Array {
                    path: path.to_path_buf(),
                    message: format!(
                        "the {name} split has {} byte tokens, but one sequence needs {}: use a larger file",
                        part.len(),
                        min_tokens.max(1)
                    ),
                });
            }
        }
        Ok(Self {
            train: train.iter().map(|&b| u32::from(b)).collect(),
            validation: validation.iter().map(|&b| u32::from(b)).collect(),
        })
    }
}
