//! burn-wgpu routes with dtopp's WGSL kernels (`dtopp-shaders`: `select.wgsl`,
//! `dispatch.wgsl`) on burn's own buffers.
//!
//! burn-wgpu pools many tensors in one `wgpu::Buffer`; cubecl hands out the buffer, offset
//! and size of a tensor (`ComputeClient::get_resource`, which also keeps the allocation
//! alive while the resource is held). The kernels are bound to those ranges and submitted
//! on burn's own queue, right after cubecl has submitted its pending work
//! (`ComputeClient::flush`): one queue, so everything burn recorded before runs before
//! them and everything it records after runs after them. No second device, no host copy.
//!
//! cubecl gives no way back from a running device to its `wgpu::Device`, so the device is
//! set up here before burn first uses it ([`setup`]): cubecl's own `init_setup` with
//! the adapter choice of the `WgpuDevice`, its device and queue kept beside the compiled
//! pipelines. A device burn set up on its own is refused by name, never routed elsewhere.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};

use burn::backend::Wgpu;
use burn::backend::wgpu::graphics::AutoGraphicsApi;
use burn::backend::wgpu::{CubeTensor, RuntimeOptions, WgpuDevice, WgpuRuntime, init_setup};
use burn::tensor::{Int, Tensor};
use dtopp_shaders::{Bound, GpuContext, PlanOut, RoutingKernels, SelectionOut};

use super::device_plan::DevicePlan;
use super::{RoutingBackend, clean_status, mask_and_rank, within};
use crate::error::{Error, Result};
use crate::model::route::Route;
use crate::model::routing::Selector;
use crate::ops::RouteShape;

/// The kernels compiled for each device set up through [`setup`].
static DEVICES: Mutex<Vec<(WgpuDevice, Arc<RoutingKernels>)>> = Mutex::new(Vec::new());

/// Sets up burn's wgpu `device` so that dtopp's kernels share it, before any tensor is
/// made on it; again on a device already set up here does nothing. Returns the adapter
/// ("name (backend, driver)").
pub fn setup(device: &WgpuDevice) -> Result<String> {
    let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, kernels)) = devices.iter().find(|(d, _)| d == device) {
        return Ok(kernels.context().adapter_name());
    }
    // cubecl panics where it finds no adapter, and when burn already runs the device
    // (it made a tensor there first).
    let made = catch_unwind(AssertUnwindSafe(|| {
        init_setup::<AutoGraphicsApi>(device, RuntimeOptions::default())
    }))
    .map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no reason given");
        Error::Backend {
            backend: "wgpu",
            message: format!(
                "cannot set up burn's wgpu device {device:?} for dtopp's WGSL routing: {why} (a device burn already runs cannot be set up again: call dtopp::model::wgpu_routing::setup on it before making any tensor there; without a GPU install Mesa's lavapipe: apt-get install mesa-vulkan-drivers)"
            ),
        }
    })?;
    let info = made.adapter.get_info();
    let kernels = Arc::new(RoutingKernels::new(GpuContext::from_device(
        made.device,
        made.queue,
        info,
    )));
    let adapter = kernels.context().adapter_name();
    devices.push((device.clone(), kernels));
    Ok(adapter)
}

/// The adapter and limits of a device set up through [`setup`], `None` before that.
pub(crate) fn adapter(
    device: &WgpuDevice,
) -> Option<(
    dtopp_shaders::wgpu::AdapterInfo,
    dtopp_shaders::wgpu::Limits,
)> {
    let kernels = kernels(device).ok()?;
    let context = kernels.context();
    Some(((*context.info).clone(), context.device.limits()))
}

pub(super) fn kernels(device: &WgpuDevice) -> Result<Arc<RoutingKernels>> {
    let devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
    devices
        .iter()
        .find(|(d, _)| d == device)
        .map(|(_, k)| k.clone())
        .ok_or_else(|| Error::Backend {
            backend: "wgpu",
            message: format!(
                "wgpu device {device:?} was not set up for dtopp's WGSL routing: call dtopp::model::wgpu_routing::setup on it before making any tensor there"
            ),
        })
}

