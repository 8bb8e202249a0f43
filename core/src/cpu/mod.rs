//! The CPU reference backend: the routing spec as plain, commented loops. Every other
//! backend is tested against it. It is written to be read, not to be fast
//! ([`crate::cpu_fast`] is the fast one; `--backend cpu-reference` selects this one).

mod combine;
mod controller_update;
mod dispatch;
mod drn;
mod gather;
mod rank;
mod top_k;
mod top_p;

pub use combine::combine;
pub use controller_update::controller_update;
pub use dispatch::{check_selection, dispatch_plan};
pub use drn::{drn_backward, drn_forward};
pub use gather::gather;
pub use top_k::top_k;
pub use top_p::{top_p, top_p_count};

pub(crate) use drn::check_finite;
pub use rank::rank_experts;

use crate::controller::ControllerConfig;
use crate::error::Result;
use crate::ops::{
    DispatchPlan, DrnGrads, HostDispatchPlan, HostSelection, Normalization, RouteShape, RoutingOps,
    Selection,
};

/// The CPU reference implementation of [`RoutingOps`]; buffers are host vectors.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuReference;

impl RoutingOps for CpuReference {
    type Floats = Vec<f32>;
    type Ints = Vec<i32>;

    fn backend_name(&self) -> &'static str {
        "cpu-reference"
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
        drn_forward(logits, shape, norm)
    }

    fn drn_backward(
        &self,
        logits: &Vec<f32>,
        probs: &Vec<f32>,
        grad_probs: &Vec<f32>,
        shape: RouteShape,
        norm: Normalization,
    ) -> Result<DrnGrads<Vec<f32>>> {
        let (logits, theta) = drn_backward(logits, probs, grad_probs, shape, norm)?;
        Ok(DrnGrads {
            logits,
            theta: vec![theta],
        })
    }

    fn top_p(
        &self,
        probs: &Vec<f32>,
        shape: RouteShape,
        threshold: &Vec<f32>,
        k_max: Option<usize>,
    ) -> Result<HostSelection> {
        let p = *threshold
            .first()
            .ok_or_else(|| crate::Error::shape("top_p", "threshold buffer is empty"))?;
        top_p(probs, shape, p, k_max)
    }

    fn top_k(&self, probs: &Vec<f32>, shape: RouteShape, k: usize) -> Result<HostSelection> {
        top_k(probs, shape, k)
    }

    fn dispatch_plan(&self, selection: &Selection<Vec<f32>, Vec<i32>>) -> Result<HostDispatchPlan> {
        dispatch_plan(selection)
    }

    fn gather(
        &self,
        x: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        gather(x, hidden, plan)
    }

    fn controller_update(
        &self,
        state: &mut Vec<f32>,
        counts: &Vec<i32>,
        config: &ControllerConfig,
    ) -> Result<()> {
        controller_update(state, counts, config)
    }

    fn combine(
        &self,
        y: &Vec<f32>,
        hidden: usize,
        plan: &DispatchPlan<Vec<f32>, Vec<i32>>,
    ) -> Result<Vec<f32>> {
        combine(y, hidden, plan)
    }
}
