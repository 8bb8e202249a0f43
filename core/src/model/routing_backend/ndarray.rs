//! burn ndarray routes with the CPU reference, on the tensors' own host memory.

use burn::backend::NdArray;
use burn::tensor::Tensor;

use super::{RoutingBackend, route_from_host, within};
use crate::cpu::CpuReference;
use crate::error::{Error, Result};
use crate::model::device_routing::{DeviceRoute, non_finite_logit};
use crate::model::routing::Selector;
use crate::ops::{RouteShape, RoutingOps};

impl RoutingBackend for NdArray {
    fn routing_name(_device: &Self::Device) -> String {
        "dtopp CPU reference (plain loops) on burn ndarray's host tensors".to_string()
    }

    fn route(
        probs: Tensor<Self, 2>,
        logits: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<DeviceRoute<Self>> {
        let [n, e] = probs.dims();
        let shape = RouteShape::new(n, e)?;
        let selector = within(selector, e);
        if let Some(flat) = host(&logits)?.iter().position(|z| !z.is_finite()) {
            return Err(non_finite_logit(&logits, flat));
        }
        let cpu = CpuReference;
        let p = host(&probs)?;
        let selection = match selector {
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
        };
        let plan = cpu.read_plan(&cpu.dispatch_plan(&selection)?)?;
        Ok(route_from_host(&selection, &plan, &probs.device()))
    }
}

/// The values of a float tensor (ndarray: a copy out of host memory, no device).
fn host(t: &Tensor<NdArray, 2>) -> Result<Vec<f32>> {
    t.to_data().to_vec().map_err(|e| Error::Backend {
        backend: "burn ndarray",
        message: format!("reading routing inputs: {e:?}"),
    })
}
