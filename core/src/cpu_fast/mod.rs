//! The fast CPU backend: the routing ops of [`crate::cpu`] (the spec, written to be read)
//! rewritten to be fast. Tokens are split into blocks over the cores (rayon), rows are
//! reduced in vectorizable lanes with a vectorizable `exp`, Top-p and Top-k keep the best
//! few experts by insertion instead of sorting all `E`, and nothing is allocated per
//! token. Results follow the reference's rules exactly: the same rank order and
//! rank-order prefix sums (identical selections on the same probabilities), the same
//! plan, floats within the conformance tolerances, the same NaN/Inf errors naming the
//! same element. `tests/tests/cpu_fast_conformance.rs` runs the conformance suite on it.
//!
//! `--backend cpu` runs it; `--backend cpu-reference` runs the reference. Training on
//! burn ndarray routes with it (`model::routing_backend::ndarray`).

mod exp;
mod lanes;
mod normalize;
mod parallel;
mod plan;
mod select;

use crate::controller::ControllerConfig;
use crate::cpu::{CpuReference, check_finite};
use crate::error::{Error, Result};
use crate::ops::{
    DispatchPlan, DrnGrads, HostDispatchPlan, HostSelection, Normalization, RouteShape, Routed,
    RoutingOps, Selection, check_k, check_k_max, check_len, check_threshold,
};
pub(crate) use exp::exp_nonpositive;
use parallel::{block_tokens, map_blocks};
use select::{Rule, Scratch};

/// The fast CPU implementation of [`RoutingOps`]; buffers are host vectors, as the
/// reference's.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFast;

impl CpuFast {
    /// Threads the ops split their work over (rayon's pool: `RAYON_NUM_THREADS`, else one
    /// per core).
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

/// One block of a selection's output rows.
type SelectionRows<'a> = (&'a mut [i32], &'a mut [f32], &'a mut [i32]);

/// An empty `[N, E]` host selection to be filled block by block.
fn empty_selection(shape: RouteShape, k_bound: usize) -> HostSelection {
    HostSelection {
        shape,
        k_bound,
        experts: vec![0; shape.len()],
        weights: vec![0.0; shape.len()],
        counts: vec![0; shape.tokens],
    }
}

/// Splits a selection's arrays into blocks of `bt` tokens.
fn selection_blocks(s: &mut HostSelection, bt: usize) -> Vec<SelectionRows<'_>> {
    let e = s.shape.experts;
    s.experts
        .chunks_mut(bt * e)
        .zip(s.weights.chunks_mut(bt * e))
        .zip(s.counts.chunks_mut(bt))
        .map(|((x, w), k)| (x, w, k))
        .collect()
}

/// Selects every token of `probs` by `rule`; `Err` with the reference's message when a
/// probability is not finite.
fn select(probs: &[f32], shape: RouteShape, rule: Rule, op: &'static str) -> Result<HostSelection> {
    let e = shape.experts;
    let k_bound = match rule {
        Rule::TopP { k_cap, .. } => k_cap,
        Rule::TopK(k) => k,
    };
    let mut selection = empty_selection(shape, k_bound);
    let bt = block_tokens(shape.tokens, e);
    let blocks: Vec<_> = probs
        .chunks(bt * e)
        .zip(selection_blocks(&mut selection, bt))
        .collect();
    let finite = map_blocks(blocks, |(p, (x, w, k))| {
        if !lanes::all_finite(p) {
            return false;
        }
        let mut scratch = Scratch::new(e);
        for (((row, xr), wr), kr) in p
            .chunks_exact(e)
            .zip(x.chunks_exact_mut(e))
            .zip(w.chunks_exact_mut(e))
            .zip(k.iter_mut())
        {
            *kr = select::select_row(row, rule, &mut scratch, xr, wr);
        }
        true
    });
    if !finite.into_iter().all(|ok| ok) {
        check_finite(op, "probability", probs, e)?;
    }
    Ok(selection)
}

/// The Top-p rule after the reference's argument checks.
fn top_p_rule(shape: RouteShape, threshold: &[f32], k_max: Option<usize>) -> Result<Rule> {
    let p = *threshold
        .first()
        .ok_or_else(|| Error::shape("top_p", "threshold buffer is empty"))?;
    check_threshold(p)?;
    check_k_max(k_max, shape.experts)?;
    Ok(Rule::TopP {
        p,
        k_cap: k_max.unwrap_or(shape.experts),
    })
}

