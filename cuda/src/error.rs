//! What can go wrong with the CUDA backend, each message naming the cause.

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The crate was built without its `cuda` feature.
    #[error(
        "the CUDA backend is not in this build: rebuild with `--features cuda` (it needs no CUDA toolkit to build; at run time it needs an NVIDIA driver)"
    )]
    NotBuilt,
    /// A runtime library (the driver's libcuda, or NVRTC) could not be loaded.
    #[error("{library} could not be loaded: {hint}")]
    MissingLibrary {
        /// Which library.
        library: &'static str,
        /// What to install or set.
        hint: &'static str,
    },
    /// No CUDA device with this ordinal.
    #[error("no CUDA device {ordinal}: {message}")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// The driver's answer.
        message: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {file}: {log}")]
    Compile {
        /// The `.cu` file.
        file: &'static str,
        /// The compiler log.
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA {what}: {message}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A problem too large for 32-bit indexing in the kernels.
    #[error(
        "{what} needs {elements} elements; the kernels index with 32 bits (at most {limit}): split the batch"
    )]
    TooLarge {
        /// Which buffer.
        what: String,
        /// Elements needed.
        elements: u64,
        /// The limit.
        limit: u64,
    },
}
