//! burn-cuda routes with dtopp's `select.cu` and `dispatch.cu` kernels on burn's own
//! buffers ([`super::cuda_launch`]): Top-p reads its threshold from the device (the
//! controller's), the grouped and padded layouts' selection reads nothing back, and the
//! exact layout's plan is read once per layer ([`DevicePlan`]), as burn's sliced products
//! need it.

use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use dtopp_cuda::{PlanDims, SelectDims};

use super::cuda_launch::{CudaModule, float, int, int_tensor, kernels_on, launch, output, usable};
use super::device_plan::DevicePlan;
use super::{RoutingBackend, clean_status, mask_and_rank, within};
use crate::error::Result;
use crate::model::device_routing::{route_on_device, select_ranked};
use crate::model::route::Route;
use crate::model::routing::Selector;
use crate::ops::RouteShape;

/// Tokens per block of the warp-per-token kernels (`WARPS` in select.cu).
const WARPS: usize = 8;
/// Threads per block of the plan's kernels.
const PLAN_THREADS: usize = 256;

const SELECT: CudaModule = CudaModule::new("select.cu", dtopp_cuda::source::SELECT);
const DISPATCH: CudaModule = CudaModule::new("dispatch.cu", dtopp_cuda::source::DISPATCH);

impl RoutingBackend for Cuda {
    fn routing_name(device: &Self::Device) -> String {
        if !kernels_on() {
            return "burn tensor ops on the model's device (DTOPP_CUDA_KERNELS=off: dtopp's CUDA kernels unused)".to_string();
        }
        match usable(device) {
            Ok(()) => format!(
                "dtopp CUDA kernels (select.cu, dispatch.cu, grouped_matmul.cu) on burn-cuda's buffers, on its stream (device {})",
                device.index
            ),
            Err(e) => format!("none: {e}"),
        }
    }

    fn route(
        probs: Tensor<Self, 2>,
        logits: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<Route<Self>> {
        if !kernels_on() {
            return route_on_device(probs, logits, selector, threshold);
        }
        let [n, e] = probs.dims();
        let k_bound = selector.k_bound(e);
        let sel = Selected::new(probs, selector, threshold)?;
        let dims = PlanDims::new(n, e);
        let chunks = dims.num_chunks as usize;
        let like = &sel.experts;
        let table = output(like, [chunks * e], DType::U32);
        let expert_counts = output(like, [e], DType::I32);
        let offsets = output(like, [e + 1], DType::I32);
        let route_tokens = output(like, [(n * k_bound).max(1)], DType::I32);
        let route_weights = output(like, [(n * k_bound).max(1)], DType::F32);
        let token_routes = output(like, [n, e], DType::I32);
        let chunk_grid = [chunks.div_ceil(PLAN_THREADS) as u32, 1, 1];
        launch(
            DISPATCH.kernel("plan_count", PLAN_THREADS as u32),
            chunk_grid,
            &[&sel.experts, &sel.counts, &table],
            &dims,
        );
        launch(
            DISPATCH.kernel("plan_scan", PLAN_THREADS as u32),
            [1, 1, 1],
            &[&table, &expert_counts, &offsets],
            &dims,
        );
        launch(
            DISPATCH.kernel("plan_scatter", PLAN_THREADS as u32),
            chunk_grid,
            &[
                &sel.experts,
                &sel.weights,
                &sel.counts,
                &table,
                &route_tokens,
                &route_weights,
                &token_routes,
            ],
            &dims,
        );
        DevicePlan {
            experts: int_tensor(sel.experts),
            counts: int_tensor(sel.counts),
            status: int_tensor(sel.status),
            offsets: int_tensor(offsets),
            route_tokens: int_tensor(route_tokens),
            token_routes: int_tensor(token_routes),
        }
        .into_route(logits, selector)
    }

    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        if !kernels_on() {
            return select_ranked(probs, selector, threshold);
        }
        let sel = Selected::new(probs, selector, threshold)?;
        Ok(mask_and_rank(
            int_tensor(sel.experts),
            int_tensor(sel.counts),
        ))
    }
}

/// A selection `select.cu` wrote into new buffers (the ops contract's layout).
struct Selected {
    /// `[N, E]` i32, rank order, padded with -1.
    experts: CubeTensor<CudaRuntime>,
    /// `[N, E]` f32 combine weights.
    weights: CubeTensor<CudaRuntime>,
    /// `[N]` i32.
    counts: CubeTensor<CudaRuntime>,
    /// `[1]` the first non-finite probability, row-major, or -1 (`u32::MAX`).
    status: CubeTensor<CudaRuntime>,
}

impl Selected {
    /// Top-p (at `threshold` on the device, else the selector's) or Top-k of `probs`,
    /// counts capped at E.
    fn new(
        probs: Tensor<Cuda, 2>,
        selector: Selector,
        threshold: Option<Tensor<Cuda, 1>>,
    ) -> Result<Self> {
        let device: CudaDevice = probs.device();
        usable(&device)?;
        let [n, e] = probs.dims();
        RouteShape::new(n, e)?;
        let selector = within(selector, e);
        let probs = float(probs);
        let out = Self {
            experts: output(&probs, [n, e], DType::I32),
            weights: output(&probs, [n, e], DType::F32),
            counts: output(&probs, [n], DType::I32),
            status: int(clean_status::<Cuda>(&device)),
        };
        let grid = [n.div_ceil(WARPS).max(1) as u32, 1, 1];
        let (k, entry) = match selector {
            Selector::TopP { k_max, .. } => (k_max.unwrap_or(0), "top_p"),
            Selector::TopK(k) => (k, "top_k"),
        };
        let dims = SelectDims::new(n, e, k);
        let outputs = [&out.experts, &out.weights, &out.counts, &out.status];
        match selector {
            Selector::TopP { threshold: p, .. } => {
                let threshold =
                    float(threshold.unwrap_or_else(|| Tensor::from_floats([p], &device)));
                let [a, b, c, d] = outputs;
                launch(
                    SELECT.kernel(entry, (WARPS * 32) as u32),
                    grid,
                    &[&probs, &threshold, a, b, c, d],
                    &dims,
                );
            }
            Selector::TopK(_) => {
                let [a, b, c, d] = outputs;
                launch(
                    SELECT.kernel(entry, (WARPS * 32) as u32),
                    grid,
                    &[&probs, a, b, c, d],
                    &dims,
                );
            }
        }
        Ok(out)
    }
}
