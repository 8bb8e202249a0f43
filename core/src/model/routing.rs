//! Where a training step's selection and dispatch plan run: the routing ops of the run's
//! backend (the CPU reference, the WGSL kernels on a wgpu adapter or the CUDA kernels
//! on an NVIDIA GPU) on a host copy of the probabilities, or burn tensor ops on the
//! model's own device ([`RouteEngine::Device`], `--route-on device`); never a silent
//! substitute. The probabilities come from the model (burn, differentiable).

use super::routing_backend::RoutingBackend;
use crate::cpu_fast::CpuFast;
use crate::error::{Error, Result};
use crate::ops::{HostDispatchPlan, HostSelection, RouteShape, RoutingOps};

/// How experts are selected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selector {
    /// The `k` most probable experts.
    TopK(usize),
    /// Top-p at `threshold`, optionally capped at `k_max`.
    TopP {
        /// `p` in (0, 1].
        threshold: f32,
        /// Cap on experts per token.
        k_max: Option<usize>,
    },
}

/// The routing-ops implementation a run uses for Top-k/Top-p selection and the
/// dispatch plan.
pub enum RouteEngine {
    /// The fast CPU routing ops (`dtopp::cpu_fast`), which conform to the reference.
    Cpu(CpuFast),
    /// The WGSL kernels (`dtopp-shaders`) through wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(Box<crate::backends::WgpuOps>),
    /// The CUDA kernels (`dtopp-cuda`).
    Cuda(Box<crate::backends::CudaOps>),
    /// The backend's routing ops ([`super::RoutingBackend`]) on the device that holds the
    /// model: the probabilities stay there; the host reads the plan's head (`E + 4`
    /// integers) per layer.
    Device,
    /// The same selection in the padded layout ([`super::padded_routing`]): nothing is
    /// read back per layer; the trainer checks the bounds once per step.
    DevicePadded,
}

impl std::fmt::Debug for RouteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl RouteEngine {
    /// Which implementation runs, for the log (`cpu reference`, `wgpu WGSL kernels on
    /// <adapter>`).
    pub fn describe(&self) -> String {
        match self {
            RouteEngine::Cpu(_) => "dtopp fast CPU routing ops".to_string(),
            #[cfg(feature = "wgpu")]
            RouteEngine::Wgpu(ops) => format!("dtopp WGSL kernels on {}", ops.adapter_name()),
            RouteEngine::Cuda(ops) => format!("dtopp CUDA kernels on {}", ops.device_name()),
            RouteEngine::Device => "the backend's routing ops on the model's device".to_string(),
            RouteEngine::DevicePadded => {
                "the backend's routing ops on the model's device, experts in padded buffers (no read-back per layer)"
                    .to_string()
            }
        }
    }

    /// [`RouteEngine::describe`], naming what routes on backend `B` for the device
    /// engines (`B`'s [`RoutingBackend::route`]: dtopp's WGSL on burn-wgpu's buffers, the
    /// fast CPU ops on burn ndarray, burn tensor ops elsewhere).
    pub fn describe_on<B: RoutingBackend>(&self, device: &B::Device) -> String {
        match self {
            RouteEngine::Device => B::routing_name(device),
            RouteEngine::DevicePadded => format!(
                "{}, experts in padded buffers (no read-back per layer)",
                B::routing_name(device)
            ),
            _ => self.describe(),
        }
    }

    /// Selection and dispatch plan of probabilities `[N, E]` (host copy); not for
    /// [`RouteEngine::Device`], which routes the tensor itself.
    pub fn route(
        &self,
        probs: &[f32],
        shape: RouteShape,
        selector: Selector,
    ) -> Result<(HostSelection, HostDispatchPlan)> {
        match self {
            RouteEngine::Cpu(ops) => route_with(ops, probs, shape, selector),
            #[cfg(feature = "wgpu")]
            RouteEngine::Wgpu(ops) => route_with(ops.as_ref(), probs, shape, selector),
            RouteEngine::Cuda(ops) => route_with(ops.as_ref(), probs, shape, selector),
            RouteEngine::Device | RouteEngine::DevicePadded => Err(Error::param(
                "route engine",
                "device",
                "a kernel engine for host probabilities (the device engine routes tensors)",
            )),
        }
    }
}

fn route_with<O: RoutingOps>(
    ops: &O,
    probs: &[f32],
    shape: RouteShape,
    selector: Selector,
) -> Result<(HostSelection, HostDispatchPlan)> {
    let probs = ops.upload_floats(probs)?;
    let selection = match selector {
        Selector::TopK(k) => ops.top_k(&probs, shape, k)?,
        Selector::TopP { threshold, k_max } => {
            let threshold = ops.upload_floats(&[threshold])?;
            ops.top_p(&probs, shape, &threshold, k_max)?
        }
    };
    let plan = ops.dispatch_plan(&selection)?;
    Ok((ops.read_selection(&selection)?, ops.read_plan(&plan)?))
}
