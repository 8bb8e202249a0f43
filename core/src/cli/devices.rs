//! `--devices cuda:0,cuda:1`: the devices of a data-parallel run, all of one backend.

use super::Backend;
use crate::error::{Error, Result};

/// One device of `--devices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DeviceSpec {
    /// `cpu:N`: the host (burn's ndarray backend has one device; the ranks share it).
    Cpu(usize),
    /// `wgpu:N`: the N-th discrete GPU wgpu finds; `wgpu:integrated:N`, `wgpu:cpu`
    /// (a CPU adapter such as lavapipe), `wgpu:default` (burn's default choice).
    #[cfg(feature = "wgpu")]
    Wgpu(WgpuSpec),
    /// `cuda:N`: the N-th CUDA device.
    Cuda(usize),
}

/// Which wgpu adapter a `wgpu:` device names.
#[cfg(feature = "wgpu")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WgpuSpec {
    Discrete(usize),
    Integrated(usize),
    Cpu,
    Default,
}

impl DeviceSpec {
    pub(crate) fn backend(self) -> Backend {
        match self {
            DeviceSpec::Cpu(_) => Backend::Cpu,
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu(_) => Backend::Wgpu,
            DeviceSpec::Cuda(_) => Backend::Cuda,
        }
    }

    #[cfg(all(feature = "train", feature = "wgpu"))]
    pub(crate) fn wgpu_device(self) -> burn::backend::wgpu::WgpuDevice {
        use burn::backend::wgpu::WgpuDevice;
        match self {
            DeviceSpec::Wgpu(WgpuSpec::Discrete(i)) => WgpuDevice::DiscreteGpu(i),
            DeviceSpec::Wgpu(WgpuSpec::Integrated(i)) => WgpuDevice::IntegratedGpu(i),
            DeviceSpec::Wgpu(WgpuSpec::Cpu) => WgpuDevice::Cpu,
            _ => WgpuDevice::DefaultDevice,
        }
    }
}

/// Parses `--devices`: comma-separated `cpu:N`, `wgpu:N` / `wgpu:integrated:N` /
/// `wgpu:cpu` / `wgpu:default`, or `cuda:N`, all of one backend.
pub(crate) fn parse_devices(list: &str) -> Result<Vec<DeviceSpec>> {
    let bad = |item: &str, why: &str| {
        Error::param(
            "--devices",
            list,
            format!(
                "{why} (`{item}`); expected a comma-separated list such as cuda:0,cuda:1, wgpu:0,wgpu:1 or cpu:0,cpu:1"
            ),
        )
    };
    let index = |item: &str, n: &str| {
        n.parse::<usize>()
            .map_err(|_| bad(item, "a device index must be a whole number"))
    };
    let mut devices = Vec::new();
    for item in list.split(',').map(str::trim) {
        let parts: Vec<&str> = item.split(':').collect();
        let device = match parts.as_slice() {
            ["cpu", n] => DeviceSpec::Cpu(index(item, n)?),
            ["cuda", n] => DeviceSpec::Cuda(index(item, n)?),
            #[cfg(feature = "wgpu")]
            ["wgpu", "cpu"] => DeviceSpec::Wgpu(WgpuSpec::Cpu),
            #[cfg(feature = "wgpu")]
            ["wgpu", "default"] => DeviceSpec::Wgpu(WgpuSpec::Default),
            #[cfg(feature = "wgpu")]
            ["wgpu", "integrated", n] => DeviceSpec::Wgpu(WgpuSpec::Integrated(index(item, n)?)),
            #[cfg(feature = "wgpu")]
            ["wgpu", n] => DeviceSpec::Wgpu(WgpuSpec::Discrete(index(item, n)?)),
            _ => return Err(bad(item, "unknown device")),
        };
        if let Some(first) = devices.first().copied()
            && DeviceSpec::backend(first) != device.backend()
        {
            return Err(bad(item, "every device must be of the same backend"));
        }
        devices.push(device);
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::{DeviceSpec, parse_devices};

    #[test]
    fn parses_lists_of_one_backend() {
        assert_eq!(
            parse_devices("cuda:0,cuda:1").unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert_eq!(
            parse_devices("cpu:0, cpu:1").unwrap(),
            vec![DeviceSpec::Cpu(0), DeviceSpec::Cpu(1)]
        );
        #[cfg(feature = "wgpu")]
        assert_eq!(parse_devices("wgpu:cpu,wgpu:1").unwrap().len(), 2);
        for (bad, why) in [
            ("cuda:0,cpu:1", "same backend"),
            ("cuda:x", "whole number"),
            ("tpu:0", "unknown device"),
            ("", "unknown device"),
        ] {
            let e = parse_devices(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--devices"), "{bad}: {e}");
        }
    }
}
