//! The error type of the WGSL backend.

/// What can go wrong creating or running the WGSL kernels.
#[derive(Debug, thiserror::Error)]
pub enum ShaderError {
    /// No GPU adapter (not even a software one such as lavapipe) is available.
    #[error(
        "no wgpu adapter found ({0}); on Linux without a GPU install Mesa's lavapipe: apt-get install mesa-vulkan-drivers"
    )]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("cannot create a wgpu device on {adapter}: {message}")]
    RequestDevice { adapter: String, message: String },
    /// An input needs a buffer larger than the device allows.
    #[error(
        "{what} needs {bytes} bytes in one storage buffer, but this device allows {limit} ({adapter}); split the batch"
    )]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
        adapter: String,
    },
    /// An op's arguments are outside what the kernels support.
    #[error("{op}: {message}")]
    Unsupported { op: &'static str, message: String },
    /// Reading a buffer back failed (device lost, or not possible on this platform).
    #[error("reading a buffer back failed: {0}")]
    ReadBack(String),
}
