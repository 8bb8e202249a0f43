//! Checkpoints: everything a run needs to continue exactly where it was — weights,
//! AdamW moments and step, the threshold policy (controller thresholds, integrals,
//! steps), the routing settings in force, and the run's bookkeeping. The data position
//! is the step itself (windows are a function of seed and step), so no RNG state is
//! needed.
//!
//! One file per checkpoint, `checkpoints/step-00000123.ckpt`:
//! `b"DTOPPCK1"`, the header length (u64 LE), the header (JSON), every parameter's f32
//! values (LE) in the model's visiting order, then the first and second moments of the
//! parameters that have them, and last a CRC-32 of everything before it. Written
//! atomically (temporary file, fsync, rename, fsync of the directory); the last
//! `keep` are kept. A checkpoint that is truncated or whose checksum does not match is
//! named and skipped in favour of the one before it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::RoutingConfig;
use crate::controller::ControllerState;
use crate::error::{Error, Result};
use crate::metrics::{ClassBucket, DifficultyBucket};
use crate::model::ModelConfig;

const MAGIC: &[u8; 8] = b"DTOPPCK1";

/// Environment variable for the crash test: when set to a step, the process aborts
/// halfway through writing that step's checkpoint (as a `kill -9` would leave it).
pub const ABORT_IN_CHECKPOINT_ENV: &str = "DTOPP_TEST_ABORT_IN_CHECKPOINT";

/// The threshold policy's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PolicyState {
    /// Top-k with this `k`.
    TopK(usize),
    /// Fixed thresholds, one per MoE layer.
    Fixed(Vec<f64>),
    /// The controller(s): one state (global) or one per layer.
    Controlled(Vec<ControllerState>),
}

/// What a checkpoint says about itself and the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// Optimizer steps taken.
    pub step: u64,
    /// The model's shape (must match the run's config on resume).
    pub model: ModelConfig,
    /// The routing settings in force (a live run may have changed them).
    pub routing: RoutingConfig,
    /// Shape of every parameter, in visiting order.
    pub shapes: Vec<Vec<usize>>,
    /// Whether each parameter has AdamW moments.
    pub has_moments: Vec<bool>,
    /// AdamW's step count.
    pub adam_step: u64,
    /// Threshold policy.
    pub policy: PolicyState,
    /// Validation loss before the first step.
    pub initial_val: f64,
    /// Latest validation loss.
    pub last_val: f64,
    /// Seconds spent training so far.
    pub busy_s: f64,
    /// The latest experts-by-difficulty table.
    pub by_difficulty: Vec<DifficultyBucket>,
    /// The latest loss-and-experts-by-class table (`synthetic:reasoning`).
    #[serde(default)]
    pub by_class: Vec<ClassBucket>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The header.
    pub header: CheckpointHeader,
    /// Parameter values, flattened, in visiting order.
    pub params: Vec<Vec<f32>>,
    /// `(first, second)` AdamW moments of the parameters that have them, in order.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Checkpoint {
    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header).map_err(|e| Error::Parse {
            what: "checkpoint header",
            message: e.to_string(),
        })?;
        let floats: usize = self.params.iter().map(Vec::len).sum::<usize>()
            + self
                .moments
                .iter()
                .map(|(a, b)| a.len() + b.len())
                .sum::<usize>();
        let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + header.len() + 4 * floats + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        let values = self
            .params
            .iter()
            .chain(self.moments.iter().flat_map(|(a, b)| [a, b]));
        for v in values {
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// Parses and verifies a checkpoint file's bytes; `path` names it in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Array {
            path: path.to_path_buf(),
            message,
        };
        if bytes.len() < MAGIC.len() + 8 + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad(
                "not a dtopp checkpoint (no DTOPPCK1 header): truncated or another file".into(),
            ));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().unwrap());
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(bad(format!(
                "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the checkpoint is truncated or corrupted"
            )));
        }
        let header_len =
            u64::from_le_bytes(body[MAGIC.len()..MAGIC.len() + 8].try_into().unwrap()) as usize;
        let start = MAGIC.len() + 8;
        if start + header_len > body.len() {
            return Err(bad("header longer than the file".into()));
        }
        let header: CheckpointHeader = serde_json::from_slice(&body[start..start + header_len])
            .map_err(|e| bad(format!("unreadable header: {e}")))?;
        let mut floats = body[start + header_len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        let sizes: Vec<usize> = header.shapes.iter().map(|s| s.iter().product()).collect();
        let expected = sizes.iter().sum::<usize>()
            + sizes
                .iter()
                .zip(&header.has_moments)
                .filter(|(_, m)| **m)
                .map(|(n, _)| 2 * n)
                .sum::<usize>();
        if body.len() - start - header_len != 4 * expected {
            return Err(bad(format!(
                "{} bytes of values, the header describes {}",
                body.len() - start - header_len,
                4 * expected
            )));
        }
        let mut take = |n: usize| -> Vec<f32> { floats.by_ref().take(n).collect() };
        let params: Vec<Vec<f32>> = sizes.iter().map(|&n| take(n)).collect();
        let moments = sizes
            .iter()
            .zip(&header.has_moments)
            .filter(|(_, m)| **m)
            .map(|(&n, _)| (take(n), take(n)))
            .collect();
        Ok(Self {
            header,
            params,
            moments,
        })
    }
}

