//! The graph IR shared by the exporter (which traces into it) and the runtime (which loads into it).
//!
//! It is a thin, owned mirror of an ONNX graph: named values, nodes in topological order with their
//! attributes, and initializers whose bytes are a [`Bytes`] handle — a slice of the memory-mapped file
//! when loaded, an owned buffer when traced. Nothing here copies weight bytes.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Element types the step graph uses (ONNX `TensorProto.DataType` subset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Signed byte.
    I8,
    /// Unsigned byte (also packed 4-bit data).
    U8,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Boolean (one byte).
    Bool,
}

impl DType {
    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::BF16 => 16,
        }
    }
    /// From an ONNX `TensorProto.DataType` code.
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            10 => DType::F16,
            16 => DType::BF16,
            _ => return None,
        })
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }
    /// Short lowercase name (`f32`, `i64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension of a graph input/output: a number or a symbol (the chunk length `T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// Known size.
    Known(usize),
    /// Symbolic size (`T`).
    Sym(String),
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<Dim>,
}

/// A node attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// Integer.
    Int(i64),
    /// Float.
    Float(f32),
    /// Integers.
    Ints(Vec<i64>),
    /// Floats.
    Floats(Vec<f32>),
    /// String.
    Str(String),
    /// A constant tensor (the `value` of `Constant`).
    Tensor(Initializer),
    /// A subgraph (the branches of `If`). It reads values of the enclosing graphs by name; its
    /// `inputs` are empty for `If` branches, its metadata and opsets empty.
    Graph(Box<Graph>),
}

/// One operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Unique, readable name (`l3.attn.q_proj`).
    pub name: String,
    /// ONNX op type (`MatMulNBits`).
    pub op: String,
    /// Op domain (`""` for the default ONNX domain, `com.microsoft`, ...).
    pub domain: String,
    /// Input value names; an empty string is an absent optional input.
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
    /// Attributes by name.
    pub attrs: BTreeMap<String, Attr>,
}

impl Node {
    /// Integer attribute, or `default` when absent.
    pub fn attr_int(&self, key: &str, default: i64) -> i64 {
        match self.attrs.get(key) {
            Some(Attr::Int(v)) => *v,
            _ => default,
        }
    }
    /// Float attribute, or `default` when absent.
    pub fn attr_float(&self, key: &str, default: f32) -> f32 {
        match self.attrs.get(key) {
            Some(Attr::Float(v)) => *v,
            _ => default,
        }
    }
    /// Subgraph attribute, if present.
    pub fn attr_graph(&self, key: &str) -> Option<&Graph> {
        match self.attrs.get(key) {
            Some(Attr::Graph(g)) => Some(g),
            _ => None,
        }
    }
    /// Integer-list attribute, if present.
    pub fn attr_ints(&self, key: &str) -> Option<&[i64]> {
        match self.attrs.get(key) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }
    /// The `i`-th input name, if present and not empty.
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// A constant tensor: weights and other initializers.
#[derive(Debug, Clone, PartialEq)]
pub struct Initializer {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub dims: Vec<usize>,
    /// Little-endian element bytes, `dims.product() * dtype.size()` long.
    pub data: Bytes,
}

impl Initializer {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A whole step graph plus the model-level metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    /// Graph name.
    pub name: String,
    /// Inputs (not including initializers).
    pub inputs: Vec<ValueInfo>,
    /// Outputs.
    pub outputs: Vec<ValueInfo>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Constant tensors.
    pub initializers: Vec<Initializer>,
    /// Model metadata (`metadata_props`).
    pub metadata: BTreeMap<String, String>,
    /// Opset imports: domain → version.
    pub opsets: BTreeMap<String, i64>,
}

impl Graph {
    /// Histogram of `domain::op` → count, sorted by op name.
    pub fn op_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            let key = if n.domain.is_empty() {
                n.op.clone()
            } else {
                format!("{}::{}", n.domain, n.op)
            };
            *h.entry(key).or_insert(0) += 1;
        }
        h
    }
}