impl CpuFast {
    /// DRN (or softmax) and selection in one pass over each token, while its row is in
    /// cache. Any refusal (bad argument, non-finite value) is left to the unfused ops,
    /// which name it exactly as the reference does.
    fn drn_select(
        &self,
        logits: &[f32],
        shape: RouteShape,
        norm: Normalization,
        rule: Result<Rule>,
    ) -> Result<Option<Routed<Vec<f32>, Vec<i32>>>> {
        let (Ok(rule), Ok(theta)) = (rule, norm.theta()) else {
            return Ok(None);
        };
        if logits.len() != shape.len() || shape.is_empty() {
            return Ok(None);
        }
        let e = shape.experts;
        let k_bound = match rule {
            Rule::TopP { k_cap, .. } => k_cap,
            Rule::TopK(k) => k,
        };
        let mut probs = vec![0.0f32; shape.len()];
        let mut selection = empty_selection(shape, k_bound);
        let bt = block_tokens(shape.tokens, e);
        let blocks: Vec<_> = logits
            .chunks(bt * e)
            .zip(probs.chunks_mut(bt * e))
            .zip(selection_blocks(&mut selection, bt))
            .collect();
        let finite = map_blocks(blocks, |((z, p), (x, w, k))| {
            if !lanes::all_finite(z) {
                return false;
            }
            let mut scratch = Scratch::new(e);
            for ((((zr, pr), xr), wr), kr) in z
                .chunks_exact(e)
                .zip(p.chunks_exact_mut(e))
                .zip(x.chunks_exact_mut(e))
                .zip(w.chunks_exact_mut(e))
                .zip(k.iter_mut())
            {
                normalize::forward_row(zr, theta, pr);
                if !lanes::all_finite(pr) {
                    return false;
                }
                *kr = select::select_row(pr, rule, &mut scratch, xr, wr);
            }
            true
        });
        Ok(finite
            .into_iter()
            .all(|ok| ok)
            .then_some(Routed { probs, selection }))
    }
}

impl RoutingOps for CpuFast {
    type Floats = Vec<f32>;
    type Ints = Vec<i32>;

