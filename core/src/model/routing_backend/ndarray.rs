//! burn ndarray routes with dtopp's fast CPU ops (which conform to the reference), on the
//! tensors' own host memory.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};

use super::{RoutingBackend, mask_and_rank, route_from_host, within};
use crate::cpu_fast::CpuFast;
use crate::error::{Error, Result};
use crate::model::device_routing::{non_finite_logit, select_ranked};
use crate::model::route::Route;
use crate::model::routing::Selector;
use crate::ops::{HostSelection, RouteShape, RoutingOps};

impl RoutingBackend for NdArray {
    const HOST_MEMORY: bool = true;

    fn routing_name(_device: &Self::Device) -> String {
        "dtopp fast CPU routing ops on burn ndarray's host tensors".to_string()
    }

    fn route(
        probs: Tensor<Self, 2>,
        logits: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<Route<Self>> {
        let [n, e] = probs.dims();
        RouteShape::new(n, e)?;
        let selector = within(selector, e);
        if let Some(flat) = host(&logits)?.iter().position(|z| !z.is_finite()) {
            return Err(non_finite_logit(&logits, flat));
        }
        let selection = select_on_host(host(&probs)?, n, e, selector, threshold)?;
        let cpu = CpuFast;
        let plan = cpu.read_plan(&cpu.dispatch_plan(&selection)?)?;
        Ok(route_from_host(&selection, &plan, &probs.device()))
    }

    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        let [n, e] = probs.dims();
        let p = host(&probs)?;
        if p.iter().any(|p| !p.is_finite()) {
            // Nothing is refused here: the padded layout reports the non-finite router
            // logit behind it with the step's counts, as on every backend.
            return select_ranked(probs, selector, threshold);
        }
        let selection = select_on_host(p, n, e, within(selector, e), threshold)?;
        let device = probs.device();
        let experts: Vec<i64> = selection.experts.iter().map(|&j| i64::from(j)).collect();
        let counts: Vec<i64> = selection.counts.iter().map(|&k| i64::from(k)).collect();
        Ok(mask_and_rank(
            Tensor::from_data(TensorData::new(experts, [n, e]), &device),
            Tensor::from_data(TensorData::new(counts, [n]), &device),
        ))
    }
}

/// The fast CPU selection of probabilities `p` `[N, E]` (the threshold read out of
/// host memory).
fn select_on_host(
    p: Vec<f32>,
    n: usize,
    e: usize,
    selector: Selector,
    threshold: Option<Tensor<NdArray, 1>>,
) -> Result<HostSelection> {
    let shape = RouteShape::new(n, e)?;
    let cpu = CpuFast;
    Ok(match selector {
        Selector::TopK(k) => cpu.top_k(&p, shape, k)?,
        Selector::TopP {
            threshold: at,
            k_max,
        } => {
            let at = match threshold {
                Some(t) => host(&t.reshape([1, 1]))?,
                None => vec![at],
            };
            cpu.top_p(&p, shape, &at, k_max)?
        }
    })
}

/// The values of a float tensor: a copy out of host memory, with no device to wait for
/// (not counted in [`crate::host_reads`]).
fn host(t: &Tensor<NdArray, 2>) -> Result<Vec<f32>> {
    t.to_data().to_vec().map_err(|e| Error::Backend {
        backend: "burn ndarray",
        message: format!("reading routing inputs: {e:?}"),
    })
}