/// The checkpoint folder of a run directory.
pub fn checkpoint_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn file_name(step: u64) -> String {
    format!("step-{step:08}.ckpt")
}

/// Checkpoint files of a run, newest first, by the step in their name.
pub fn list_checkpoints(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoint_dir(run);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot list checkpoints in", &dir, e)),
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".ckpt")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(found)
}

/// Held while a checkpoint is written, so that a process ending on purpose (a failed
/// multi-node run) lets the write finish first.
static WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for a checkpoint being written and keeps new ones from starting while held.
pub(crate) fn hold_writes() -> std::sync::MutexGuard<'static, ()> {
    WRITES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `checkpoint` atomically and keeps the newest `keep` files.
pub fn write_checkpoint(run: &Path, checkpoint: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let _writing = hold_writes();
    let dir = checkpoint_dir(run);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
    let step = checkpoint.header.step;
    let path = dir.join(file_name(step));
    let bytes = checkpoint.encode()?;
    if std::env::var(ABORT_IN_CHECKPOINT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(step)
    {
        // The crash test: half a temporary file on disk, then no cleanup at all.
        let temp = dir.join(format!(".{}.tmp-{}", file_name(step), std::process::id()));
        let _ = std::fs::write(&temp, &bytes[..bytes.len() / 2]);
        std::process::abort();
    }
    crate::io::write_atomic(&path, &bytes)?;
    for (_, old) in list_checkpoints(run)?.into_iter().skip(keep.max(1)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// The newest checkpoint that reads back intact. Damaged newer ones are returned by
/// name with the reason, so the caller can say which were skipped.
pub fn latest_checkpoint(run: &Path) -> Result<(Checkpoint, PathBuf, Vec<String>)> {
    let mut skipped = Vec::new();
    for (_, path) in list_checkpoints(run)? {
        let read = std::fs::read(&path)
            .map_err(|e| Error::io("cannot read", &path, e))
            .and_then(|bytes| Checkpoint::decode(&bytes, &path));
        match read {
            Ok(c) => return Ok((c, path, skipped)),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    let mut message = format!("no intact checkpoint in {}", checkpoint_dir(run).display());
    if !skipped.is_empty() {
        message.push_str(&format!(" (damaged: {})", skipped.join("; ")));
    } else {
        message.push_str(" (train with --checkpoint-every K to write them)");
    }
    Err(Error::Parse {
        what: "resume",
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ThresholdScope;

    fn sample() -> Checkpoint {
        let config = crate::train::Preset::Tiny.config();
        Checkpoint {
            header: CheckpointHeader {
                step: 7,
                model: config.model.clone(),
                routing: RoutingConfig {
                    scope: ThresholdScope::Global,
                    ..config.routing
                },
                shapes: vec![vec![2, 3], vec![4]],
                has_moments: vec![true, false],
                adam_step: 7,
                policy: PolicyState::Fixed(vec![0.5, 0.6]),
                initial_val: 5.5,
                last_val: 2.0,
                busy_s: 1.5,
                by_difficulty: Vec::new(),
                by_class: Vec::new(),
            },
            params: vec![
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                vec![-1.0, f32::MIN_POSITIVE, 0.0, 7.5],
            ],
            moments: vec![(vec![0.1; 6], vec![0.2; 6])],
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let c = sample();
        let bytes = c.encode().unwrap();
        let path = Path::new("step-00000007.ckpt");
        assert_eq!(Checkpoint::decode(&bytes, path).unwrap(), c);
        let truncated = Checkpoint::decode(&bytes[..bytes.len() - 9], path).unwrap_err();
        assert!(
            truncated.to_string().contains("checksum mismatch"),
            "{truncated}"
        );
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        let err = Checkpoint::decode(&flipped, path).unwrap_err().to_string();
        assert!(
            err.contains("step-00000007.ckpt") && err.contains("corrupted"),
            "{err}"
        );
        assert!(Checkpoint::decode(b"garbage", path).is_err());
    }

    #[test]
    fn keeps_the_newest_and_falls_back_past_a_damaged_one() {
        let run = std::env::temp_dir().join(format!("dtopp-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let mut c = sample();
        for step in 1..=4 {
            c.header.step = step;
            write_checkpoint(&run, &c, 2).unwrap();
        }
        let steps: Vec<u64> = list_checkpoints(&run)
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(steps, vec![4, 3]);
        let newest = checkpoint_dir(&run).join(file_name(4));
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        let (found, path, skipped) = latest_checkpoint(&run).unwrap();
        assert_eq!(found.header.step, 3);
        assert!(path.ends_with(file_name(3)));
        assert!(skipped[0].contains("step-00000004.ckpt"), "{skipped:?}");
        std::fs::remove_dir_all(&run).unwrap();
    }
}
