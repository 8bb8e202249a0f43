//! Autoregressive sampling from a trained model, with each position's routing recorded.
//! With the KV cache (the default) a new token runs one position through the model; when
//! the context reaches `seq_len` (where RoPE's table ends) the cache restarts from the
//! newest half of the window, so that cost is paid once every `seq_len / 2` tokens.
//! Without it every token runs the whole window again, which is the baseline the cache
//! is measured against.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{KvCache, LmOutput, MoeLanguageModel, Precision, RoutingBackend, RoutingPlan};
use crate::rng::SplitMix64;
use crate::train::host_f32;

/// How to sample.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Tokens to generate.
    pub tokens: usize,
    /// Softmax temperature; 0 takes the most probable token.
    pub temperature: f64,
    /// Sample among the `k` most probable tokens only.
    pub top_k: Option<usize>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Decode with the KV cache (otherwise every token runs the whole window again).
    pub cache: bool,
}

/// One position of the text and how the MoE layers routed it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoutedToken {
    /// The token.
    pub token: u32,
    /// Whether it came from the prompt.
    pub prompt: bool,
    /// Per MoE layer, the experts it took in rank order (probability descending).
    pub experts: Vec<Vec<u32>>,
    /// Per MoE layer, their probabilities.
    pub probs: Vec<Vec<f32>>,
}

impl RoutedToken {
    /// Experts taken, averaged over the MoE layers.
    pub fn mean_experts(&self) -> f64 {
        let layers = self.experts.len().max(1);
        self.experts.iter().map(Vec::len).sum::<usize>() as f64 / layers as f64
    }
}

/// What [`generate`] produced.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt's tokens and then the generated ones, with their routing.
    pub tokens: Vec<RoutedToken>,
    /// Seconds spent on the prompt (its one forward pass).
    pub prefill_seconds: f64,
    /// Seconds spent generating, after the prompt.
    pub decode_seconds: f64,
    /// Times the KV cache restarted from half a window.
    pub cache_restarts: usize,
}

impl Generation {
    /// Generated tokens per second, after the prompt.
    pub fn tokens_per_second(&self) -> f64 {
        let generated = self.tokens.iter().filter(|t| !t.prompt).count();
        generated as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Samples `options.tokens` tokens after `prompt` from `model` (context `seq_len`),
/// routing as `plan` says. `on_token` hears every position, prompt first, as its routing
/// is known. The prompt must be non-empty, fit the context and hold tokens of the
/// vocabulary.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: RoutingBackend>(
    model: &MoeLanguageModel<B>,
    seq_len: usize,
    plan: &RoutingPlan,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(&RoutedToken),
) -> Result<Generation> {
    let vocab = model.embed.dims()[0];
    if prompt.is_empty() {
        return Err(Error::param("prompt", "\"\"", "at least one token"));
    }
    if prompt.len() > seq_len {
        return Err(Error::param(
            "prompt",
            format!("{} tokens", prompt.len()),
            format!("at most the model's context, seq_len = {seq_len} tokens"),
        ));
    }
    if let Some((i, t)) = prompt
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= vocab)
    {
        return Err(Error::param(
            "prompt",
            format!("token {t} at position {i}"),
            format!("tokens of the model's vocabulary, 0..{vocab}"),
        ));
    }
    if !(options.temperature.is_finite() && options.temperature >= 0.0) {
        return Err(Error::param(
            "--temperature",
            options.temperature,
            "a number >= 0",
        ));
    }
    if options.top_k == Some(0) {
        return Err(Error::param("--top-k", 0, "at least 1"));
    }
    let device = model.embed.device();
    let run = |tokens: &[u32], cache: Option<&mut KvCache<B>>| -> Result<LmOutput<B>> {
        let data: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input =
            Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, tokens.len()]), &device);
        match cache {
            Some(cache) => model.forward_cached(input, cache, plan, Precision::F32),
            None => model.forward(input, plan, Precision::F32),
        }
    };
    let mut rng = SplitMix64::substream(options.seed, 0x6E6E, 0);
    let mut cache = options.cache.then(|| KvCache::new(model, seq_len));
    let mut context: Vec<u32> = prompt.to_vec();
    let mut out = Vec::with_capacity(prompt.len() + options.tokens);
    let mut restarts = 0;

    let started = Instant::now();
    let first = run(prompt, cache.as_mut())?;
    let (mut logits, routed) = last_rows(first, prompt.len())?;
    for (&token, (experts, probs)) in prompt.iter().zip(routed) {
        let t = RoutedToken {
            token,
            prompt: true,
            experts,
            probs,
        };
        on_token(&t);
        out.push(t);
    }
    let prefill_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    for _ in 0..options.tokens {
        let token = sample(&logits, options, &mut rng);
        context.push(token);
        let output = match cache.as_mut() {
            Some(cache) if cache.len() < cache.capacity() => run(&[token], Some(cache))?,
            Some(cache) => {
                // The window is full: start again from its newest half.
                restarts += 1;
                cache.clear();
                let keep = &context[context.len() - seq_len.div_ceil(2)..];
                run(keep, Some(cache))?
            }
            None => run(&context[context.len().saturating_sub(seq_len)..], None)?,
        };
        let (next, mut routed) = last_rows(output, 1)?;
        let (experts, probs) = routed.pop().expect("one row");
        let t = RoutedToken {
            token,
            prompt: false,
            experts,
            probs,
        };
        on_token(&t);
        out.push(t);
        logits = next;
    }
    Ok(Generation {
        tokens: out,
        prefill_seconds,
        decode_seconds: started.elapsed().as_secs_f64(),
        cache_restarts: restarts,
    })
}

