//! A wgpu device and queue, requested here or handed in by the caller.

use std::sync::Arc;

use crate::error::ShaderError;

/// The device the kernels run on. Cheap to clone (the handles are reference counted).
#[derive(Clone, Debug)]
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// What the adapter is (name, driver, backend), for logs and benchmarks.
    pub info: Arc<wgpu::AdapterInfo>,
}

impl GpuContext {
    /// Wraps a device that the caller already has (the trainer's, the app's).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        Self {
            device,
            queue,
            info: Arc::new(info),
        }
    }

    /// Requests the best adapter (high performance; a software adapter such as lavapipe
    /// counts) and a device with that adapter's own limits, so large routing batches fit.
    /// Works on wasm32 too (await it there).
    pub async fn request() -> Result<Self, ShaderError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
            })
            .await
            .map_err(|e| ShaderError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("dtopp routing"),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| ShaderError::RequestDevice {
                adapter: info.name.clone(),
                message: e.to_string(),
            })?;
        Ok(Self::from_device(device, queue, info))
    }

    /// [`GpuContext::request`], blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn request_blocking() -> Result<Self, ShaderError> {
        pollster::block_on(Self::request())
    }

    /// "name (backend, driver)" of the adapter; browsers tell no name or driver
    /// ("WebGPU (browser adapter)").
    pub fn adapter_name(&self) -> String {
        let info = &self.info;
        if info.backend == wgpu::Backend::BrowserWebGpu && info.name.is_empty() {
            return "WebGPU (browser adapter)".into();
        }
        format!("{} ({:?}, {})", info.name, info.backend, info.driver)
    }
}
