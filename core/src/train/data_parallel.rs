//! `dtopp train --devices A,B,...`: data-parallel training, one rank (thread) per
//! device, over burn's collective library. Every rank holds the whole model and takes
//! its share of every micro-batch; per step the ranks all-reduce the routing counts
//! (so every rank computes the same `a_t` and moves `p` the same way), the losses and
//! the gradients. Rank 0 evaluates, logs and writes the run directory and checkpoints
//! (once); the others only step. The ranks may span several processes (nodes): see
//! [`train_node`].

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use burn::collective::CollectiveConfig;

use crate::model::TrainingBackend;

use super::collective::{ANOTHER_RANK_FAILED, Rank};
use super::config::TrainConfig;
use super::nodes::{NodeSpec, binary_id, config_hash};
use super::session::TrainSession;
use super::supervision::{Hello, NodeLink};
use super::trainer::{
    ResumePoint, TrainOptions, begin_run, check_backend, continue_run, follow, lead,
};
use crate::error::{Error, Result};
use crate::metrics::RunSummary;
use crate::model::ExpertLayout;

/// Trains `config` data-parallel on `devices` (one rank each; `run.devices` is set to
/// their number), the experts' rows in `layout` on every rank. `run.batch_size` is per
/// rank.
pub fn train_data_parallel<B: TrainingBackend>(
    config: &TrainConfig,
    devices: &[B::Device],
    layout: ExpertLayout,
    options: &TrainOptions,
) -> Result<RunSummary> {
    let mut config = config.clone();
    config.run.devices = devices.len();
    config.run.nodes = 1;
    run_process::<B>(
        &config,
        devices,
        None,
        options,
        || begin_run(&config, options),
        |rank, device| start_rank::<B>(&config, device, layout, rank, options),
    )
    .and_then(leader_summary)
}

/// [`super::resume`] of a run trained data-parallel, on as many devices as it was
/// trained on; every rank restores the same checkpoint.
pub fn resume_data_parallel<B: TrainingBackend>(
    dir: &Path,
    steps: Option<u64>,
    devices: &[B::Device],
    layout: ExpertLayout,
    options: &TrainOptions,
) -> Result<RunSummary> {
    let point = ResumePoint::prepare(dir, steps, devices.len(), options)?;
    run_process::<B>(
        &point.config,
        devices,
        None,
        options,
        || Ok(()),
        |rank, device| restore_rank::<B>(&point, dir, device, layout, rank, options),
    )
    .and_then(leader_summary)
}

/// One node of a multi-node run (`dtopp train --nodes N --node-rank R …`): trains
/// `config` on this node's `devices` with the other nodes' ranks, over burn-collective's
/// global level. `run.devices` becomes the global world, `nodes · devices.len()`. Node 0
/// writes the run directory and returns the summary; the others write nothing.
///
/// Before training, the node joins dtopp's supervision (waiting at most `join_timeout`
/// for every node): a node with another config, binary or device count is refused by
/// name, and a node that dies or goes silent ends the run on every node (this process
/// exits with the error while its ranks may be blocked inside burn's all-reduce).
pub fn train_node<B: TrainingBackend>(
    config: &TrainConfig,
    devices: &[B::Device],
    layout: ExpertLayout,
    options: &TrainOptions,
    node: &NodeSpec,
    join_timeout: Duration,
) -> Result<Option<RunSummary>> {
    node.validate(devices.len())?;
    let mut config = config.clone();
    config.run.devices = node.nodes * devices.len();
    config.run.nodes = node.nodes;
    config.validate()?;
    run_process::<B>(
        &config,
        devices,
        Some((node, join_timeout)),
        options,
        || begin_run(&config, options),
        |rank, device| start_rank::<B>(&config, device, layout, rank, options),
    )
}

/// [`train_node`] for `--resume`: every node reads the run in `dir` (so it must be on a
/// file system they share, or copied to each node before), node 0 alone rewrites it.
pub fn resume_node<B: TrainingBackend>(
    dir: &Path,
    steps: Option<u64>,
    devices: &[B::Device],
    layout: ExpertLayout,
    options: &TrainOptions,
    node: &NodeSpec,
    join_timeout: Duration,
) -> Result<Option<RunSummary>> {
    node.validate(devices.len())?;
    let point = ResumePoint::read(dir, steps, node.nodes * devices.len(), node.nodes, options)?;
    run_process::<B>(
        &point.config,
        devices,
        Some((node, join_timeout)),
        options,
        || point.commit(dir),
        |rank, device| restore_rank::<B>(&point, dir, device, layout, rank, options),
    )
}

/// Where this process's ranks are: alone (`None`), or one node of several, with how long
/// to wait for the others.
type Place<'a> = Option<(&'a NodeSpec, Duration)>;

/// Checks the backend, joins the other nodes if there are any, lets the process holding
/// global rank 0 `write` the run directory, runs `body` on every local rank, and tells
/// the orchestrator (if any) how it ended. Returns the leader's value.
fn run_process<B: TrainingBackend>(
    config: &TrainConfig,
    devices: &[B::Device],
    place: Place,
    options: &TrainOptions,
    write: impl FnOnce() -> Result<()>,
    body: impl Fn(Rank, &B::Device) -> Result<Option<RunSummary>> + Sync,
) -> Result<Option<RunSummary>> {
    if let Some(device) = devices.first() {
        check_backend::<B>(config, device)?;
    }
    let link = place
        .map(|(node, timeout)| join_nodes(config, devices.len(), node, timeout, options))
        .transpose()?;
    let ranks = place.map_or_else(
        || Ranks::local(devices.len()),
        |(node, _)| Ranks::on_node(node, devices.len()),
    );
    let outcome = (|| {
        if ranks.first == 0 {
            write()?;
        }
        announce(config, devices.len(), options);
        run_ranks::<B>(devices, &ranks, body)
    })();
    if let Some(link) = link {
        link.finish(outcome.as_ref().map(drop).map_err(ToString::to_string));
    }
    outcome
}

