//! burn-cuda selects experts with dtopp's `select.cu` kernels on burn's own buffers
//! ([`super::cuda_launch`]): Top-p reads its threshold from the device (the controller's),
//! and nothing is read back, so the grouped layout routes a layer without a host wait.
//! The exact layout's plan ([`RoutingBackend::route`]) keeps the default, burn's tensor
//! ops, which read the offsets back once per layer for burn's sliced products anyway.

use burn::backend::Cuda;
use burn::tensor::{DType, Int, Tensor};
use dtopp_cuda::SelectDims;

use super::cuda_launch::{CudaSource, float, int, int_tensor, launch, output, usable};
use super::{RoutingBackend, mask_and_rank, within};
use crate::error::Result;
use crate::model::routing::Selector;
use crate::ops::RouteShape;

/// Tokens per block of the warp-per-token kernels (`WARPS` in select.cu).
const WARPS: usize = 8;

fn kernel(entry: &'static str) -> CudaSource {
    CudaSource {
        file: "select.cu",
        source: dtopp_cuda::source::SELECT,
        entry,
        threads: (WARPS * 32) as u32,
    }
}

impl RoutingBackend for Cuda {
    fn routing_name(device: &Self::Device) -> String {
        match usable(device) {
            Ok(()) => format!(
                "dtopp CUDA kernels (select.cu, grouped_matmul.cu) on burn-cuda's buffers, on its stream (device {})",
                device.index
            ),
            Err(e) => format!("none: {e}"),
        }
    }

    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        let device = probs.device();
        usable(&device)?;
        let [n, e] = probs.dims();
        RouteShape::new(n, e)?;
        let selector = within(selector, e);
        let probs = float(probs);
        let experts = output(&probs, [n, e], DType::I32);
        let weights = output(&probs, [n, e], DType::F32);
        let counts = output(&probs, [n], DType::I32);
        // The first non-finite probability, or u32::MAX: the grouped layout reports bad
        // logits itself, so it is not read here.
        let status = int(Tensor::<Self, 1, Int>::full([1], -1, &device));
        let grid = [n.div_ceil(WARPS).max(1) as u32, 1, 1];
        match selector {
            Selector::TopP {
                threshold: p,
                k_max,
            } => {
                let threshold =
                    float(threshold.unwrap_or_else(|| Tensor::from_floats([p], &device)));
                let dims = SelectDims {
                    tokens: n as u32,
                    experts: e as u32,
                    k: k_max.unwrap_or(0) as u32,
                };
                launch(
                    kernel("top_p"),
                    grid,
                    &[&probs, &threshold, &experts, &weights, &counts, &status],
                    &dims,
                );
            }
            Selector::TopK(k) => {
                let dims = SelectDims {
                    tokens: n as u32,
                    experts: e as u32,
                    k: k as u32,
                };
                launch(
                    kernel("top_k"),
                    grid,
                    &[&probs, &experts, &weights, &counts, &status],
                    &dims,
                );
            }
        }
        // The combine weights are not needed: the layouts take them from the probabilities.
        drop(weights);
        Ok(mask_and_rank(int_tensor(experts), int_tensor(counts)))
    }
}
