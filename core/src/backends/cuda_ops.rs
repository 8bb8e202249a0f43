//! The routing ops on the CUDA kernels of `dtopp-cuda` (NVRTC at run time; a stand-in
//! whose constructor says so in builds without the `cuda` feature): [`super::DeviceOps`]
//! over `CudaKernels`.

use dtopp_cuda::{CudaKernels, DeviceBuffer, DispatchBuffers, FUSED_MAX_EXPERTS, SelectionBuffers};

use super::device_ops::{DeviceOps, GpuArray};
use super::kernel_set::{Keep, KernelSet, RoutedBuffers, forward_kernel_set};
use crate::error::Result;

/// The CUDA backend: kernels loaded once on one device.
pub type CudaOps = DeviceOps<CudaKernels>;
/// A CUDA buffer with the non-finite checks of everything it was computed from.
pub type CudaArray = GpuArray<DeviceBuffer>;

forward_kernel_set!(
    CudaKernels,
    buffer: DeviceBuffer,
    name: "cuda",
    selection: SelectionBuffers,
    plan: DispatchBuffers,
    read: read,
    synchronize: synchronize,
    fused: (drn_select, fuses_drn_select),
);

/// DRN and selection in one kernel (`route.cu`) up to [`FUSED_MAX_EXPERTS`] experts, the
/// two kernels above that.
fn drn_select(
    kernels: &CudaKernels,
    logits: &DeviceBuffer,
    tokens: usize,
    experts: usize,
    theta: Option<f32>,
    keep: Keep<'_, DeviceBuffer>,
) -> Result<RoutedBuffers<DeviceBuffer>> {
    if !fuses_drn_select(kernels, experts) {
        return kernels.drn_then_select(logits, tokens, experts, theta, keep);
    }
    let (threshold, limit) = match keep {
        Keep::TopP { threshold, k_max } => (Some(threshold), k_max.unwrap_or(experts)),
        Keep::TopK(k) => (None, k),
    };
    let out = kernels
        .drn_select(
            logits,
            tokens,
            experts,
            theta,
            threshold,
            limit.min(experts),
        )
        .map_err(|e| backend_error(&e))?;
    Ok(RoutedBuffers {
        probs: out.probs,
        logit_status: out.logit_status,
        selection: selection_of(out.selection),
    })
}

fn fuses_drn_select(_kernels: &CudaKernels, experts: usize) -> bool {
    experts <= FUSED_MAX_EXPERTS
}

fn read<T: bytemuck::Pod>(
    kernels: &CudaKernels,
    buffer: &DeviceBuffer,
    len: usize,
) -> Result<Vec<T>> {
    kernels.read(buffer, len).map_err(|e| backend_error(&e))
}

fn synchronize(kernels: &CudaKernels) -> Result<()> {
    kernels.synchronize().map_err(|e| backend_error(&e))
}

impl CudaOps {
    /// Opens CUDA device `ordinal` and loads the kernels (compiled by NVRTC once per
    /// process). Fails, naming what is missing, without the `cuda` feature, without a
    /// driver, without NVRTC or without the device; never falls back to another backend.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(DeviceOps {
            kernels: CudaKernels::new(ordinal).map_err(|e| backend_error(&e))?,
        })
    }

    /// "name (device N)" of the GPU, for logs.
    pub fn device_name(&self) -> String {
        self.kernels.device_name()
    }

    /// Bytes of device memory in use on this GPU (all processes, memory pools included).
    pub fn memory_in_use(&self) -> Result<u64> {
        self.kernels.memory_in_use().map_err(|e| backend_error(&e))
    }
}
