//! Training data: the built-in synthetic language and byte-level text files.

mod synthetic;
mod text;

pub use synthetic::{SyntheticConfig, SyntheticLanguage, TokenStream};
pub use text::{BYTE_VOCAB, TextCorpus};
