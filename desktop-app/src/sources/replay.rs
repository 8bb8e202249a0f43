//! Replay: a run directory written by `dtopp train` or `dtopp simulate --out`, anywhere
//! (copied or mounted from a training server), followed while it grows.

use std::path::{Path, PathBuf};
use web_time::{Duration, Instant};

use dtopp::metrics::RoutingSample;

use crate::jsonl_tail::JsonlTail;
use crate::run_data::{RunData, StepPoint};

/// How often a followed directory is read again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Problems are kept up to this many per run (a file of bad lines must not fill memory).
const MAX_PROBLEMS: usize = 50;

/// One followed run directory.
#[derive(Debug)]
pub struct ReplaySource {
    dir: PathBuf,
    metrics: JsonlTail,
    samples: JsonlTail,
    /// The run as read so far.
    pub run: RunData,
    /// Malformed lines and read errors, newest last, for the UI.
    pub problems: Vec<String>,
    last_poll: Option<Instant>,
}

impl ReplaySource {
    /// Opens `dir` (it must be a readable directory; its files may still be coming).
    pub fn open(dir: &Path) -> Result<Self, String> {
        // Only whether it can be listed matters here.
        std::fs::read_dir(dir)
            .map_err(|e| format!("cannot open run directory {}: {e}", dir.display()))?;
        let label = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().to_string(),
        );
        let mut source = Self {
            dir: dir.to_path_buf(),
            metrics: JsonlTail::new(&dir.join("metrics.jsonl")),
            samples: JsonlTail::new(&dir.join("routing_samples.jsonl")),
            run: RunData::new(label),
            problems: Vec::new(),
            last_poll: None,
        };
        source.poll();
        Ok(source)
    }

    /// The directory followed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads what was appended since the last poll if `POLL_INTERVAL` has passed;
    /// returns whether anything changed.
    pub fn poll_if_due(&mut self) -> bool {
        match self.last_poll {
            Some(t) if t.elapsed() < POLL_INTERVAL => false,
            _ => self.poll(),
        }
    }

    /// Reads what was appended since the last poll; returns whether anything changed.
    pub fn poll(&mut self) -> bool {
        self.last_poll = Some(Instant::now());
        let mut changed = false;
        match self.metrics.poll() {
            Ok(polled) => {
                if polled.restarted {
                    self.run.steps.clear();
                    self.run.mode.clear();
                    changed = true;
                }
                for line in polled.lines {
                    match StepPoint::parse_line(&line.text) {
                        Ok((point, mode)) => {
                            if self.run.mode.is_empty() {
                                self.run.mode = mode;
                            }
                            self.run.steps.push(point);
                            changed = true;
                        }
                        Err(e) => self.problem(format!(
                            "{} line {}: not a metrics record ({e}); skipped",
                            self.metrics.path().display(),
                            line.number
                        )),
                    }
                }
            }
            Err(e) => self.problem(format!(
                "cannot read {}: {e}",
                self.metrics.path().display()
            )),
        }
        match self.samples.poll() {
            Ok(polled) => {
                if polled.restarted {
                    self.run.samples.clear();
                    changed = true;
                }
                for line in polled.lines {
                    match serde_json::from_str::<RoutingSample>(&line.text) {
                        Ok(sample) => {
                            self.run.samples.push(sample);
                            changed = true;
                        }
                        Err(e) => self.problem(format!(
                            "{} line {}: not a routing sample ({e}); skipped",
                            self.samples.path().display(),
                            line.number
                        )),
                    }
                }
            }
            Err(e) => self.problem(format!(
                "cannot read {}: {e}",
                self.samples.path().display()
            )),
        }
        changed
    }

    fn problem(&mut self, message: String) {
        if self.problems.last() != Some(&message) {
            self.problems.push(message);
        }
        if self.problems.len() > MAX_PROBLEMS {
            self.problems.remove(0);
        }
    }
}
