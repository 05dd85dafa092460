//! `onestep-export inspect`: prints a step-graph file's contract, metadata and op histogram.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use onestep_format::graph::DType;
use onestep_format::onnx::proto;
use prost::Message;

/// Errors while inspecting (naming the file).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// OS-level failure.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a decodable ONNX model.
    #[error("{path}: not an ONNX model: {detail}")]
    Decode {
        /// File.
        path: String,
        /// Decoder message.
        detail: String,
    },
}

fn shape_of(v: &proto::ValueInfoProto) -> (String, String) {
    use proto::tensor_shape_proto::dimension::Value;
    let Some(proto::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return ("?".into(), "?".into());
    };
    let dt = t
        .elem_type
        .and_then(DType::from_onnx)
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| format!("type{}", t.elem_type.unwrap_or(0)));
    let dims: Vec<String> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(n)) => n.to_string(),
                    Some(Value::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect()
        })
        .unwrap_or_default();
    (dt, format!("[{}]", dims.join(", ")))
}

fn abbreviate(v: &str) -> String {
    let one_line: String = v
        .chars()
        .take(60)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if v.chars().count() > 60 || v.contains('\n') {
        format!("{one_line}… ({} bytes)", v.len())
    } else {
        one_line
    }
}

/// Reads `path` and renders the report printed by `onestep-export inspect`.
pub fn inspect(path: &Path) -> Result<String, InspectError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| InspectError::Io {
        path: p.clone(),
        source,
    })?;
    let m = proto::ModelProto::decode(Bytes::from(data)).map_err(|e| InspectError::Decode {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    let g = m.graph.unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{p}: ONNX IR {}, producer {} {}",
        m.ir_version.unwrap_or(0),
        m.producer_name.unwrap_or_default(),
        m.producer_version.unwrap_or_default()
    );
    let opsets: Vec<String> = m
        .opset_import
        .iter()
        .map(|o| {
            format!(
                "{}={}",
                o.domain
                    .as_deref()
                    .filter(|d| !d.is_empty())
                    .unwrap_or("ai.onnx"),
                o.version.unwrap_or(0)
            )
        })
        .collect();
    let _ = writeln!(o, "opsets: {}", opsets.join(", "));
    for (title, vals) in [("inputs", &g.input), ("outputs", &g.output)] {
        let _ = writeln!(o, "\n{title}:");
        for v in vals.iter() {
            let (dt, sh) = shape_of(v);
            let _ = writeln!(
                o,
                "  {:<20} {:<5} {}",
                v.name.as_deref().unwrap_or(""),
                dt,
                sh
            );
        }
    }
    let _ = writeln!(o, "\nmetadata:");
    for e in &m.metadata_props {
        let _ = writeln!(
            o,
            "  {:<28} {}",
            e.key.as_deref().unwrap_or(""),
            abbreviate(e.value.as_deref().unwrap_or(""))
        );
    }
    let weight_bytes: usize = g
        .initializer
        .iter()
        .map(|t| t.raw_data.as_ref().map_or(0, |r| r.len()))
        .sum();
    let _ = writeln!(
        o,
        "\ninitializers: {} ({:.1} MB)",
        g.initializer.len(),
        weight_bytes as f64 / 1e6
    );
    let mut hist: BTreeMap<String, usize> = BTreeMap::new();
    for n in &g.node {
        let op = n.op_type.clone().unwrap_or_default();
        let key = match n.domain.as_deref() {
            Some(d) if !d.is_empty() => format!("{d}::{op}"),
            _ => op,
        };
        *hist.entry(key).or_insert(0) += 1;
    }
    let _ = writeln!(o, "\nops ({} nodes):", g.node.len());
    for (k, v) in hist {
        let _ = writeln!(o, "  {k:<28} {v}");
    }
    Ok(o)
}
