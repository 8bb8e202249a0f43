//! How much memory a training run needs, estimated from its config before anything is
//! allocated, and the refusal of a run that cannot fit on its device
//! ([`check_fits`]). Without it, `[model] experts = 100000000` aborted the process inside
//! the allocator (`memory allocation of 25600000000 bytes failed`, signal 6).
//!
//! The estimate counts f32 bytes:
//! - the parameters, their gradients and AdamW's two moments (exact counts);
//! - the activations autodiff keeps for the backward pass of one micro-batch: per block
//!   the attention's projections and its `[B, H, S, S]` scores, the router's `[N, E]`
//!   logits and probabilities, and the routed rows through the experts at `routing.target`
//!   routes per token (what the controller holds DTop-p and Top-k to; a fixed Top-p
//!   threshold can take more), and the output head's `[N, V]` logits;
//! - one such copy per data-parallel rank that shares the device (CPU ranks share the
//!   host).
//!
//! It leaves out the runtime itself (code, allocator and pool slack, the corpus) and the
//! backward pass's transient gradients, so it is an estimate, not a bound: `dtopp bench
//! train` prints it beside the measured peak (on the CPU, 0.039 against 0.096 GiB of peak
//! RSS for the tiny preset, 0.63 against 0.69 for bench/cpu-mid.toml, 9.17 against 8.59
//! for the small preset; docs/training.md).

use serde::Serialize;

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::{DeviceMemory, DeviceMemoryBackend};

const F32: f64 = 4.0;

/// What a run needs per device, in bytes (f64: absurd configs must not overflow).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// The parameters.
    pub parameters: f64,
    /// Their gradients.
    pub gradients: f64,
    /// AdamW's first and second moments.
    pub optimizer: f64,
    /// What autodiff keeps of one micro-batch for the backward pass.
    pub activations: f64,
    /// Copies of all of the above on the device (data-parallel ranks sharing it).
    pub copies: usize,
    /// The largest single tensor: bytes, what it is, the config fields of its shape.
    pub largest_tensor: (f64, &'static str, &'static str),
}

impl MemoryEstimate {
    /// The estimate for `config` with `copies` ranks on one device.
    pub fn of(config: &TrainConfig, copies: usize) -> Self {
        let m = &config.model;
        let (d, e, f, v) = (
            m.d_model as f64,
            m.experts as f64,
            m.expert_hidden as f64,
            m.vocab as f64,
        );
        let (b, s, h) = (
            config.run.batch_size as f64,
            m.seq_len as f64,
            m.heads as f64,
        );
        let n = b * s;
        let routes = n * config.routing.target.clamp(1.0, e);
        let attention_params = 4.0 * d * d + 2.0 * d;
        let moe_params = d * e + 1.0 + 3.0 * e * d * f;
        let dense_params = 3.0 * d * m.dense_hidden as f64;
        let attention = 10.0 * n * d + 3.0 * b * h * s * s;
        let moe = 3.0 * n * d + 6.0 * n * e + 3.0 * routes * d + 5.0 * routes * f;
        let dense = 3.0 * n * d + 4.0 * n * m.dense_hidden as f64;
        let (mut params, mut acts) = (2.0 * v * d + d, n * d + 2.0 * n * d + 3.0 * n * v);
        for layer in 0..m.layers {
            let is_moe = m.is_moe_block(layer);
            params += attention_params + if is_moe { moe_params } else { dense_params };
            acts += attention + if is_moe { moe } else { dense };
        }
        let candidates = [
            (
                e * d * f,
                "an [experts, d_model, expert_hidden] expert weight",
                "model.experts, model.d_model, model.expert_hidden",
            ),
            (
                d * e,
                "the [d_model, experts] router",
                "model.d_model, model.experts",
            ),
            (
                v * d,
                "the [vocab, d_model] embedding",
                "model.vocab, model.d_model",
            ),
            (
                routes * f,
                "the routed rows' [routes, expert_hidden] activations",
                "run.batch_size, model.seq_len, routing.target, model.expert_hidden",
            ),
            (
                b * h * s * s,
                "the [batch, heads, seq, seq] attention scores",
                "run.batch_size, model.heads, model.seq_len",
            ),
            (
                n * v,
                "the [tokens, vocab] output logits",
                "run.batch_size, model.seq_len, model.vocab",
            ),
        ];
        let largest = candidates
            .into_iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or((0.0, "", ""), |(elements, what, fields)| {
                (F32 * elements, what, fields)
            });
        Self {
            parameters: F32 * params,
            gradients: F32 * params,
            optimizer: 2.0 * F32 * params,
            activations: F32 * acts,
            copies: copies.max(1),
            largest_tensor: largest,
        }
    }

