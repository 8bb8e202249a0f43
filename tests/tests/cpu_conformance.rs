//! The conformance suite on the CPU reference itself, and on deliberately broken
//! backends to show that the suite catches the bugs it exists for.

use dtopp::Result;
use dtopp::controller::ControllerConfig;
use dtopp::cpu::CpuReference;
use dtopp::ops::{
    DispatchPlan, DrnGrads, HostDispatchPlan, HostSelection, Normalization, RouteShape, RoutingOps,
    Selection,
};
use dtopp_tests::{assert_conforms, conformance_report, small_cases};

#[test]
fn cpu_reference_conforms_to_itself() {
    assert_conforms(&CpuReference, small_cases(2026));
}

/// A backend with one injected bug; everything else is the reference.
#[derive(Debug)]
enum Mutant {
    /// Top-p compares against a threshold 0.1% too low.
    ThresholdOffByEpsilon,
    /// Top-k breaks ties toward the higher expert index.
    TiesToHigherIndex,
    /// The dispatch plan lists each expert's tokens in descending order (unstable).
    UnstablePlan,
    /// DRN divides the variance by E - 1 (torch.std's default) instead of E.
    DrnSampleVariance,
}

impl RoutingOps for Mutant {
    type Floats = Vec<f32>;
    type Ints = Vec<i32>;

    fn backend_name(&self) -> &'static str {
        "mutant"
    }
    fn upload_floats(&self, data: &[f32]) -> Result<Vec<f32>> {
        CpuReference.upload_floats(data)
    }
    fn upload_ints(&self, data: &[i32]) -> Result<Vec<i32>> {
        CpuReference.upload_ints(data)
    }
    fn read_floats(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        CpuReference.read_floats(b)
    }
    fn read_ints(&self, b: &Vec<i32>) -> Result<Vec<i32>> {
        CpuReference.read_ints(b)
    }
    fn drn_forward(
        &self,
        logits: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<Vec<f32>> {
        match (self, norm) {
            (Mutant::DrnSampleVariance, Normalization::Drn { theta }) => {
                // Rescale theta so the result equals DRN with the sample variance.
                let mut out = Vec::new();
                for row in logits.chunks_exact(shape.experts) {
                    let e = row.len() as f32;
                    let mu = row.iter().sum::<f32>() / e;
                    let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / e;
                    let sample = if e > 1.0 { var * e / (e - 1.0) } else { var };
                    let adj = ((var + 1e-6) / (sample + 1e-6)).sqrt();
                    let one = RouteShape {
                        tokens: 1,
                        experts: shape.experts,
                    };
                    out.extend(CpuReference.drn_forward(
                        &row.to_vec(),
                        one,
                        Normalization::Drn { theta: theta * adj },
                    )?);
                }
                Ok(out)
            }
            _ => CpuReference.drn_forward(logits, shape, norm),
        }
    }
    fn drn_backward(
        &self,
        l: &Vec<f32>,
        p: &Vec<f32>,
        g: &Vec<f32>,
        s: RouteShape,
        n: Normalization,
    ) -> Result<DrnGrads<Vec<f32>>> {
        CpuReference.drn_backward(l, p, g, s, n)
    }
    fn top_p(
        &self,
        probs: &Vec<f32>,
        shape: RouteShape,
        t: &Vec<f32>,
        k_max: Option<usize>,
    ) -> Result<HostSelection> {
        match self {
            Mutant::ThresholdOffByEpsilon => {
                CpuReference.top_p(probs, shape, &vec![t[0] * 0.999], k_max)
            }
            _ => CpuReference.top_p(probs, shape, t, k_max),
        }
    }
    fn top_k(&self, probs: &Vec<f32>, shape: RouteShape, k: usize) -> Result<HostSelection> {
        match self {
            Mutant::TiesToHigherIndex => {
                // Reverse the expert axis, select, map ids back: ties now favour high ids.
                let e = shape.experts;
                let reversed: Vec<f32> = probs
                    .chunks_exact(e)
                    .flat_map(|r| r.iter().rev().copied())
                    .collect();
                let mut s = CpuReference.top_k(&reversed, shape, k)?;
                s.experts
                    .iter_mut()
                    .filter(|x| **x >= 0)
                    .for_each(|x| *x = e as i32 - 1 - *x);
                Ok(s)
            }
            _ => CpuReference.top_k(probs, shape, k),
        }
    }
    fn dispatch_plan(&self, selection: &Selection<Vec<f32>, Vec<i32>>) -> Result<HostDispatchPlan> {
        let mut plan = CpuReference.dispatch_plan(selection)?;
        if let Mutant::UnstablePlan = self {
            for e in 0..selection.shape.experts {
                let (a, b) = (
                    plan.expert_offsets[e] as usize,
                    plan.expert_offsets[e + 1] as usize,
                );
                plan.route_tokens[a..b].reverse();
            }
        }
        Ok(plan)
    }
    fn gather(
        &self,
        x: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        CpuReference.gather(x, hidden, plan)
    }
    fn controller_update(
        &self,
        state: &mut Vec<f32>,
        counts: &Vec<i32>,
        config: &ControllerConfig,
    ) -> Result<()> {
        CpuReference.controller_update(state, counts, config)
    }
    fn combine(
        &self,
        y: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        CpuReference.combine(y, hidden, plan)
    }
}

#[test]
fn suite_catches_injected_bugs() {
    for mutant in [
        Mutant::ThresholdOffByEpsilon,
        Mutant::TiesToHigherIndex,
        Mutant::UnstablePlan,
        Mutant::DrnSampleVariance,
    ] {
        let report = conformance_report(&mutant, small_cases(2026), 2026).expect("mutant runs");
        println!(
            "{mutant:?}: {} failures, e.g. {:?}",
            report.failures.len(),
            report.failures.first()
        );
        assert!(!report.failures.is_empty(), "the suite missed {mutant:?}");
    }
}
