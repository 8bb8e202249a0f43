//! What a training device can hold, as far as each backend can tell, so that a run that
//! cannot fit is refused by name before it allocates ([`crate::train::check_fits`])
//! instead of aborting inside the allocator.
//!
//! - **ndarray**: the host's available memory (sysinfo; inside a container with a
//!   memory limit, the limit less its processes' resident memory when that is lower).
//!   Data-parallel CPU ranks share it.
//! - **wgpu**: wgpu's portable API reports no memory size, only limits. What it does
//!   report is binding: one tensor cannot exceed the device's
//!   `max_storage_buffer_binding_size` (cubecl-wgpu allocates no page larger). On a CPU
//!   adapter (Mesa's lavapipe) the buffers live in host memory, so the host's available
//!   memory is the total.
//! - **CUDA**: the driver's free memory on the device (`cuMemGetInfo`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::Backend;

/// What one device offers a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes a run may use, where the backend can tell.
    pub available: Option<u64>,
    /// What `available` is, or why it is unknown (for messages).
    pub what: String,
    /// The most bytes one tensor may take, where the device has such a limit.
    pub largest_tensor: Option<u64>,
    /// Whether the data-parallel ranks of one run share `available` (host memory) rather
    /// than each having its own device.
    pub shared_by_ranks: bool,
}

impl DeviceMemory {
    /// The host's memory available now.
    pub fn host() -> Self {
        use sysinfo::System;
        let mut system = System::new();
        system.refresh_memory();
        let mut available = system.available_memory();
        let mut what = "host memory available".to_string();
        // A container's limit, where it has one below the host's memory. sysinfo's own
        // `free_memory` of a cgroup is the limit minus its usage, and the usage counts
        // the page cache (a build's files fill it), so the limit minus the processes'
        // resident memory is what can still be had.
        if let Some(cgroup) = system.cgroup_limits()
            && cgroup.total_memory < system.total_memory()
        {
            let free = cgroup.total_memory.saturating_sub(cgroup.rss);
            if free < available {
                available = free;
                what = "memory available under this container's limit (cgroup)".to_string();
            }
        }
        Self {
            // sysinfo reports 0 where it cannot read the figure: unknown, not full.
            available: (available > 0).then_some(available),
            what,
            largest_tensor: None,
            shared_by_ranks: true,
        }
    }

    /// Nothing known.
    pub fn unknown(why: impl Into<String>) -> Self {
        Self {
            available: None,
            what: why.into(),
            largest_tensor: None,
            shared_by_ranks: false,
        }
    }
}

/// A burn backend that can say what its devices hold.
pub trait DeviceMemoryBackend: Backend {
    /// What `device` offers a run now.
    fn device_memory(_device: &Self::Device) -> DeviceMemory {
        DeviceMemory::unknown("this backend reports no memory size")
    }
}

impl DeviceMemoryBackend for burn::backend::NdArray {
    fn device_memory(_device: &Self::Device) -> DeviceMemory {
        DeviceMemory::host()
    }
}

#[cfg(feature = "wgpu")]
impl DeviceMemoryBackend for burn::backend::Wgpu {
    fn device_memory(device: &Self::Device) -> DeviceMemory {
        let Some((info, limits)) = super::routing_backend::wgpu::adapter(device) else {
            return DeviceMemory::unknown("the wgpu device is not set up yet");
        };
        let largest_tensor = Some(limits.max_storage_buffer_binding_size);
        if info.device_type == dtopp_shaders::wgpu::DeviceType::Cpu {
            return DeviceMemory {
                what: format!("host memory available (to {}, a CPU adapter)", info.name),
                largest_tensor,
                ..DeviceMemory::host()
            };
        }
        DeviceMemory {
            available: None,
            what: format!(
                "{} reports no memory size through wgpu (only its largest buffer binding is checked)",
                info.name
            ),
            largest_tensor,
            shared_by_ranks: false,
        }
    }
}

#[cfg(not(feature = "wgpu"))]
impl DeviceMemoryBackend for burn::backend::Wgpu {}

#[cfg(feature = "cuda")]
impl DeviceMemoryBackend for burn::backend::Cuda {
    fn device_memory(device: &Self::Device) -> DeviceMemory {
        match dtopp_cuda::device_memory(device.index) {
            Ok((free, total)) => DeviceMemory {
                available: Some(free),
                what: format!(
                    "free memory of CUDA device {} ({:.2} GiB in all)",
                    device.index,
                    total as f64 / (1u64 << 30) as f64
                ),
                largest_tensor: None,
                shared_by_ranks: false,
            },
            Err(e) => DeviceMemory::unknown(format!(
                "the memory of CUDA device {} could not be read: {e}",
                device.index
            )),
        }
    }
}

impl<B: DeviceMemoryBackend, C: CheckpointStrategy> DeviceMemoryBackend for Autodiff<B, C> {
    fn device_memory(device: &Self::Device) -> DeviceMemory {
        B::device_memory(device)
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceMemory;

    #[test]
    fn the_host_reports_its_memory() {
        let host = DeviceMemory::host();
        let available = host.available.expect("sysinfo reads this machine's memory");
        assert!(available > 1 << 20, "{host:?}");
        assert!(host.shared_by_ranks);
    }
}