    /// Bytes of one rank: parameters, gradients, moments and activations.
    pub fn per_rank(&self) -> f64 {
        self.parameters + self.gradients + self.optimizer + self.activations
    }

    /// Bytes on the device: [`Self::per_rank`] times the ranks sharing it.
    pub fn total(&self) -> f64 {
        self.per_rank() * self.copies as f64
    }

    /// One line for the training log.
    pub fn describe(&self) -> String {
        let ranks = if self.copies > 1 {
            format!(" x {} ranks sharing the device", self.copies)
        } else {
            String::new()
        };
        format!(
            "about {} = parameters {} + gradients {} + AdamW moments {} + activations {} of a micro-batch{ranks} (the runtime and allocator slack not counted)",
            gib(self.total()),
            gib(self.parameters),
            gib(self.gradients),
            gib(self.optimizer),
            gib(self.activations),
        )
    }

    /// The config fields that drive the larger part of the estimate, for the refusal.
    fn drivers(&self) -> &'static str {
        if self.parameters + self.gradients + self.optimizer >= self.activations {
            "the parameters (with their gradients and AdamW moments) dominate: model.experts, model.expert_hidden, model.d_model, model.layers and model.vocab drive them"
        } else {
            "the activations dominate: run.batch_size (raise run.grad_accum instead), model.seq_len, routing.target and model.vocab drive them"
        }
    }
}

/// Refuses `config` on `device`, before anything is allocated, when its estimate exceeds
/// what the device reports free, or one of its tensors exceeds the device's largest
/// allocation. Returns the estimate and what the device reported.
pub fn check_fits<B: DeviceMemoryBackend>(
    config: &TrainConfig,
    device: &B::Device,
) -> Result<(MemoryEstimate, DeviceMemory)> {
    let memory = B::device_memory(device);
    // The ranks of one node (process) share its host; other nodes have their own.
    let copies = if memory.shared_by_ranks {
        config.run.devices / config.run.nodes.max(1)
    } else {
        1
    };
    let estimate = MemoryEstimate::of(config, copies);
    let device_name = B::name(device);
    if let Some(available) = memory.available
        && estimate.total() > available as f64
    {
        return Err(Error::DoesNotFit {
            device: device_name,
            needed: estimate.describe(),
            available: format!("{} is {}", memory.what, gib(available as f64)),
            drivers: estimate.drivers().to_string(),
        });
    }
    if let Some(limit) = memory.largest_tensor
        && estimate.largest_tensor.0 > limit as f64
    {
        let (bytes, what, fields) = estimate.largest_tensor;
        return Err(Error::DoesNotFit {
            device: device_name,
            needed: format!("{what} of {}", gib(bytes)),
            available: format!(
                "one buffer binding holds at most {} there (max_storage_buffer_binding_size)",
                gib(limit as f64)
            ),
            drivers: format!("its shape comes from {fields}"),
        });
    }
    Ok((estimate, memory))
}

fn gib(bytes: f64) -> String {
    let gib = bytes / (1u64 << 30) as f64;
    if gib >= 0.1 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::{MemoryEstimate, check_fits};
    use crate::error::Error;
    use crate::train::Preset;

    #[test]
    fn parameters_match_the_model_and_grow_with_every_driver() {
        let config = Preset::Tiny.config();
        let base = MemoryEstimate::of(&config, 1);
        assert_eq!(base.parameters, 4.0 * config.model.parameters() as f64);
        assert_eq!(base.optimizer, 2.0 * base.parameters);
        let mut wider = config.clone();
        wider.model.experts *= 2;
        let mut longer = config.clone();
        longer.run.batch_size *= 2;
        assert!(MemoryEstimate::of(&wider, 1).parameters > base.parameters);
        assert!(MemoryEstimate::of(&longer, 1).activations > base.activations);
        assert_eq!(MemoryEstimate::of(&config, 3).total(), 3.0 * base.total());
    }

    #[test]
    fn a_model_larger_than_the_host_is_refused_by_name() {
        let mut config = Preset::Tiny.config();
        config.model.experts = 100_000_000;
        let e = check_fits::<NdArray>(&config, &Default::default()).unwrap_err();
        assert!(matches!(e, Error::DoesNotFit { .. }), "{e}");
        let message = e.to_string();
        for needle in ["model.experts", "host memory available", "GiB"] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        check_fits::<NdArray>(&Preset::Tiny.config(), &Default::default()).unwrap();
    }
}
