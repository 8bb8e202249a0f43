//! `dtopp train --devices A,B,...`: data-parallel training, one rank (thread) per
//! device, over burn's collective library. Every rank holds the whole model and takes
//! its share of every micro-batch; per step the ranks all-reduce the routing counts
//! (so every rank computes the same `a_t` and moves `p` the same way), the losses and
//! the gradients. Rank 0 evaluates, logs and writes the run directory and checkpoints
//! (once); the others only step.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Mutex;

use crate::model::TrainingBackend;

use super::collective::{ANOTHER_RANK_FAILED, Rank};
use super::config::TrainConfig;
use super::session::TrainSession;
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
    if let Some(device) = devices.first() {
        check_backend::<B>(&config, device)?;
    }
    begin_run(&config, options)?;
    announce(&config, devices.len(), options);
    run_ranks::<B>(devices, |rank, device| {
        let session = TrainSession::<B>::new_rank(&config, device, layout, rank)?;
        if rank.is_leader() {
            lead(session, options).map(Some)
        } else {
            follow(session).map(|()| None)
        }
    })
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
    if let Some(device) = devices.first() {
        check_backend::<B>(&point.config, device)?;
    }
    announce(&point.config, devices.len(), options);
    run_ranks::<B>(devices, |rank, device| {
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
    })
}

fn announce(config: &TrainConfig, world: usize, options: &TrainOptions) {
    let run = &config.run;
    options.say(format!(
        "data parallel: {world} rank(s) over burn-collective, {} sequences per rank and micro-batch, {} sequences ({} tokens) per optimizer step; routing counts, losses and gradients all-reduced every step",
        run.batch_size,
        world * run.batch_size * run.grad_accum,
        config.tokens_per_step()
    ));
}

/// Runs `body` once per rank, each on its own thread with its device, after every rank has joined the collective. Returns the leader's value. The
/// first rank to fail releases the others (they stop at their next all-reduce) and its
/// error is the one returned.
fn run_ranks<B: TrainingBackend>(
    devices: &[B::Device],
    body: impl Fn(Rank, &B::Device) -> Result<Option<RunSummary>> + Sync,
) -> Result<RunSummary> {
    let world = devices.len();
    if world == 0 {
        return Err(Error::param("--devices", world, "at least one device"));
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
            .map(|(index, device)| {
                let rank = Rank { index, world };
                let (body, fail) = (&body, &fail);
                scope.spawn(move || {
                    // A panic is a failure like any other: the other ranks are released.
                    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        rank.join::<B>(device)
                            .and_then(|()| body(rank, device))
                            .and_then(|summary| rank.leave::<B>().map(|()| summary))
                    }))
                    .unwrap_or_else(|panic| {
                        Err(Error::Backend {
                            backend: "trainer",
                            message: format!("rank {index} panicked: {}", panic_message(&panic)),
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
    summaries
        .into_iter()
        .flatten()
        .next()
        .ok_or_else(|| Error::Backend {
            backend: "trainer",
            message: "the leading rank returned no summary".into(),
        })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
