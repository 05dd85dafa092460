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
    /// The file exceeds a resource limit of [`crate::load::Limits`] (size, counts, lengths, cache bytes).
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
    /// The GPU backend failed: no adapter, a kernel the driver rejects, out of memory, device lost.
    #[error("GPU: {0}")]
    Gpu(String),
    /// Generation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
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
