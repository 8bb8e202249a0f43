//! dtopp's supervision of a multi-node run: one plain TCP connection from every node to
//! `dtopp orchestrate`, on the port after burn's orchestrator. It carries no tensors (those
//! go through burn-collective), only what burn's global level does not do:
//!
//! - **refusal**: a node says what must match before it trains (node count, devices per
//!   node, the config's hash, the binary) and a node that differs is refused by name;
//! - **failure detection**: burn-collective 0.21 forgets a node that disconnects and tells
//!   nobody, its tensor downloads wait without a timeout, and an all-reduce in progress
//!   cannot be cancelled (its local server handles one message at a time, so even a reset
//!   queues behind it). Here a node that dies closes its connection (the kernel does it
//!   for a killed process), a silent one stops its heartbeat, and the others are told;
//! - **the end**: `dtopp orchestrate` exits once every node has finished, with their status.
//!
//! The protocol is one line per message: `hello …`, `beat STEP`, `done ok`,
//! `done error MESSAGE` from a node; `go`, `beat`, `refuse MESSAGE`, `abort MESSAGE` back.

mod node;
mod orchestrator;

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

pub use node::{NodeLink, report_step};
pub use orchestrator::{OrchestrateOptions, orchestrate};

/// How often both sides say they are alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Silence after which the other side counts as gone (a dropped connection, a hung
/// host). A killed process is noticed at once: its kernel closes the connection.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(10);

/// What a node tells the orchestrator before it trains; everything but `node` and
/// `data_address` must be the same on every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// `--node-rank`.
    pub node: usize,
    /// `--nodes`.
    pub nodes: usize,
    /// Ranks on the node (`--devices`).
    pub local_world: usize,
    /// [`super::nodes::config_hash`] of the run.
    pub config_hash: String,
    /// [`super::nodes::binary_id`].
    pub binary: String,
    /// Where the node's tensor data service listens (to name the node in errors).
    pub data_address: String,
}

impl Hello {
    fn to_line(&self) -> String {
        format!(
            "hello {} {} {} {} {} {}",
            self.node,
            self.nodes,
            self.local_world,
            self.config_hash,
            self.binary,
            self.data_address
        )
    }

    fn parse(words: &str) -> Option<Self> {
        let mut w = words.split_whitespace();
        let hello = Self {
            node: w.next()?.parse().ok()?,
            nodes: w.next()?.parse().ok()?,
            local_world: w.next()?.parse().ok()?,
            config_hash: w.next()?.to_string(),
            binary: w.next()?.to_string(),
            data_address: w.next()?.to_string(),
        };
        w.next().is_none().then_some(hello)
    }

    /// The first way `self` differs from `reference` (the first node to say hello).
    fn mismatch(&self, reference: &Hello) -> Option<String> {
        let node = self.node;
        if self.nodes != reference.nodes {
            Some(format!(
                "node {node} was started with --nodes {}, node {} with --nodes {}",
                self.nodes, reference.node, reference.nodes
            ))
        } else if self.node >= self.nodes {
            Some(format!(
                "node {node} is outside --nodes {} (--node-rank counts from 0)",
                self.nodes
            ))
        } else if self.local_world != reference.local_world {
            Some(format!(
                "node {node} runs {} local rank(s), node {} runs {}: every node needs the same --devices count",
                self.local_world, reference.node, reference.local_world
            ))
        } else if self.binary != reference.binary {
            Some(format!(
                "node {node} runs another dtopp binary ({}) than node {} ({}): copy one build to every node",
                self.binary, reference.node, reference.binary
            ))
        } else if self.config_hash != reference.config_hash {
            Some(format!(
                "node {node} joined with a different config (sha256 {}) than node {} ({}): every node needs the same preset, --config file and flags",
                short(&self.config_hash),
                reference.node,
                short(&reference.config_hash)
            ))
        } else {
            None
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// One line of free text (messages are line-delimited).
fn one_line(message: &str) -> String {
    message.replace(['\n', '\r'], " ")
}

/// Reads `\n`-terminated lines from a stream with a read timeout, keeping a partial
/// line across timeouts (a `BufReader::read_line` that times out may lose it).
struct LineReader {
    stream: TcpStream,
    pending: Vec<u8>,
}

/// What one read brought.
enum Read1 {
    Line(String),
    Quiet,
    Closed(String),
}

impl LineReader {
    fn new(stream: TcpStream, timeout: Duration) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            pending: Vec::new(),
        })
    }

    fn next(&mut self) -> Read1 {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Read1::Line(String::from_utf8_lossy(&line).trim().to_string());
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Read1::Closed("the connection was closed".into()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Read1::Quiet;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Read1::Closed(format!("the connection failed ({e})")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Hello;

    fn hello(node: usize) -> Hello {
        Hello {
            node,
            nodes: 2,
            local_world: 1,
            config_hash: "ab".repeat(32),
            binary: "dtopp-0.1.0-0123456789abcdef".into(),
            data_address: format!("ws://127.0.0.1:{}", 4000 + node),
        }
    }

    #[test]
    fn hello_round_trips_and_mismatches_are_named() {
        let a = hello(0);
        assert_eq!(
            Hello::parse(&a.to_line()["hello ".len()..]),
            Some(a.clone())
        );
        assert_eq!(hello(1).mismatch(&a), None);
        let mut b = hello(1);
        b.config_hash = "cd".repeat(32);
        let why = b.mismatch(&a).unwrap();
        assert!(
            why.contains("node 1") && why.contains("different config"),
            "{why}"
        );
        let mut b = hello(1);
        b.binary = "dtopp-0.1.0-ffffffffffffffff".into();
        assert!(b.mismatch(&a).unwrap().contains("another dtopp binary"));
        let mut b = hello(1);
        b.local_world = 2;
        assert!(b.mismatch(&a).unwrap().contains("--devices"));
        assert!(hello(2).mismatch(&a).unwrap().contains("outside --nodes"));
    }
}
