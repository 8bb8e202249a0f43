//! The one error type of the `dtopp` crate. Every message names what was wrong and what
//! was expected, so a user can fix the input without reading the source.

use std::path::PathBuf;

/// Errors from routing ops, the controller, the simulator and the I/O around them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shape argument does not fit the data (wrong length, zero size, wrong rank).
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },

    /// An input value (router logit, probability, activation) is NaN or infinite. The
    /// first offending element in row-major order is reported, so every backend names
    /// the same position.
    #[error(
        "{op}: {what} at token {token}, column {column} is {value} ({what}s must be finite; a NaN usually means the model diverged)"
    )]
    NonFinite {
        op: &'static str,
        what: &'static str,
        token: usize,
        column: usize,
        value: f32,
    },

    /// A scalar parameter is outside its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },

    /// A `.npy` / `.npz` array could not be read or does not have the expected form.
    #[error("{path}: {message}")]
    Array { path: PathBuf, message: String },

    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Serialized state (controller, checkpoint) could not be parsed.
    #[error("cannot parse {what}: {message}")]
    Parse { what: &'static str, message: String },

    /// A training run would not fit in its device's memory; refused before allocating.
    #[error("the run does not fit on {device}: it needs {needed}, but {available}; {drivers}")]
    DoesNotFit {
        device: String,
        needed: String,
        available: String,
        drivers: String,
    },

    /// A backend could not be created or failed on the device.
    #[error("backend {backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },

    /// A multi-node run could not start, or stopped because a node, the orchestrator or
    /// the connection between them failed; the message names which.
    #[error("multi-node run: {0}")]
    Cluster(String),
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Self::Shape {
            op,
            message: message.into(),
        }
    }

    pub(crate) fn param(
        name: &'static str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Self::InvalidParameter {
            name,
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