type Routing = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// The last row's logits, and the routing of the last `rows` positions (per position: per
/// layer, the experts in rank order and their probabilities).
fn last_rows<B: RoutingBackend>(
    output: LmOutput<B>,
    rows: usize,
) -> Result<(Vec<f32>, Vec<Routing>)> {
    let [n, v] = output.logits.dims();
    let logits = host_f32(output.logits.narrow(0, n - 1, 1))?;
    debug_assert_eq!(logits.len(), v);
    let mut routed: Vec<Routing> = vec![(Vec::new(), Vec::new()); rows];
    for layer in output.moe {
        let [_, e] = layer.probs.dims();
        let probs = host_f32(layer.probs.clone())?;
        let ranked = layer.routing.ranked_experts(&probs)?;
        for (r, (experts, weights)) in routed.iter_mut().enumerate() {
            let i = n - rows + r;
            let chosen: Vec<u32> = ranked[i * e..(i + 1) * e]
                .iter()
                .take_while(|&&j| j >= 0)
                .map(|&j| j as u32)
                .collect();
            weights.push(chosen.iter().map(|&j| probs[i * e + j as usize]).collect());
            experts.push(chosen);
        }
    }
    Ok((logits, routed))
}

/// A token drawn from `logits` (`[V]`): the most probable at temperature 0, otherwise
/// from the softmax at the temperature, among the `top_k` most probable if set. A
/// non-finite logit is never drawn.
fn sample(logits: &[f32], options: &GenerateOptions, rng: &mut SplitMix64) -> u32 {
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    // Descending, ties to the lower token: the same draw on every backend.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if order.is_empty() {
        return 0;
    }
    if options.temperature == 0.0 {
        return order[0] as u32;
    }
    order.truncate(options.top_k.unwrap_or(order.len()));
    let top = f64::from(logits[order[0]]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - top) / options.temperature).exp())
        .collect();
    let mut u = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    order[order.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::{GenerateOptions, sample};
    use crate::rng::SplitMix64;

    fn options(temperature: f64, top_k: Option<usize>) -> GenerateOptions {
        GenerateOptions {
            tokens: 1,
            temperature,
            top_k,
            seed: 0,
            cache: true,
        }
    }

    #[test]
    fn sampling_follows_temperature_and_top_k() {
        let logits = [0.0, 3.0, 3.0, f32::NAN, 1.0];
        let mut rng = SplitMix64::new(1);
        // Greedy: the first of the tied best.
        assert_eq!(sample(&logits, &options(0.0, None), &mut rng), 1);
        // Top-2 never draws outside the two best, and draws both.
        let draws: Vec<u32> = (0..200)
            .map(|_| sample(&logits, &options(1.0, Some(2)), &mut rng))
            .collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2), "{draws:?}");
        assert!(draws.contains(&1) && draws.contains(&2));
        // The NaN logit is never drawn, at any temperature.
        let hot: Vec<u32> = (0..500)
            .map(|_| sample(&logits, &options(50.0, None), &mut rng))
            .collect();
        assert!(!hot.contains(&3) && hot.contains(&0) && hot.contains(&4));
    }
}
