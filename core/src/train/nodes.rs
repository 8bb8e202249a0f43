//! `dtopp train --nodes N --node-rank R …`: where this process sits in a multi-node run.
//!
//! One process per node, each with its local ranks (`--devices`); burn-collective's global
//! level joins them: its orchestrator (`dtopp orchestrate`) introduces the nodes, and the
//! nodes all-reduce peer to peer through its tensor data service. The global rank of local
//! rank `r` on node `n` is `n · local_world + r`: it picks the data windows exactly as in a
//! one-process run with `N · local_world` ranks, and global rank 0 alone writes the run.

use std::fmt;
use std::str::FromStr;

use burn::collective::{AllReduceStrategy, CollectiveConfig};
use burn_communication::Address;
use sha2::{Digest, Sha256};

use super::config::TrainConfig;
use crate::error::{Error, Result};

/// This process's place in a multi-node run (the `--nodes` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Nodes in the run (`--nodes`).
    pub nodes: usize,
    /// This node, in `0..nodes` (`--node-rank`); node 0 holds global rank 0.
    pub rank: usize,
    /// burn's global orchestrator, `ws://HOST:PORT` (`--orchestrator`). dtopp's supervision
    /// of the run listens on `PORT + 1` of the same host ([`NodeSpec::supervisor`]).
    pub orchestrator: String,
    /// This node's host name or IP as the other nodes reach it (`--node-address`).
    pub host: String,
    /// The port of this node's tensor data service (`--data-port`): the other nodes
    /// download this node's share of every all-reduce from it.
    pub data_port: u16,
}

impl NodeSpec {
    /// Checks the flags against each other and `local_world`, naming the bad one.
    pub fn validate(&self, local_world: usize) -> Result<()> {
        if self.nodes == 0 {
            return Err(Error::param("--nodes", self.nodes, "at least 1"));
        }
        if self.rank >= self.nodes {
            return Err(Error::param(
                "--node-rank",
                self.rank,
                format!("below --nodes ({})", self.nodes),
            ));
        }
        if local_world == 0 {
            return Err(Error::param("--devices", 0, "at least one device"));
        }
        if self.host.is_empty() || self.host.contains("://") || self.host.contains('/') {
            return Err(Error::param(
                "--node-address",
                &self.host,
                "a host name or IP address that the other nodes can reach, without scheme or port (e.g. 10.0.0.2)",
            ));
        }
        if self.data_port == 0 {
            return Err(Error::param("--data-port", 0, "a port from 1 to 65535"));
        }
        self.supervisor().map(|_| ())
    }

    /// The global rank of local rank `local` when every node runs `local_world` ranks.
    pub fn global_rank(&self, local: usize, local_world: usize) -> usize {
        self.rank * local_world + local
    }

    /// burn-collective's configuration for this node: `local_world` local peers plus the
    /// global level (orchestrator, this node's data service).
    pub(crate) fn collective_config(&self, local_world: usize) -> CollectiveConfig {
        let parse = |s: &str| Address::from_str(s).expect("Address::from_str never fails");
        CollectiveConfig::default()
            .with_num_devices(local_world)
            .with_num_nodes(self.nodes as u32)
            .with_global_address(parse(&self.orchestrator))
            .with_node_address(parse(&self.data_address()))
            .with_data_service_port(self.data_port)
            // Not burn's default ring: it splits every tensor along its largest
            // dimension into one slice per node and refuses a smaller one, and the
            // model has one-element parameters (each layer's theta).
            .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2))
    }

    /// Where the other nodes download this node's tensors: `ws://HOST:DATA_PORT`.
    pub fn data_address(&self) -> String {
        format!("ws://{}:{}", self.host, self.data_port)
    }

    /// `HOST:PORT+1` of `--orchestrator ws://HOST:PORT`: dtopp's supervision of the run.
    pub fn supervisor(&self) -> Result<String> {
        let (host, port) = parse_orchestrator(&self.orchestrator)?;
        let port = supervisor_port(port).ok_or_else(|| {
            Error::param(
                "--orchestrator",
                &self.orchestrator,
                "a port below 65535 (dtopp's supervision listens on the next one)",
            )
        })?;
        Ok(format!("{host}:{port}"))
    }
}