/// Says hello to the orchestrator and waits for every node.
fn join_nodes(
    config: &TrainConfig,
    local_world: usize,
    node: &NodeSpec,
    timeout: Duration,
    options: &TrainOptions,
) -> Result<NodeLink> {
    let hello = Hello {
        node: node.rank,
        nodes: node.nodes,
        local_world,
        config_hash: config_hash(config)?,
        binary: binary_id()?,
        data_address: node.data_address(),
    };
    let address = node.supervisor()?;
    options.say(format!(
        "{node}: joining the run at {} (supervision {address}); waiting up to {} s for every node",
        node.orchestrator,
        timeout.as_secs()
    ));
    NodeLink::join(&address, &hello, timeout)
}

fn start_rank<B: TrainingBackend>(
    config: &TrainConfig,
    device: &B::Device,
    layout: ExpertLayout,
    rank: Rank,
    options: &TrainOptions,
) -> Result<Option<RunSummary>> {
    let session = TrainSession::<B>::new_rank(config, device, layout, rank)?;
    if rank.is_leader() {
        lead(session, options).map(Some)
    } else {
        follow(session).map(|()| None)
    }
}

fn restore_rank<B: TrainingBackend>(
    point: &ResumePoint,
    dir: &Path,
    device: &B::Device,
    layout: ExpertLayout,
    rank: Rank,
    options: &TrainOptions,
) -> Result<Option<RunSummary>> {
    let session = TrainSession::<B>::restore(
        &point.config,
        device,
        layout,
        &point.checkpoint,
        point.history.clone(),
        Some(rank),
    )?;
    if rank.is_leader() {
        continue_run(session, dir, options).map(Some)
    } else {
        follow(session).map(|()| None)
    }
}

fn leader_summary(summary: Option<RunSummary>) -> Result<RunSummary> {
    summary.ok_or_else(|| Error::Backend {
        backend: "trainer",
        message: "the leading rank returned no summary".into(),
    })
}

fn announce(config: &TrainConfig, local_world: usize, options: &TrainOptions) {
    let run = &config.run;
    let nodes = if run.nodes > 1 {
        format!(" on each of {} nodes", run.nodes)
    } else {
        String::new()
    };
    options.say(format!(
        "data parallel: {local_world} rank(s){nodes} over burn-collective, {} sequences per rank and micro-batch, {} sequences ({} tokens) per optimizer step; routing counts, losses and gradients all-reduced every step",
        run.batch_size,
        run.devices * run.batch_size * run.grad_accum,
        config.tokens_per_step()
    ));
}

/// The ranks this process runs: global ranks `first..first + devices`, of `world`.
struct Ranks {
    first: usize,
    world: usize,
    collective: CollectiveConfig,
}

impl Ranks {
    fn local(devices: usize) -> Self {
        Self {
            first: 0,
            world: devices,
            collective: CollectiveConfig::default().with_num_devices(devices),
        }
    }

    fn on_node(node: &NodeSpec, devices: usize) -> Self {
        Self {
            first: node.global_rank(0, devices),
            world: node.nodes * devices,
            collective: node.collective_config(devices),
        }
    }
}

/// Runs `body` once per local rank, each on its own thread with its device, after every
/// rank has joined the collective. Returns the leader's value (`None` on a node without
/// global rank 0). The first rank to fail releases the others (they stop at their next
/// all-reduce) and its error is the one returned.
fn run_ranks<B: TrainingBackend>(
    devices: &[B::Device],
    ranks: &Ranks,
    body: impl Fn(Rank, &B::Device) -> Result<Option<RunSummary>> + Sync,
) -> Result<Option<RunSummary>> {
    if devices.is_empty() {
        return Err(Error::param("--devices", 0, "at least one device"));
    }
    // Whatever an earlier run in this process left behind.
    Rank::abort::<B>();
    // The cause, not the "another rank failed" of the ranks it stopped (which may
    // arrive first: a rank's all-reduce can fail before the one that caused it returns).
    let first_failure: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        let mut slot = first_failure.lock().unwrap_or_else(|p| p.into_inner());
        let collateral = |e: &Error| e.to_string().contains(ANOTHER_RANK_FAILED);
        if slot
            .as_ref()
            .is_none_or(|s| collateral(s) && !collateral(&e))
        {
            *slot = Some(e);
        }
        drop(slot);
        Rank::abort::<B>();
    };
    let summaries: Vec<Option<RunSummary>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(local, device)| {
                let rank = Rank {
                    index: ranks.first + local,
                    world: ranks.world,
                };
                let (body, fail, collective) = (&body, &fail, ranks.collective.clone());
                scope.spawn(move || {
                    // A panic is a failure like any other: the other ranks are released.
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        rank.join::<B>(device, collective)
                            .and_then(|()| body(rank, device))
                            .and_then(|summary| rank.leave::<B>().map(|()| summary))
                    }))
                    .unwrap_or_else(|panic| {
                        Err(Error::Backend {
                            backend: "trainer",
                            message: format!(
                                "rank {} panicked: {}",
                                rank.index,
                                panic_message(&panic)
                            ),
                        })
                    });
                    outcome.map_err(fail).ok().flatten()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().ok().flatten())
            .collect()
    });
    if let Some(e) = first_failure
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e);
    }
    Ok(summaries.into_iter().flatten().next())
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
