//! Per-layer routing counts of a micro-batch or a step: the controller's `a_t`, the
//! balance loss's expert fractions, the metrics and the padded layout's bounds.

use super::*;

/// Per-layer routing counts (of a micro-batch, or summed over a step).
#[derive(Debug, PartialEq)]
pub(super) struct RoutingStats {
    pub(super) k_sum: Vec<u64>,
    pub(super) k_histogram: Vec<Vec<u64>>,
    pub(super) expert_load: Vec<Vec<u64>>,
}

impl RoutingStats {
    pub(super) fn new(layers: usize, experts: usize) -> Self {
        Self {
            k_sum: vec![0; layers],
            k_histogram: vec![vec![0; experts]; layers],
            expert_load: vec![vec![0; experts]; layers],
        }
    }

    /// The counts of one forward pass, summed on the device and read for every layer
    /// in one go, with the padded layout's first non-finite logits (a non-finite one is
    /// an error).
    pub(super) fn of_micro_batch<B: Backend>(
        moe: &[MoeForward<B>],
        experts: usize,
    ) -> Result<Self> {
        if moe.is_empty() {
            return Ok(Self::new(0, experts));
        }
        let width = 1 + 2 * experts;
        let checked: Vec<(usize, Tensor<B, 1, Int>)> = moe
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| Some((l, layer.routing.first_bad.clone()?)))
            .collect();
        let read = read_counts(Tensor::cat(
            moe.iter()
                .map(|layer| layer.routing.device_counts())
                .chain(checked.iter().map(|(_, bad)| bad.clone()))
                .collect(),
            0,
        ))?;
        let counted = moe.len() * width;
        for ((l, _), &bad) in checked.iter().zip(&read[counted..]) {
            let logits = &moe[*l].logits;
            if bad < logits.shape().num_elements() as u64 {
                return Err(non_finite_logit(logits, bad as usize));
            }
        }
        Ok(Self::unflatten(&read[..counted], moe.len(), experts))
    }

    /// Whether every layer's routes fit `bounds`.
    pub(super) fn fit(&self, bounds: &[LayerBounds]) -> bool {
        bounds
            .iter()
            .enumerate()
            .all(|(l, b)| b.hold(self.needs(l)))
    }

    /// What layer `layer` needed: its routes, busiest expert and busiest token.
    pub(super) fn needs(&self, layer: usize) -> LayerNeeds {
        LayerNeeds {
            routes: self.k_sum[layer] as usize,
            max_load: self.max_load(layer),
            max_k: self.max_k(layer),
        }
    }

    pub(super) fn max_load(&self, layer: usize) -> usize {
        self.expert_load[layer].iter().copied().max().unwrap_or(0) as usize
    }

    /// The most experts a token took (the histogram's last non-empty `k`).
    pub(super) fn max_k(&self, layer: usize) -> usize {
        self.k_histogram[layer]
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |k| k + 1)
    }

    pub(super) fn accumulate(&mut self, other: &Self) {
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.k_sum, &other.k_sum);
        for l in 0..self.k_sum.len() {
            add(&mut self.k_histogram[l], &other.k_histogram[l]);
            add(&mut self.expert_load[l], &other.expert_load[l]);
        }
    }

    /// Per layer: `k_sum`, the histogram, the loads (one all-reduce for all of them).
    pub(super) fn flatten(&self) -> Vec<u64> {
        (0..self.k_sum.len())
            .flat_map(|l| {
                std::iter::once(self.k_sum[l])
                    .chain(self.k_histogram[l].iter().copied())
                    .chain(self.expert_load[l].iter().copied())
            })
            .collect()
    }

    pub(super) fn unflatten(values: &[u64], layers: usize, experts: usize) -> Self {
        let mut stats = Self::new(layers, experts);
        for (l, chunk) in values
            .chunks_exact(1 + 2 * experts)
            .enumerate()
            .take(layers)
        {
            stats.k_sum[l] = chunk[0];
            stats.k_histogram[l].copy_from_slice(&chunk[1..=experts]);
            stats.expert_load[l].copy_from_slice(&chunk[1 + experts..]);
        }
        stats
    }

    pub(super) fn active_per_layer(&self, tokens: usize) -> Vec<f64> {
        self.k_sum
            .iter()
            .map(|&s| s as f64 / tokens as f64)
            .collect()
    }
}

pub(super) fn read_counts<B: Backend>(t: Tensor<B, 1, Int>) -> Result<Vec<u64>> {
    Ok(read_ints(t)?.into_iter().map(|c| c as u64).collect())
}
