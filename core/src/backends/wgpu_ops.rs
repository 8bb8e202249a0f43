//! The routing ops on the WGSL kernels of `dtopp-shaders` (Vulkan, Metal, DX12, WebGPU):
//! [`super::DeviceOps`] over `RoutingKernels`, plus what only wgpu has (adapters shared
//! with the caller, awaitable batched reads for the browser).

use dtopp_shaders::wgpu;
use dtopp_shaders::{DispatchBuffers, GpuContext, RoutingKernels, SelectionBuffers};

use super::device_ops::{DeviceOps, FiniteCheck, GpuArray};
use super::kernel_set::forward_kernel_set;
use crate::error::Result;

/// The WGSL backend: kernels compiled once for one device.
pub type WgpuOps = DeviceOps<RoutingKernels>;
/// A wgpu buffer with the non-finite checks of everything it was computed from.
pub type DeviceArray = GpuArray<wgpu::Buffer>;

forward_kernel_set!(
    RoutingKernels,
    buffer: wgpu::Buffer,
    name: "wgpu",
    selection: SelectionBuffers,
    plan: DispatchBuffers,
    read: read_blocking,
    synchronize: synchronize,
);

/// Blocking read-back (native). In the browser a read must be awaited
/// ([`WgpuOps::read_ints_async`]), which the synchronous ops trait cannot do.
fn read_blocking<T: bytemuck::Pod>(
    kernels: &RoutingKernels,
    buffer: &wgpu::Buffer,
    len: usize,
) -> Result<Vec<T>> {
    #[cfg(not(target_arch = "wasm32"))]
    return kernels.read(buffer, len).map_err(|e| backend_error(&e));
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (kernels, buffer, len);
        Err(crate::error::Error::Backend {
            backend: "wgpu",
            message:
                "blocking read-back is not possible in the browser; await WgpuOps::read_ints_async"
                    .into(),
        })
    }
}

fn synchronize(kernels: &RoutingKernels) -> Result<()> {
    #[cfg(not(target_arch = "wasm32"))]
    kernels.synchronize().map_err(|e| backend_error(&e))?;
    let _ = kernels;
    Ok(())
}

impl WgpuOps {
    /// Requests an adapter and device (blocking; native) and compiles the kernels.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new() -> Result<Self> {
        Ok(Self::with_context(
            GpuContext::request_blocking().map_err(|e| backend_error(&e))?,
        ))
    }

    /// Requests an adapter and device and compiles the kernels (await it; in the browser
    /// this asks for WebGPU and fails, naming why, where the browser offers none).
    pub async fn request() -> Result<Self> {
        Ok(Self::with_context(
            GpuContext::request().await.map_err(|e| backend_error(&e))?,
        ))
    }

    /// Uses a device the caller already has (the trainer's, the app's, a test's).
    pub fn with_context(ctx: GpuContext) -> Self {
        DeviceOps {
            kernels: RoutingKernels::new(ctx),
        }
    }

    /// "name (backend, driver)" of the adapter, for logs.
    pub fn adapter_name(&self) -> String {
        self.kernels.context().adapter_name()
    }

    /// Reads several integer arrays with one mapping (awaitable in the browser, where the
    /// synchronous trait reads cannot block), with the same non-finite checks as
    /// [`crate::ops::RoutingOps::read_ints`].
    pub async fn read_ints_async(&self, arrays: &[&DeviceArray]) -> Result<Vec<Vec<i32>>> {
        let checks: Vec<&FiniteCheck<wgpu::Buffer>> =
            arrays.iter().flat_map(|a| &a.checks).collect();
        let requests: Vec<(&wgpu::Buffer, usize)> = checks
            .iter()
            .map(|c| (&c.status, 1))
            .chain(arrays.iter().map(|a| (&a.buffer, a.len)))
            .collect();
        let mut values: Vec<Vec<i32>> = self
            .kernels
            .read_many_async(&requests)
            .await
            .map_err(|e| backend_error(&e))?;
        let out = values.split_off(checks.len());
        for (c, status) in checks.iter().zip(&values) {
            let at = status[0] as u32;
            if at != u32::MAX {
                let at = at as usize;
                let source: Vec<f32> = self
                    .kernels
                    .read_async(&c.source, at + 1)
                    .await
                    .map_err(|e| backend_error(&e))?;
                return Err(c.error(at, source[at]));
            }
        }
        Ok(out)
    }
}
