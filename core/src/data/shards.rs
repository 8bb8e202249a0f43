//! Pre-tokenized corpora in the llm.c / nanoGPT binary shard format: a header of 256
//! little-endian int32 (`[0]` magic 20240520, `[1]` version 1, `[2]` token count), then
//! that many little-endian uint16 tokens. A corpus is a glob of such files (for example
//! `fineweb_train_*.bin` from llm.c's `dev/data/fineweb.py`). Shards are memory-mapped:
//! a window is read where it lies, nothing is loaded up front, so corpora far larger than
//! memory train.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// `header[0]` of every shard.
pub const SHARD_MAGIC: i32 = 20240520;
/// `header[1]`: uint16 tokens (GPT-2 / GPT-NeoX-sized vocabularies up to 65536).
pub const SHARD_VERSION: i32 = 1;
/// int32 values in the header.
pub const HEADER_INTS: usize = 256;
const HEADER_BYTES: usize = HEADER_INTS * 4;

/// One memory-mapped shard whose header and size were checked.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    map: memmap2::Mmap,
    tokens: usize,
}

impl TokenShard {
    /// Maps `path` and checks magic, version, and that the size matches the count.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Array {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| Error::io("cannot open token shard", path, e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("cannot read the size of", path, e))?
            .len() as usize;
        if size < HEADER_BYTES {
            return Err(bad(format!(
                "{size} bytes is shorter than the {HEADER_BYTES}-byte llm.c shard header: not a token shard, or truncated"
            )));
        }
        let map = map_read_only(&file).map_err(|e| Error::io("cannot memory-map", path, e))?;
        let int = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        let (magic, version, count) = (int(0), int(1), int(2));
        if magic != SHARD_MAGIC {
            return Err(bad(format!(
                "header magic is {magic}, expected {SHARD_MAGIC} (an llm.c / nanoGPT token shard)"
            )));
        }
        if version != SHARD_VERSION {
            return Err(bad(format!(
                "shard version {version} is not supported: expected {SHARD_VERSION} (uint16 tokens)"
            )));
        }
        if count < 0 {
            return Err(bad(format!("negative token count {count} in the header")));
        }
        let expected = HEADER_BYTES + 2 * count as usize;
        if size != expected {
            return Err(bad(format!(
                "the header promises {count} tokens ({expected} bytes with the header) but the file has {size} bytes: truncated or corrupted"
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tokens: count as usize,
        })
    }

    /// Tokens in the shard.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Whether the shard holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens `start..start + len`, each checked against the vocabulary.
    pub fn read(&self, start: usize, len: usize, vocab: usize) -> Result<Vec<u32>> {
        assert!(start + len <= self.tokens, "window outside the shard");
        let bytes = &self.map[HEADER_BYTES + 2 * start..HEADER_BYTES + 2 * (start + len)];
        let tokens: Vec<u32> = bytes
            .chunks_exact(2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        if let Some(i) = tokens.iter().position(|&t| t as usize >= vocab) {
            return Err(Error::Array {
                path: self.path.clone(),
                message: format!(
                    "token {} at position {} is outside the model's vocabulary (model.vocab = {vocab})",
                    tokens[i],
                    start + i
                ),
            });
        }
        Ok(tokens)
    }
}

// The one unsafe block of the data path: mapping a file is unsafe because another
// process could truncate it while mapped (reads would then fault). Token shards are
// read-only inputs that nothing rewrites during training; the size was checked above.
#[allow(unsafe_code)]
fn map_read_only(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see above; the map is only ever read.
    unsafe { memmap2::Mmap::map(file) }
}

/// Writes `tokens` as one shard, atomically (tests, and converting other corpora).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<()> {
    let mut header = [0i32; HEADER_INTS];
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = i32::try_from(tokens.len())
        .map_err(|_| Error::param("tokens in one shard", tokens.len(), "below 2^31"))?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    for v in header {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    crate::io::write_atomic(path, &bytes)
}

/// The files a pattern names: a path, or a glob pattern (`*`, `?`, `[...]`, `**`; the
/// `glob` crate's rules); sorted by name.
pub fn expand_pattern(pattern: &str) -> Result<Vec<PathBuf>> {
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![PathBuf::from(pattern)]);
    }
    let paths = glob::glob(pattern).map_err(|e| {
        Error::param(
            "shard pattern",
            pattern,
            format!("a glob pattern such as data/fineweb_train_*.bin ({e})"),
        )
    })?;
    let mut found = Vec::new();
    for entry in paths {
        match entry {
            Ok(path) if path.is_file() => found.push(path),
            Ok(_) => {}
            Err(e) => {
                let path = e.path().to_path_buf();
                return Err(Error::io("cannot list", path, e.into()));
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(Error::param(
            "shard pattern",
            pattern,
            "a pattern matching at least one file",
        ));
    }
    Ok(found)
}

/// Token ranges of shards that windows are drawn from.
#[derive(Clone, Debug)]
pub struct ShardSet {
    parts: Vec<(Arc<TokenShard>, std::ops::Range<usize>)>,
    // Cumulative count of window starts, to pick a window uniformly over all parts.
    starts: Vec<usize>,
    window: usize,
}

impl ShardSet {
    fn new(parts: Vec<(Arc<TokenShard>, std::ops::Range<usize>)>, window: usize) -> Option<Self> {
        let parts: Vec<_> = parts
            .into_iter()
            .filter(|(_, r)| r.len() >= window)
            .collect();
        let mut starts = Vec::with_capacity(parts.len());
        let mut total = 0;
        for (_, r) in &parts {
            total += r.len() - window + 1;
            starts.push(total);
        }
        (total > 0).then_some(Self {
            parts,
            starts,
            window,
        })
    }

    /// Tokens windows can come from.
    pub fn tokens(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }

    /// Different windows there are.
    pub fn windows(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }

    /// Window number `index % windows()`, checked against `vocab`.
    pub fn window(&self, index: usize, vocab: usize) -> Result<Vec<u32>> {
        let i = index % self.windows();
        let part = self.starts.partition_point(|&s| s <= i);
        let before = if part == 0 { 0 } else { self.starts[part - 1] };
        let (shard, range) = &self.parts[part];
        shard.read(range.start + (i - before), self.window, vocab)
    }
}

/// A training set and a validation set of shards.
#[derive(Debug)]
pub struct ShardCorpus {
    /// Training windows.
    pub train: ShardSet,
    /// Validation windows.
    pub validation: ShardSet,
    /// Shard files opened.
    pub files: usize,
}

impl ShardCorpus {
    /// Opens the shards `train` names; validation comes from the shards `validation`
    /// names, or else from the last `val_fraction` of the last training shard (which
    /// training then leaves out). `window` is tokens per window (sequence + 1).
    pub fn open(
        train: &str,
        validation: Option<&str>,
        val_fraction: f64,
        window: usize,
    ) -> Result<Self> {
        let open_all = |pattern: &str| -> Result<Vec<Arc<TokenShard>>> {
            expand_pattern(pattern)?
                .iter()
                .map(|p| TokenShard::open(p).map(Arc::new))
                .collect()
        };
        let whole = |s: &Arc<TokenShard>| (s.clone(), 0..s.len());
        let train_shards = open_all(train)?;
        let mut files = train_shards.len();
        let (train_parts, val_parts) = match validation {
            Some(pattern) => {
                let val = open_all(pattern)?;
                files += val.len();
                (
                    train_shards.iter().map(whole).collect::<Vec<_>>(),
                    val.iter().map(whole).collect(),
                )
            }
            None => {
                let last = train_shards.last().expect("expand_pattern returns files");
                let split = last.len() - (last.len() as f64 * val_fraction).round() as usize;
                let mut parts: Vec<_> = train_shards.iter().map(whole).collect();
                parts.last_mut().expect("one shard at least").1 = 0..split;
                (parts, vec![(last.clone(), split..last.len())])
            }
        };
        let short = |what: &'static str, pattern: &str| {
            Error::param(
                what,
                pattern,
                format!(
                    "shards holding at least one window of {window} tokens (model.seq_len + 1)"
                ),
            )
        };
        Ok(Self {
            train: ShardSet::new(train_parts, window)
                .ok_or_else(|| short("training shards", train))?,
            validation: ShardSet::new(val_parts, window).ok_or_else(|| {
                short(
                    "validation shards",
                    validation.unwrap_or("the tail of the last training shard"),
                )
            })?,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dtopp-shards-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn windows_read_back_what_was_written_across_shards() {
        let d = dir("roundtrip");
        write_shard(&d.join("c_train_000.bin"), &(0..100).collect::<Vec<u16>>()).unwrap();
        write_shard(
            &d.join("c_train_001.bin"),
            &(100..150).collect::<Vec<u16>>(),
        )
        .unwrap();
        write_shard(&d.join("c_val_000.bin"), &(500..540).collect::<Vec<u16>>()).unwrap();
        let pattern = d.join("c_train_*.bin");
        let corpus = ShardCorpus::open(
            pattern.to_str().unwrap(),
            Some(d.join("c_val_*.bin").to_str().unwrap()),
            0.1,
            11,
        )
        .unwrap();
        assert_eq!(corpus.files, 3);
        assert_eq!(corpus.train.tokens(), 150);
        // 90 windows in the first shard, 40 in the second; none crosses a boundary.
        assert_eq!(corpus.train.windows(), 130);
        assert_eq!(
            corpus.train.window(0, 1000).unwrap(),
            (0..11).collect::<Vec<u32>>()
        );
        assert_eq!(
            corpus.train.window(90, 1000).unwrap(),
            (100..111).collect::<Vec<u32>>()
        );
        assert_eq!(
            corpus.train.window(129, 1000).unwrap(),
            (139..150).collect::<Vec<u32>>()
        );
        assert_eq!(corpus.validation.window(0, 1000).unwrap()[0], 500);
        let err = corpus.train.window(0, 5).unwrap_err().to_string();
        assert!(err.contains("outside the model's vocabulary"), "{err}");

        // Without a validation pattern the last shard's tail is held out.
        let split = ShardCorpus::open(pattern.to_str().unwrap(), None, 0.4, 11).unwrap();
        assert_eq!(split.train.tokens(), 130);
        assert_eq!(split.validation.window(0, 1000).unwrap()[0], 130);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_shards_are_named() {
        let d = dir("bad");
        let good = d.join("good.bin");
        write_shard(&good, &[1, 2, 3, 4]).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short.bin", bytes[..100].to_vec(), "shorter than"),
            (
                "truncated.bin",
                bytes[..bytes.len() - 2].to_vec(),
                "truncated or corrupted",
            ),
            (
                "magic.bin",
                [&[0u8; 4][..], &bytes[4..]].concat(),
                "header magic is 0",
            ),
            (
                "version.bin",
                [&bytes[..4], &7i32.to_le_bytes()[..], &bytes[8..]].concat(),
                "version 7 is not supported",
            ),
        ];
        for (name, content, expected) in cases {
            let path = d.join(name);
            std::fs::write(&path, content).unwrap();
            let err = TokenShard::open(&path).unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains(name),
                "{name}: {err}"
            );
        }
        let none = ShardCorpus::open(d.join("nothing_*.bin").to_str().unwrap(), None, 0.1, 3);
        assert!(
            none.unwrap_err()
                .to_string()
                .contains("matching at least one file")
        );
        let tiny = ShardCorpus::open(good.to_str().unwrap(), None, 0.5, 64);
        assert!(
            tiny.unwrap_err()
                .to_string()
                .contains("at least one window of 64 tokens")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn patterns_follow_glob_rules() {
        let d = std::env::temp_dir().join(format!("dtopp-glob-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        for name in [
            "a_train_01.bin",
            "a_train_011.bin",
            "x.bin.tmp",
            "sub/b_02.bin",
        ] {
            std::fs::write(d.join(name), b"").unwrap();
        }
        let names = |pattern: &str| -> Vec<String> {
            expand_pattern(&format!("{}/{pattern}", d.display()))
                .unwrap()
                .iter()
                .map(|p| p.strip_prefix(&d).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(names("a_*_0?.bin"), ["a_train_01.bin"]);
        assert_eq!(names("*.bin"), ["a_train_01.bin", "a_train_011.bin"]);
        assert_eq!(names("**/*_0?.bin"), ["a_train_01.bin", "sub/b_02.bin"]);
        let bad = expand_pattern(&format!("{}/[.bin", d.display())).unwrap_err();
        assert!(bad.to_string().contains("glob pattern"), "{bad}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
