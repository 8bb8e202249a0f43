//! `dtopp orchestrate --port P`: the meeting point of a multi-node run (burn's global
//! orchestrator, and dtopp's supervision on `P + 1`); exits when the nodes have finished,
//! with their status.

use std::time::Duration;

use clap::Args;

use crate::error::Result;
use crate::train::{OrchestrateOptions, orchestrate};

#[derive(Debug, Args)]
pub(crate) struct OrchestrateArgs {
    /// burn's global orchestrator listens here; the nodes give `--orchestrator
    /// ws://THIS_HOST:PORT`. dtopp's supervision of the nodes listens on PORT + 1.
    #[arg(long)]
    port: u16,
    /// Seconds the nodes have, from now, to join; after that the run is called off and
    /// the missing nodes are named.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    join_timeout: u64,
    /// Seconds without any node finishing a step after which the run is stopped (a hung
    /// collective, a deadlock). Evaluations and checkpoints must fit inside it.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
    stall_timeout: u64,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

pub(crate) fn run(args: OrchestrateArgs) -> Result<()> {
    orchestrate(&OrchestrateOptions {
        port: args.port,
        join_timeout: Duration::from_secs(args.join_timeout),
        stall_timeout: Duration::from_secs(args.stall_timeout),
        progress: !args.quiet,
    })
}