impl RoutingBackend for Wgpu {
    fn routing_name(device: &Self::Device) -> String {
        match kernels(device) {
            Ok(k) => format!(
                "dtopp WGSL kernels on burn's wgpu buffers ({})",
                k.context().adapter_name()
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
        let device = probs.device();
        let kernels = kernels(&device)?;
        let [n, e] = probs.dims();
        RouteShape::new(n, e)?;
        let selector = within(selector, e);
        let k_bound = selector.k_bound(e);

        let sel = Launched::selection(&kernels, probs, selector, threshold, n, e)?;
        let (experts, counts, status) =
            (sel.experts.clone(), sel.counts.clone(), sel.status.clone());
        let chunks = Tensor::<Self, 1, Int>::empty([RoutingKernels::plan_chunks(n) * e], &device);
        let expert_counts = Tensor::<Self, 1, Int>::empty([e], &device);
        let offsets = Tensor::<Self, 1, Int>::empty([e + 1], &device);
        let route_tokens = Tensor::<Self, 1, Int>::empty([n * k_bound], &device);
        let route_weights = Tensor::<Self, 1>::empty([n * k_bound], &device);
        let token_routes = Tensor::<Self, 2, Int>::empty([n, e], &device);
        let inputs = [
            int(sel.experts),
            float(sel.weights),
            int(sel.counts),
            int(chunks),
            int(expert_counts),
            int(offsets.clone()),
            int(route_tokens.clone()),
            float(route_weights),
            int(token_routes.clone()),
        ];
        launch(&inputs, |b| {
            kernels.dispatch_plan_into(
                [b[0], b[1], b[2]],
                n,
                e,
                PlanOut {
                    chunk_offsets: b[3],
                    expert_counts: b[4],
                    expert_offsets: b[5],
                    route_tokens: b[6],
                    route_weights: b[7],
                    token_routes: b[8],
                },
            )
        })?;

        DevicePlan {
            experts,
            counts,
            status,
            offsets,
            route_tokens,
            token_routes,
        }
        .into_route(logits, selector)
    }

    fn select(
        probs: Tensor<Self, 2>,
        selector: Selector,
        threshold: Option<Tensor<Self, 1>>,
    ) -> Result<(Tensor<Self, 2, Int>, Tensor<Self, 2, Int>)> {
        let device = probs.device();
        let kernels = kernels(&device)?;
        let [n, e] = probs.dims();
        RouteShape::new(n, e)?;
        let sel = Launched::selection(&kernels, probs, within(selector, e), threshold, n, e)?;
        Ok(mask_and_rank(sel.experts, sel.counts))
    }
}

/// A selection the kernels wrote into burn tensors (the ops contract's layout).
struct Launched {
    experts: Tensor<Wgpu, 2, Int>,
    weights: Tensor<Wgpu, 2>,
    counts: Tensor<Wgpu, 1, Int>,
    /// `[1]` the first non-finite probability, row-major, or -1 (`u32::MAX`).
    status: Tensor<Wgpu, 1, Int>,
}

impl Launched {
    /// Top-p (at `threshold` on the device, else the selector's) or Top-k of `probs`.
    fn selection(
        kernels: &RoutingKernels,
        probs: Tensor<Wgpu, 2>,
        selector: Selector,
        threshold: Option<Tensor<Wgpu, 1>>,
        n: usize,
        e: usize,
    ) -> Result<Self> {
        let device = probs.device();
        let out = Self {
            experts: Tensor::empty([n, e], &device),
            weights: Tensor::empty([n, e], &device),
            counts: Tensor::empty([n], &device),
            status: clean_status::<Wgpu>(&device),
        };
        let threshold = match selector {
            Selector::TopP { threshold: p, .. } => {
                threshold.unwrap_or_else(|| Tensor::from_floats([p], &device))
            }
            // Not read by top_k; bound so that both selections take the same list.
            Selector::TopK(_) => Tensor::zeros([1], &device),
        };
        let inputs = [
            float(probs),
            float(threshold),
            int(out.experts.clone()),
            float(out.weights.clone()),
            int(out.counts.clone()),
            int(out.status.clone()),
        ];
        launch(&inputs, |b| {
            let sel = SelectionOut {
                experts: b[2],
                weights: b[3],
                counts: b[4],
                status: b[5],
            };
            match selector {
                Selector::TopP { k_max, .. } => kernels.top_p_into(b[0], b[1], n, e, k_max, sel),
                Selector::TopK(k) => kernels.top_k_into(b[0], n, e, k, sel),
            }
        })?;
        Ok(out)
    }
}

/// Binds `tensors` (holding their allocations while the kernels are recorded), submits
/// what burn has recorded so far, and runs `kernels` on the ranges, in order.
pub(super) fn launch(
    tensors: &[CubeTensor<WgpuRuntime>],
    kernels: impl FnOnce(&[Bound<'_>]) -> std::result::Result<(), dtopp_shaders::ShaderError>,
) -> Result<()> {
    let held = tensors
        .iter()
        .map(|t| t.client.get_resource(t.handle.clone()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| backend_error("binding a tensor's buffer", e))?;
    let bound: Vec<Bound<'_>> = held
        .iter()
        .map(|h| {
            let r = h.resource();
            Bound {
                buffer: &r.buffer,
                offset: r.offset,
                size: r.size,
            }
        })
        .collect();
    // Everything burn recorded (the kernels' inputs among it) goes to the queue first.
    if let Some(t) = tensors.first() {
        t.client
            .flush()
            .map_err(|e| backend_error("submitting burn's pending work", e))?;
    }
    kernels(&bound).map_err(shader_error)
}

/// The row-move and DRN kernels run only on a device whose routing was set up
/// ([`setup`], which fails with a named error), and inside burn ops that cannot return
/// one, so a failure there is a broken invariant, not bad input.
pub(super) fn or_panic<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("dtopp's {what} kernel on burn-wgpu: {e}"))
}

/// The contiguous cubecl tensor behind a burn float tensor.
pub(super) fn float<const D: usize>(t: Tensor<Wgpu, D>) -> CubeTensor<WgpuRuntime> {
    burn_cubecl::kernel::into_contiguous(t.into_primitive().tensor())
}

/// The contiguous cubecl tensor behind a burn int tensor.
pub(super) fn int<const D: usize>(t: Tensor<Wgpu, D, Int>) -> CubeTensor<WgpuRuntime> {
    burn_cubecl::kernel::into_contiguous(t.into_primitive())
}

fn backend_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "wgpu",
        message: format!("{what}: {e:?}"),
    }
}

fn shader_error(e: dtopp_shaders::ShaderError) -> Error {
    Error::Backend {
        backend: "wgpu",
        message: e.to_string(),
    }
}
