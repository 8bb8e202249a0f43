//! The initial threshold `p_0` per MoE layer.

use super::*;

/// `p_0` per MoE layer: configured, or calibrated on the first training batch so it
/// activates about `T` experts per token (global scope: one value over all layers). The
/// probe routes Top-k with `k = ceil(T)`, which only shapes what later layers see.
pub(super) fn initial_thresholds<B: RoutingBackend>(
    config: &TrainConfig,
    model: &MoeLanguageModel<B>,
    corpus: &Corpus,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let layers = model.moe_layers().count();
    let r = &config.routing;
    if let Some(p) = r.threshold {
        return Ok(vec![p; layers]);
    }
    if !r.mode.uses_threshold() {
        return Ok(vec![1.0; layers]);
    }
    let run = &config.run;
    let probe = RoutingPlan {
        use_drn: r.mode.uses_drn(),
        selectors: vec![Selector::TopK(r.target.ceil() as usize); layers],
        bounds: None,
    };
    // Every micro-batch of the first step, so the calibration does not depend on how
    // the step is split, and every rank of a data-parallel run finds the same `p_0`.
    let mut per_layer: Vec<Vec<f32>> = vec![Vec::new(); layers];
    for micro in 0..run.grad_accum * run.devices {
        let batch = corpus.train_batch(run.seed, 1, micro, run.batch_size, config.model.seq_len)?;
        let (inputs, _) = batch_tensors::<B>(&batch, device);
        let output = model.forward(inputs, &probe, Precision::F32)?;
        for (all, m) in per_layer.iter_mut().zip(output.moe) {
            all.extend(host_f32(m.probs)?);
        }
    }
    let e = config.model.experts;
    let tokens = per_layer[0].len() / e;
    Ok(match r.scope {
        ThresholdScope::Global => {
            let all: Vec<f32> = per_layer.concat();
            let p = calibrate_threshold(&all, RouteShape::new(tokens * layers, e)?, r.target)?;
            vec![p.clamp(r.p_min, r.p_max); layers]
        }
        ThresholdScope::PerLayer => per_layer
            .iter()
            .map(|probs| {
                calibrate_threshold(probs, RouteShape::new(tokens, e)?, r.target)
                    .map(|p| p.clamp(r.p_min, r.p_max))
            })
            .collect::<Result<_>>()?,
    })
}
