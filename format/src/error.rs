//! The one error type of the runtime: every failure says what and where.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, planning or running a step graph.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed at the OS level.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid ONNX protobuf (or are truncated).
    #[error("{what}: not a valid ONNX model: {detail}")]
    Decode {
        /// The file or buffer name.
        what: String,
        /// Decoder message.
        detail: String,
    },
    /// The file exceeds a resource limit of [`crate::limits::Limits`] (size, counts, lengths, cache bytes).
    #[error("{what} is {value}, over the limit of {max}")]
    Limit {
        /// What was measured (names the tensor or key).
        what: String,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// The model violates the onestep step-graph contract (missing metadata, wrong version, ...).
    #[error("contract violation: {0}")]
    Contract(String),
    /// A metadata key is missing or has a malformed value.
    #[error("metadata key `{key}`: {detail}")]
    Metadata {
        /// The key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Ops the runtime does not implement; all of them are listed at once.
    #[error("unsupported ops: {}", .0.join(", "))]
    UnsupportedOps(Vec<String>),
    /// An opset import the runtime does not accept.
    #[error("unsupported opset: domain `{domain}` version {version}")]
    Opset {
        /// Opset domain ("" is the default ONNX domain).
        domain: String,
        /// Version imported by the model.
        version: i64,
    },
    /// A tensor (initializer, input or intermediate) is malformed.
    #[error("tensor `{name}`: {detail}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A node cannot be planned or executed with the shapes/dtypes it receives.
    #[error("node `{node}` ({op}): {detail}")]
    Node {
        /// Node name.
        node: String,
        /// Op type.
        op: String,
        /// What is wrong.
        detail: String,
    },
    /// A caller-supplied argument is out of range (prompt too long, empty, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat-template rendering failure.
    #[error("chat template: {0}")]
    Template(String),
    /// The GPU cannot be used, or failed: see [`DeviceFault`]. With `device = auto` a model that meets
    /// one at load runs on the CPU instead.
    #[error("GPU ({fault}): {detail}")]
    Device {
        /// What kind of failure.
        fault: DeviceFault,
        /// What failed, naming the kernel, buffer or step.
        detail: String,
    },
    /// A broken invariant inside onestep: a bug, never the input's fault. Reported, never hidden by a
    /// fallback; the model and other sequences stay usable.
    #[error("internal error (a bug in onestep; please report it): {0}")]
    Internal(String),
    /// Generation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

/// The kinds of [`Error::Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    /// No adapter, or the device could not be opened.
    NoAdapter,
    /// The adapter's limits are too small for the model (a binding, a buffer).
    Limits,
    /// A step the GPU kernels do not take (its shapes, dtypes or pattern).
    Unsupported,
    /// The device ran out of memory.
    OutOfMemory,
    /// The driver rejected a kernel or a command (a validation error).
    Rejected,
    /// The device was lost, or waiting for it failed.
    Lost,
    /// The GPU did not finish in time.
    Timeout,
}

impl std::fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceFault::NoAdapter => "no usable adapter",
            DeviceFault::Limits => "adapter limits",
            DeviceFault::Unsupported => "unsupported step",
            DeviceFault::OutOfMemory => "out of memory",
            DeviceFault::Rejected => "rejected by the driver",
            DeviceFault::Lost => "device lost",
            DeviceFault::Timeout => "timeout",
        })
    }
}

impl Error {
    /// Shorthand for an [`Error::Device`] error.
    pub fn device(fault: DeviceFault, detail: impl Into<String>) -> Self {
        Error::Device {
            fault,
            detail: detail.into(),
        }
    }
    /// Shorthand for an [`Error::Internal`] error.
    pub fn internal(detail: impl Into<String>) -> Self {
        Error::Internal(detail.into())
    }
    /// Whether this is a device failure (an [`Error::Device`]), the only kind `device = auto` answers
    /// by running on the CPU.
    pub fn is_device(&self) -> bool {
        matches!(self, Error::Device { .. })
    }
    /// Shorthand for a [`Error::Node`] error.
    pub fn node(node: &str, op: &str, detail: impl Into<String>) -> Self {
        Error::Node {
            node: node.to_string(),
            op: op.to_string(),
            detail: detail.into(),
        }
    }
    /// Shorthand for a [`Error::Tensor`] error.
    pub fn tensor(name: &str, detail: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.to_string(),
            detail: detail.into(),
        }
    }
}
