//! Decode a `ModelProto` from (memory-mapped) bytes into the [`Graph`] IR without copying weight bytes.
//!
//! `prost` decodes `bytes` fields from a [`Bytes`] buffer as zero-copy slices, so every initializer's
//! `raw_data` keeps pointing into the mapping. Tensors stored in the typed repeated fields
//! (`float_data`, `int64_data`, ...) are small by convention and are converted to bytes.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

use super::proto;
use crate::error::{Error, Result};
use crate::graph::{Attr, DType, Dim, Graph, Initializer, Node, ValueInfo};
use crate::limits::{limit, Limits};

/// Decodes `bytes` (a whole `.onnx` file) into a [`Graph`] under the default [`Limits`]. `what` names
/// the source in errors.
pub fn decode_model(bytes: Bytes, what: &str) -> Result<Graph> {
    decode_model_with(bytes, what, &Limits::default())
}

/// Decodes `bytes` into a [`Graph`], refusing anything over `limits` (checked before it is used).
pub fn decode_model_with(bytes: Bytes, what: &str, limits: &Limits) -> Result<Graph> {
    limit(
        &format!("{what}: file size"),
        bytes.len() as u64,
        limits.max_file_bytes,
    )?;
    let model = proto::ModelProto::decode(bytes).map_err(|e| Error::Decode {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    let graph = model.graph.as_ref().ok_or_else(|| Error::Decode {
        what: what.to_string(),
        detail: "the model has no graph".into(),
    })?;
    limit(
        &format!("{what}: initializer count"),
        graph.initializer.len() as u64,
        limits.max_tensors as u64,
    )?;
    limit(
        &format!("{what}: node count"),
        graph.node.len() as u64,
        limits.max_nodes as u64,
    )?;
    for p in &model.metadata_props {
        let len = p.value.as_ref().map_or(0, |v| v.len()) + p.key.as_ref().map_or(0, |k| k.len());
        limit(
            &format!(
                "{what}: metadata `{}` length",
                p.key
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(64)
                    .collect::<String>()
            ),
            len as u64,
            limits.max_metadata_bytes as u64,
        )?;
    }
    let mut opsets = BTreeMap::new();
    for o in &model.opset_import {
        let domain = o.domain.clone().unwrap_or_default();
        let domain = if domain == "ai.onnx" {
            String::new()
        } else {
            domain
        };
        opsets.insert(domain, o.version.unwrap_or(0));
    }
    let metadata = model
        .metadata_props
        .iter()
        .map(|p| {
            (
                p.key.clone().unwrap_or_default(),
                p.value.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut budget = Budget {
        nodes: limits.max_nodes,
        tensors: limits.max_tensors,
    };
    let mut g = convert_graph(graph, what, limits, 0, &mut budget)?;
    g.metadata = metadata;
    g.opsets = opsets;
    Ok(g)
}

/// How deep `If` branches may nest.
const MAX_SUBGRAPH_DEPTH: usize = 4;

/// Nodes and tensors a file may still hold, counted over the main graph and every subgraph.
struct Budget {
    nodes: usize,
    tensors: usize,
}

/// One `GraphProto` (the main graph at `depth` 0, a subgraph deeper), charging its nodes and
/// initializers to `budget`.
fn convert_graph(
    graph: &proto::GraphProto,
    what: &str,
    limits: &Limits,
    depth: usize,
    budget: &mut Budget,
) -> Result<Graph> {
    let gname = graph.name.clone().unwrap_or_default();
    if depth > MAX_SUBGRAPH_DEPTH {
        return Err(Error::Decode {
            what: what.to_string(),
            detail: format!(
                "subgraph `{gname}` is nested more than {MAX_SUBGRAPH_DEPTH} levels deep"
            ),
        });
    }
    let over = |kind: &str, max: usize, left: usize, more: usize| Error::Limit {
        what: format!("{what}: {kind} count (the graph and its subgraphs)"),
        value: (max - left + more) as u64,
        max: max as u64,
    };
    budget.nodes = (budget.nodes.checked_sub(graph.node.len()))
        .ok_or_else(|| over("node", limits.max_nodes, budget.nodes, graph.node.len()))?;
    budget.tensors = (budget.tensors.checked_sub(graph.initializer.len())).ok_or_else(|| {
        over(
            "initializer",
            limits.max_tensors,
            budget.tensors,
            graph.initializer.len(),
        )
    })?;
    let initializers = graph
        .initializer
        .iter()
        .map(|t| convert_tensor_with(t, limits))
        .collect::<Result<Vec<_>>>()?;
    let init_names: std::collections::HashSet<&str> =
        initializers.iter().map(|i| i.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|v| !init_names.contains(v.name.as_deref().unwrap_or("")))
        .map(convert_value_info)
        .collect::<Result<Vec<_>>>()?;
    let outputs = graph
        .output
        .iter()
        .map(convert_value_info)
        .collect::<Result<Vec<_>>>()?;
    let nodes = graph
        .node
        .iter()
        .enumerate()
        .map(|(i, n)| convert_node(i, n, what, limits, depth, budget))
        .collect::<Result<Vec<_>>>()?;
    Ok(Graph {
        name: gname,
        inputs,
        outputs,
        nodes,
        initializers,
        metadata: BTreeMap::new(),
        opsets: BTreeMap::new(),
    })
}

fn convert_value_info(v: &proto::ValueInfoProto) -> Result<ValueInfo> {
    let name = v.name.clone().unwrap_or_default();
    let bad = |d: &str| Error::tensor(&name, d.to_string());
    let ty = v
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .ok_or_else(|| bad("graph input/output has no type"))?;
    let proto::type_proto::Value::TensorType(t) = ty else {
        return Err(bad("graph input/output is not a tensor"));
    };
    let code = t.elem_type.unwrap_or(0);
    let dtype =
        DType::from_onnx(code).ok_or_else(|| bad(&format!("unsupported element type {code}")))?;
    let shape = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                        usize::try_from(*v)
                            .map(Dim::Known)
                            .map_err(|_| bad(&format!("dimension {v} does not fit")))
                    }
                    Some(proto::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                        Err(bad(&format!("negative dimension {v}")))
                    }
                    Some(proto::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                        Ok(Dim::Sym(p.clone()))
                    }
                    None => Ok(Dim::Sym("?".into())),
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(ValueInfo { name, dtype, shape })
}

fn convert_node(
    index: usize,
    n: &proto::NodeProto,
    what: &str,
    limits: &Limits,
    depth: usize,
    budget: &mut Budget,
) -> Result<Node> {
    let op = n.op_type.clone().unwrap_or_default();
    let name = n
        .name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("node{index}_{op}"));
    let mut attrs = BTreeMap::new();
    for a in &n.attribute {
        let key = a.name.clone().unwrap_or_default();
        use proto::attribute_proto::AttributeType as T;
        let ty = a.r#type.and_then(|t| T::try_from(t).ok());
        let value = match ty {
            Some(T::Int) => Attr::Int(a.i.unwrap_or(0)),
            Some(T::Float) => Attr::Float(a.f.unwrap_or(0.0)),
            Some(T::Ints) => Attr::Ints(a.ints.clone()),
            Some(T::Floats) => Attr::Floats(a.floats.clone()),
            Some(T::String) => Attr::Str(
                String::from_utf8(a.s.clone().unwrap_or_default().to_vec()).map_err(|_| {
                    Error::node(&name, &op, format!("attribute `{key}` is not UTF-8"))
                })?,
            ),
            Some(T::Tensor) => match &a.t {
                Some(t) => Attr::Tensor(convert_tensor_with(t, limits)?),
                None => return Err(Error::node(&name, &op, format!("attribute `{key}` empty"))),
            },
            Some(T::Graph) => match &a.g {
                Some(g) => {
                    Attr::Graph(Box::new(convert_graph(g, what, limits, depth + 1, budget)?))
                }
                None => return Err(Error::node(&name, &op, format!("attribute `{key}` empty"))),
            },
            _ => {
                return Err(Error::node(
                    &name,
                    &op,
                    format!("attribute `{key}` has an unsupported type {:?}", a.r#type),
                ))
            }
        };
        attrs.insert(key, value);
    }
    Ok(Node {
        name,
        op,
        domain: n.domain.clone().unwrap_or_default(),
        inputs: n.input.clone(),
        outputs: n.output.clone(),
        attrs,
    })
}

/// Converts one `TensorProto` (zero-copy for `raw_data`), checking its size against its shape, under
/// the default [`Limits`].
pub fn convert_tensor(t: &proto::TensorProto) -> Result<Initializer> {
    convert_tensor_with(t, &Limits::default())
}

/// Converts one `TensorProto`; its declared element count must be within `limits`.
pub fn convert_tensor_with(t: &proto::TensorProto, limits: &Limits) -> Result<Initializer> {
    let name = t.name.clone().unwrap_or_default();
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code)
        .ok_or_else(|| Error::tensor(&name, format!("unsupported data type {code}")))?;
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(Error::tensor(
            &name,
            "external data is not supported by this loader; keep the model in one file",
        ));
    }
    let mut numel: u128 = 1;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(Error::tensor(&name, format!("negative dimension {d}")));
        }
        numel = numel.saturating_mul(d as u128);
        if numel > limits.max_tensor_elements as u128 {
            return Err(Error::Limit {
                what: format!("tensor `{name}`: element count"),
                value: u64::try_from(numel).unwrap_or(u64::MAX),
                max: limits.max_tensor_elements,
            });
        }
        dims.push(
            usize::try_from(d)
                .map_err(|_| Error::tensor(&name, format!("dimension {d} does not fit")))?,
        );
    }
    let expected = usize::try_from(numel)
        .ok()
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| Error::tensor(&name, "declared size does not fit in memory"))?;
    let data = if let Some(raw) = &t.raw_data {
        raw.clone()
    } else {
        let mut v: Vec<u8> = Vec::new();
        match dtype {
            DType::F32 => t
                .float_data
                .iter()
                .for_each(|x| v.extend_from_slice(&x.to_le_bytes())),
            DType::I64 => t
                .int64_data
                .iter()
                .for_each(|x| v.extend_from_slice(&x.to_le_bytes())),
            DType::I32 => t
                .int32_data
                .iter()
                .for_each(|x| v.extend_from_slice(&x.to_le_bytes())),
            DType::U8 | DType::I8 | DType::Bool => {
                t.int32_data.iter().for_each(|x| v.push(*x as u8))
            }
            DType::F16 | DType::BF16 => t
                .int32_data
                .iter()
                .for_each(|x| v.extend_from_slice(&(*x as u16).to_le_bytes())),
        }
        Bytes::from(v)
    };
    if data.len() != expected {
        return Err(Error::tensor(
            &name,
            format!(
                "holds {} bytes but its shape {:?} of {} needs {}",
                data.len(),
                dims,
                dtype,
                expected
            ),
        ));
    }
    Ok(Initializer {
        name,
        dtype,
        dims,
        data,
    })
}
