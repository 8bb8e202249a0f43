//! A node's side of the supervision: join (hello, wait for every node), then a thread
//! that beats and listens until the node reports its end.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{HEARTBEAT, Hello, LineReader, Read1, SILENCE_LIMIT, one_line};
use crate::error::{Error, Result};

/// The last step this process finished (sent with every heartbeat, so the orchestrator
/// can tell a stalled run from a slow one).
static STEP: AtomicU64 = AtomicU64::new(0);

/// Records that this process finished `step` (a no-op outside multi-node runs but for
/// one atomic store).
pub fn report_step(step: u64) {
    STEP.fetch_max(step, Ordering::Relaxed);
}

/// A node's live connection to `dtopp orchestrate`.
pub struct NodeLink {
    writer: Arc<Mutex<TcpStream>>,
    finished: Arc<AtomicBool>,
}

impl NodeLink {
    /// Connects to the supervision at `address` (retrying until `timeout`: the
    /// orchestrator may start after the nodes), says `hello` and waits until every node
    /// has joined. Errors name what went wrong: the orchestrator not found, this node
    /// refused (with the reason), or another node missing at the deadline.
    pub fn join(address: &str, hello: &Hello, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = connect(address, deadline)?;
        let _ = stream.set_nodelay(true);
        let fail = |what: String| Error::Cluster(format!("node {}: {what}", hello.node));
        let mut writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
        writeln!(writer, "{}", hello.to_line())
            .map_err(|e| fail(format!("cannot talk to the orchestrator at {address}: {e}")))?;
        let mut reader = LineReader::new(stream, HEARTBEAT).map_err(|e| fail(e.to_string()))?;
        loop {
            match reader.next() {
                Read1::Line(line) if line == "go" => break,
                Read1::Line(line) => {
                    if let Some(why) = line
                        .strip_prefix("refuse ")
                        .or_else(|| line.strip_prefix("abort "))
                    {
                        return Err(Error::Cluster(why.to_string()));
                    }
                }
                Read1::Quiet => {}
                Read1::Closed(how) => {
                    return Err(fail(format!(
                        "the orchestrator at {address} went away before every node joined ({how})"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "not every node joined within {} s (--join-timeout); the orchestrator at {address} names the missing ones",
                    timeout.as_secs()
                )));
            }
        }
        let link = Self {
            writer: Arc::new(Mutex::new(writer)),
            finished: Arc::new(AtomicBool::new(false)),
        };
        let (writer, finished, address) = (
            link.writer.clone(),
            link.finished.clone(),
            address.to_string(),
        );
        std::thread::Builder::new()
            .name("dtopp-supervision".into())
            .spawn(move || watch(reader, writer, finished, &address))
            .map_err(|e| fail(format!("cannot start the supervision thread: {e}")))?;
        Ok(link)
    }

    /// Tells the orchestrator how this node ended; from now on the connection may close.
    pub fn finish(&self, outcome: std::result::Result<(), String>) {
        self.finished.store(true, Ordering::SeqCst);
        let line = match outcome {
            Ok(()) => "done ok".to_string(),
            Err(message) => format!("done error {}", one_line(&message)),
        };
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(writer, "{line}").and_then(|()| writer.flush());
    }
}

fn connect(address: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        match TcpStream::connect(address) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => {
                return Err(Error::Cluster(format!(
                    "cannot reach the orchestrator's supervision at {address} ({e}): is `dtopp orchestrate` running, on the --orchestrator port minus one?"
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Beats every [`HEARTBEAT`] and listens; ends the process on an abort, or when the
/// orchestrator goes silent or away before this node has finished.
fn watch(
    mut reader: LineReader,
    writer: Arc<Mutex<TcpStream>>,
    finished: Arc<AtomicBool>,
    address: &str,
) {
    let mut heard = Instant::now();
    let mut beat = Instant::now() - HEARTBEAT;
    loop {
        if finished.load(Ordering::SeqCst) {
            return;
        }
        if beat.elapsed() >= HEARTBEAT {
            beat = Instant::now();
            let step = STEP.load(Ordering::Relaxed);
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = writeln!(w, "beat {step}") {
                drop(w);
                stop(
                    &finished,
                    format!("lost the connection to the orchestrator at {address} ({e})"),
                );
            }
        }
        match reader.next() {
            Read1::Line(line) => {
                heard = Instant::now();
                if let Some(why) = line.strip_prefix("abort ") {
                    stop(&finished, why.to_string());
                }
            }
            Read1::Quiet if heard.elapsed() > SILENCE_LIMIT => stop(
                &finished,
                format!(
                    "no word from the orchestrator at {address} for {} s: the connection dropped or its host hangs",
                    SILENCE_LIMIT.as_secs()
                ),
            ),
            Read1::Quiet => {}
            Read1::Closed(how) => stop(
                &finished,
                format!("the orchestrator at {address} is gone ({how}): it exited or was killed"),
            ),
        }
    }
}

/// Ends the process with `why`, unless the node already finished. The ranks may be
/// blocked inside burn-collective's global all-reduce, which has no timeout and cannot be
/// cancelled, so ending the process is the only bounded way out. A checkpoint being
/// written is finished first (checkpoints are written atomically, so the last good one
/// is intact either way).
fn stop(finished: &AtomicBool, why: String) {
    if finished.load(Ordering::SeqCst) {
        return;
    }
    let _writing = crate::train::checkpoint::hold_writes();
    if finished.load(Ordering::SeqCst) {
        return;
    }
    eprintln!("error: multi-node run: {why}");
    std::process::exit(1);
}
