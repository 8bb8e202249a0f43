//! Some shader compilers end a loop after 65535 iterations (Mesa's lavapipe does). burn's
//! scatter ops (`select_assign`, `scatter`) walk the scattered axis in a loop, one
//! invocation per column, so on such an adapter a scatter of 65535 or more rows silently
//! loses rows. On the backends dtopp trains on (wgpu, cuda) no step scatters: the MoE
//! layer's dispatch and combine ([`crate::model::routed_rows`]) and the token embedding
//! ([`crate::model::embed_tokens`]) differentiate into gathers. Any other autodiff backend
//! gets burn's scatters, over the routes and over the tokens; for those the device is
//! probed before a run starts (and again by every session) and a run that could cross
//! the limit is refused by name, before anything is written.
//!
//! A reduction along a contiguous axis (the softmax of the cross-entropy over the
//! vocabulary) walks four elements per iteration, so it reaches the limit only past
//! [`CONTIGUOUS_LIMIT`] elements (measured: a log-softmax over 300,000 zeros on lavapipe
//! normalises over 262,128 of them). A vocabulary that large is refused on such an
//! adapter too.

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::routed_rows;

/// The loop length lavapipe stops at.
const LOOP_LIMIT: usize = 65_535;

/// The elements a reduction along a contiguous axis covers on such an adapter (four per
/// iteration).
const CONTIGUOUS_LIMIT: usize = 262_128;

/// Refuses `config` on `device` when a loop of its training step would reach the
/// device's loop limit: the softmax over a vocabulary past [`CONTIGUOUS_LIMIT`], or the
/// longest scatter (the micro-batch's routes, tokens times the most experts a token can
/// select, on a backend that falls back to burn's scatters).
pub(crate) fn check_loop_limits<B: routed_rows::RowMovesBackend>(
    config: &TrainConfig,
    device: &B::Device,
) -> Result<()> {
    let vocab = config.model.vocab;
    if vocab > CONTIGUOUS_LIMIT && loops_are_cut::<B>(device)? {
        return Err(Error::param(
            "model.vocab",
            vocab,
            format!(
                "at most {CONTIGUOUS_LIMIT} on {}: this adapter ends shader loops after {LOOP_LIMIT} iterations (Mesa's lavapipe does), and the cross-entropy's softmax over the vocabulary is one such loop of four elements per iteration",
                B::name(device),
            ),
        ));
    }
    if routed_rows::gathers::<B>() {
        return Ok(());
    }
    let tokens = config.run.batch_size * config.model.seq_len;
    let r = &config.routing;
    let k_bound = if r.mode.uses_threshold() {
        r.k_max.unwrap_or(config.model.experts)
    } else {
        r.target.ceil() as usize
    }
    .max(1);
    let longest = tokens * k_bound;
    if longest < LOOP_LIMIT || !loops_are_cut::<B>(device)? {
        return Ok(());
    }
    Err(Error::param(
        "run.batch_size",
        config.run.batch_size,
        format!(
            "a micro-batch whose scatters stay below {LOOP_LIMIT} rows on {}: this adapter ends shader loops after {LOOP_LIMIT} iterations (Mesa's lavapipe does), and burn's scatter ops loop over the routes: batch_size x seq_len x (routing.k_max, else E for Top-p, T for Top-k) = {} x {} x {k_bound} = {longest} (lower batch_size and raise run.grad_accum, or set routing.k_max)",
            B::name(device),
            config.run.batch_size,
            config.model.seq_len,
        ),
    ))
}

/// Whether a scatter one element longer than [`LOOP_LIMIT`] loses its last element.
fn loops_are_cut<B: Backend>(device: &B::Device) -> Result<bool> {
    let n = LOOP_LIMIT + 1;
    let ones = Tensor::<B, 1, Int>::ones([n], device);
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, device);
    let written = Tensor::<B, 1, Int>::zeros([n], device)
        .select_assign(0, index, ones, IndexingUpdateOp::Add)
        .sum();
    let sum = written
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| Error::Backend {
            backend: "burn",
            message: format!("probing the scatter length: {e:?}"),
        })?;
    Ok(sum.first().copied() != Some(n as i64))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::{check_loop_limits, loops_are_cut};
    use crate::train::Preset;

    #[test]
    fn the_cpu_backend_has_no_loop_limit() {
        let device = Default::default();
        assert!(!loops_are_cut::<NdArray>(&device).unwrap());
        let mut config = Preset::Tiny.config();
        config.run.batch_size = 256; // 256 x 64 tokens x 16 experts: over 65535 routes
        check_loop_limits::<NdArray>(&config, &device).unwrap();
    }
}
