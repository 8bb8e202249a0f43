//! Training data: the built-in synthetic language, byte-level text files and (feature
//! `train`) pre-tokenized llm.c / nanoGPT token shards.

mod reasoning;
#[cfg(feature = "train")]
mod shards;
mod synthetic;
mod text;

pub use reasoning::{
    BIND, COPY, LabelledStream, MARKERS, RECALL, ReasoningConfig, ReasoningLanguage, SUM2,
    TokenClass,
};
#[cfg(feature = "train")]
pub use shards::{
    HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ShardCorpus, ShardSet, TokenShard, expand_pattern,
    write_shard,
};
pub use synthetic::{SyntheticConfig, SyntheticLanguage, TokenStream};
pub use text::{BYTE_VOCAB, TextCorpus};