    fn backend_name(&self) -> &'static str {
        "cpu"
    }

    fn upload_floats(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn upload_ints(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }

    fn read_floats(&self, buffer: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buffer.clone())
    }

    fn read_ints(&self, buffer: &Vec<i32>) -> Result<Vec<i32>> {
        Ok(buffer.clone())
    }

    fn drn_forward(
        &self,
        logits: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<Vec<f32>> {
        const OP: &str = "drn_forward";
        check_len(OP, "logits", logits.len(), shape.len())?;
        let theta = norm.theta()?;
        if shape.is_empty() {
            return CpuReference.drn_forward(logits, shape, norm);
        }
        let e = shape.experts;
        let mut probs = vec![0.0f32; shape.len()];
        let bt = block_tokens(shape.tokens, e);
        let blocks: Vec<_> = logits
            .chunks(bt * e)
            .zip(probs.chunks_mut(bt * e))
            .collect();
        let finite = map_blocks(blocks, |(z, p)| {
            if !lanes::all_finite(z) {
                return false;
            }
            for (zr, pr) in z.chunks_exact(e).zip(p.chunks_exact_mut(e)) {
                normalize::forward_row(zr, theta, pr);
            }
            true
        });
        if !finite.into_iter().all(|ok| ok) {
            check_finite(OP, "router logit", logits, e)?;
        }
        Ok(probs)
    }

    fn drn_backward(
        &self,
        logits: &Vec<f32>,
        probs: &Vec<f32>,
        grad_probs: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<Vec<f32>>> {
        const OP: &str = "drn_backward";
        check_len(OP, "logits", logits.len(), shape.len())?;
        check_len(OP, "probs", probs.len(), shape.len())?;
        check_len(OP, "grad_probs", grad_probs.len(), shape.len())?;
        let theta = norm.theta()?;
        if shape.is_empty() {
            return CpuReference.drn_backward(logits, probs, grad_probs, shape, norm);
        }
        let e = shape.experts;
        let mut grad_logits = vec![0.0f32; shape.len()];
        let bt = block_tokens(shape.tokens, e);
        let blocks: Vec<_> = logits
            .chunks(bt * e)
            .zip(probs.chunks(bt * e))
            .zip(grad_probs.chunks(bt * e))
            .zip(grad_logits.chunks_mut(bt * e))
            .collect();
        let partials = map_blocks(blocks, |(((z, p), dp), dz)| {
            if !lanes::all_finite(z) || !lanes::all_finite(dp) {
                return None;
            }
            // Per token in f32, across tokens in f64 (the reference's accuracy).
            let mut theta_sum = 0.0f64;
            for (((zr, pr), dpr), dzr) in z
                .chunks_exact(e)
                .zip(p.chunks_exact(e))
                .zip(dp.chunks_exact(e))
                .zip(dz.chunks_exact_mut(e))
            {
                theta_sum += f64::from(normalize::backward_row(zr, pr, dpr, theta, dzr));
            }
            Some(theta_sum)
        });
        let Some(partials) = partials.into_iter().collect::<Option<Vec<f64>>>() else {
            check_finite(OP, "router logit", logits, e)?;
            check_finite(OP, "gradient", grad_probs, e)?;
            return Err(Error::shape(
                OP,
                "a non-finite input the reference accepts (a dtopp bug)",
            ));
        };
        // Block sums added in block order: the same result on any number of threads.
        let grad_theta = partials.into_iter().sum::<f64>() as f32;
        Ok(DrnGrads {
            logits: grad_logits,
            theta: vec![grad_theta],
        })
    }

    fn top_p(
        &self,
        probs: &Vec<f32>,
        shape: RouteShape,
        threshold: &Vec<f32>,
        k_max: Option<usize>,
    ) -> Result<HostSelection> {
        check_len("top_p", "probs", probs.len(), shape.len())?;
        let rule = top_p_rule(shape, threshold, k_max)?;
        if shape.is_empty() {
            return CpuReference.top_p(probs, shape, threshold, k_max);
        }
        select(probs, shape, rule, "top_p")
    }

    fn top_k(&self, probs: &Vec<f32>, shape: RouteShape, k: usize) -> Result<HostSelection> {
        check_len("top_k", "probs", probs.len(), shape.len())?;
        check_k(k, shape.experts)?;
        select(probs, shape, Rule::TopK(k), "top_k")
    }

    fn drn_top_p(
        &self,
        logits: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
        threshold: &Vec<f32>,
        k_max: Option<usize>,
    ) -> Result<Routed<Vec<f32>, Vec<i32>>> {
        let rule = top_p_rule(shape, threshold, k_max);
        if let Some(routed) = self.drn_select(logits, shape, norm, rule)? {
            return Ok(routed);
        }
        let probs = self.drn_forward(logits, shape, norm)?;
        let selection = self.top_p(&probs, shape, threshold, k_max)?;
        Ok(Routed { probs, selection })
    }

    fn drn_top_k(
        &self,
        logits: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
        k: usize,
    ) -> Result<Routed<Vec<f32>, Vec<i32>>> {
        let rule = check_k(k, shape.experts).map(|()| Rule::TopK(k));
        if let Some(routed) = self.drn_select(logits, shape, norm, rule)? {
            return Ok(routed);
        }
        let probs = self.drn_forward(logits, shape, norm)?;
        let selection = self.top_k(&probs, shape, k)?;
        Ok(Routed { probs, selection })
    }

    fn dispatch_plan(&self, selection: &Selection<Vec<f32>, Vec<i32>>) -> Result<HostDispatchPlan> {
        plan::dispatch_plan(selection)
    }

    fn gather(
        &self,
        x: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        plan::gather(x, hidden, plan)
    }

    fn combine(
        &self,
        y: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        plan::combine(y, hidden, plan)
    }

    fn controller_update(
        &self,
        state: &mut Vec<f32>,
        counts: &Vec<i32>,
        config: &ControllerConfig,
    ) -> Result<()> {
        // O(N) integer sum and a few scalars: the reference is already as fast as memory.
        crate::cpu::controller_update(state, counts, config)
    }
}
