//! Some shader compilers end a loop after 65535 iterations (Mesa's lavapipe does). burn's
//! scatter ops (`select_assign`, `scatter`: the backward of every row gather, and the MoE
//! layer's combine) walk the scattered axis in a loop, one invocation per column, so on
//! such an adapter a micro-batch with 65535 or more tokens or routes would silently lose
//! rows. The device is probed before a run starts (and again by every session) and a run
//! that could cross the limit is refused by name, before anything is written.

use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::config::TrainConfig;
use crate::error::{Error, Result};

/// The loop length lavapipe stops at.
const LOOP_LIMIT: usize = 65_535;

/// Refuses `config` on `device` when its longest scatter (the micro-batch's tokens, or its
/// routes: tokens times the most experts a token can select) reaches the device's loop
/// limit.
pub(crate) fn check_scatter_length<B: Backend>(
    config: &TrainConfig,
    device: &B::Device,
) -> Result<()> {
    let tokens = config.run.batch_size * config.model.seq_len;
    let r = &config.routing;
    let k_bound = if r.mode.uses_threshold() {
        r.k_max.unwrap_or(config.model.experts)
    } else {
        r.target.ceil() as usize
    };
    let longest = tokens * k_bound.max(1);
    if longest < LOOP_LIMIT || !loops_are_cut::<B>(device)? {
        return Ok(());
    }
    Err(Error::param(
        "run.batch_size",
        config.run.batch_size,
        format!(
            "a micro-batch whose routes stay below {LOOP_LIMIT} on {}: this adapter ends shader loops after {LOOP_LIMIT} iterations (Mesa's lavapipe does), and burn's scatter ops loop over the routes; batch_size x seq_len x (routing.k_max, else E for Top-p, T for Top-k) = {} x {} x {k_bound} = {longest} (lower batch_size and raise run.grad_accum, or set routing.k_max)",
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

    use super::{check_scatter_length, loops_are_cut};
    use crate::train::Preset;

    #[test]
    fn the_cpu_backend_has_no_loop_limit() {
        let device = Default::default();
        assert!(!loops_are_cut::<NdArray>(&device).unwrap());
        let mut config = Preset::Tiny.config();
        config.run.batch_size = 256; // 256 x 64 tokens x 16 experts: over 65535 routes
        check_scatter_length::<NdArray>(&config, &device).unwrap();
    }
}