impl fmt::Display for NodeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} of {} (data service {})",
            self.rank,
            self.nodes,
            self.data_address()
        )
    }
}

/// The port dtopp's supervision listens on beside burn's orchestrator on `port`.
pub fn supervisor_port(port: u16) -> Option<u16> {
    port.checked_add(1)
}

/// `ws://HOST:PORT` into its host and port.
fn parse_orchestrator(address: &str) -> Result<(String, u16)> {
    let bad = || {
        Error::param(
            "--orchestrator",
            address,
            "ws://HOST:PORT, the address `dtopp orchestrate --port PORT` listens on",
        )
    };
    let rest = address.strip_prefix("ws://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.trim_end_matches('/').parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// The SHA-256 of the run's configuration as `config.toml` holds it (so with
/// `run.devices`, the global world): nodes that train different runs are refused.
pub fn config_hash(config: &TrainConfig) -> Result<String> {
    Ok(hex(&Sha256::digest(config.to_toml()?.as_bytes())))
}

/// Test hook: stands in for this binary's identity, so a test can play a node built
/// from other code.
pub const BINARY_ID_ENV: &str = "DTOPP_TEST_BINARY_ID";

/// This program's version and the SHA-256 of its executable. Nodes must run the same
/// build: another one may compute in another order, and then `p` would no longer be
/// identical on every rank.
pub fn binary_id() -> Result<String> {
    if let Ok(id) = std::env::var(BINARY_ID_ENV) {
        return Ok(id);
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot locate", "the program", e))?;
    let mut file = std::fs::File::open(&exe).map_err(|e| Error::io("cannot read", &exe, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("cannot read", &exe, e))?;
    Ok(format!(
        "dtopp-{}-{}",
        env!("CARGO_PKG_VERSION"),
        &hex(&hasher.finalize())[..16]
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeSpec {
        NodeSpec {
            nodes: 2,
            rank: 1,
            orchestrator: "ws://10.0.0.1:3000".into(),
            host: "10.0.0.2".into(),
            data_port: 3100,
        }
    }

    #[test]
    fn global_ranks_follow_the_nodes() {
        let s = spec();
        assert_eq!(s.global_rank(0, 2), 2);
        assert_eq!(s.global_rank(1, 2), 3);
        assert_eq!(s.data_address(), "ws://10.0.0.2:3100");
        assert_eq!(s.supervisor().unwrap(), "10.0.0.1:3001");
        s.validate(2).unwrap();
    }

    #[test]
    fn bad_flags_are_named() {
        type Change = fn(&mut NodeSpec);
        let cases: [(Change, &str); 5] = [
            (|s| s.rank = 2, "--node-rank"),
            (|s| s.nodes = 0, "--nodes"),
            (
                |s| s.orchestrator = "10.0.0.1:3000".into(),
                "--orchestrator",
            ),
            (|s| s.orchestrator = "ws://h:65535".into(), "--orchestrator"),
            (|s| s.host = "ws://10.0.0.2".into(), "--node-address"),
        ];
        for (change, flag) in cases {
            let mut s = spec();
            change(&mut s);
            let e = s.validate(1).unwrap_err().to_string();
            assert!(e.contains(flag), "{flag}: {e}");
        }
    }

    #[test]
    fn the_config_hash_changes_with_the_config() {
        let a = TrainConfig::from_preset_and_file(super::super::Preset::Tiny, None).unwrap();
        let mut b = a.clone();
        b.run.seed += 1;
        assert_eq!(config_hash(&a).unwrap(), config_hash(&a).unwrap());
        assert_ne!(config_hash(&a).unwrap(), config_hash(&b).unwrap());
    }
}
