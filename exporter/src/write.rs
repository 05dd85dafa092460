//! Graph → ONNX `ModelProto`, streamed to disk with every initializer's `raw_data` payload 64-byte aligned.
//!
//! Layout: the `ModelProto` header fields (ir_version, producer, opsets, metadata), then field 7 (`graph`)
//! whose body is the `GraphProto` without initializers followed by one field 5 (`initializer`) per
//! tensor. Each `TensorProto` is written as `dims`, `data_type`, `name`, an unknown length-delimited field
//! 1000 of zero bytes (padding; protobuf readers skip unknown fields), then `raw_data` (field 9), so that
//! the payload starts at a file offset divisible by [`ALIGN`]. Nested lengths are computed up front and
//! iterated until the varint sizes are stable.
//!
//! The file is written to `<out>.tmp` in the same directory, fsynced and renamed over `<out>`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use onestep_format::graph::{Attr, Dim, Graph, Initializer, ValueInfo};
use onestep_format::onnx::proto;
use prost::Message;

/// Alignment of every weight payload in the file.
pub const ALIGN: u64 = 64;
/// Padding field number (unknown to ONNX, skipped by readers).
pub const PAD_FIELD: u32 = 1000;
/// Protobuf messages cannot exceed 2 GiB.
const PROTO_LIMIT: u64 = (1 << 31) - 1;

/// Writer errors (each names the file).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// OS-level failure.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The output would overwrite the input.
    #[error("{0}: the output path is the input path")]
    SameAsInput(String),
    /// The model does not fit one protobuf file.
    #[error("{path}: the graph is {bytes} bytes even with its weights in external data (protobuf limit 2 GiB)")]
    TooLarge {
        /// File.
        path: String,
        /// Total size.
        bytes: u64,
    },
}

/// ONNX IR version written.
pub const IR_VERSION: i64 = 10;

fn value_info(v: &ValueInfo) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = v
        .shape
        .iter()
        .map(|d| Dimension {
            denotation: None,
            value: Some(match d {
                Dim::Known(n) => Value::DimValue(*n as i64),
                Dim::Sym(s) => Value::DimParam(s.clone()),
            }),
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(v.name.clone()),
        r#type: Some(proto::TypeProto {
            denotation: None,
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(v.dtype.onnx_code()),
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
        }),
        ..Default::default()
    }
}

/// A tensor proto carrying its data inline (used for `Constant` attributes).
fn tensor_proto(i: &Initializer) -> proto::TensorProto {
    proto::TensorProto {
        dims: i.dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(i.dtype.onnx_code()),
        name: Some(i.name.clone()),
        raw_data: Some(i.data.clone()),
        ..Default::default()
    }
}

fn attribute(name: &str, a: &Attr) -> proto::AttributeProto {
    use proto::attribute_proto::AttributeType as AT;
    let mut p = proto::AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ty = match a {
        Attr::Int(v) => {
            p.i = Some(*v);
            AT::Int
        }
        Attr::Float(v) => {
            p.f = Some(*v);
            AT::Float
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AT::Ints
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            AT::Floats
        }
        Attr::Str(s) => {
            p.s = Some(s.clone().into_bytes().into());
            AT::String
        }
        Attr::Tensor(t) => {
            p.t = Some(tensor_proto(t));
            AT::Tensor
        }
        // A branch keeps its own (small) initializers inline; the weights it reads are the main
        // graph's, aligned like every other.
        Attr::Graph(g) => {
            let mut gp = graph_proto_without_weights(g);
            gp.initializer = g.initializers.iter().map(tensor_proto).collect();
            p.g = Some(gp);
            AT::Graph
        }
    };
    p.r#type = Some(ty as i32);
    p
}

/// The `GraphProto` of `g` without its initializers.
pub fn graph_proto_without_weights(g: &Graph) -> proto::GraphProto {
    proto::GraphProto {
        name: Some(g.name.clone()),
        node: g
            .nodes
            .iter()
            .map(|n| proto::NodeProto {
                name: Some(n.name.clone()),
                op_type: Some(n.op.clone()),
                domain: (!n.domain.is_empty()).then(|| n.domain.clone()),
                input: n.inputs.clone(),
                output: n.outputs.clone(),
                attribute: n.attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
                ..Default::default()
            })
            .collect(),
        input: g.inputs.iter().map(value_info).collect(),
        output: g.outputs.iter().map(value_info).collect(),
        ..Default::default()
    }
}

/// The `ModelProto` of `g` without its graph (written before the graph).
pub fn model_header(g: &Graph) -> proto::ModelProto {
    proto::ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("onestep-export".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: g
            .opsets
            .iter()
            .map(|(d, v)| proto::OperatorSetIdProto {
                domain: Some(d.clone()),
                version: Some(*v),
            })
            .collect(),
        metadata_props: g
            .metadata
            .iter()
            .map(|(k, v)| proto::StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            })
            .collect(),
        ..Default::default()
    }
}

fn varint_len(v: u64) -> u64 {
    prost::encoding::encoded_len_varint(v) as u64
}

fn put_varint(buf: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, buf);
}

/// How one initializer is laid out: its header bytes and the padding before `raw_data`.
struct TensorLayout {
    /// `dims`, `data_type`, `name` encoded.
    head: Vec<u8>,
    /// Length of the whole `TensorProto` body.
    body_len: u64,
    /// Zero bytes of padding in field 1000.
    pad: u64,
    /// Offset in the external data file, when the payload lives there.
    external: Option<u64>,
}

impl TensorLayout {
    /// Bytes the field-5 entry takes: tag, length, body.
    fn field_len(&self) -> u64 {
        1 + varint_len(self.body_len) + self.body_len
    }
}

/// Lays out one tensor whose field-5 tag starts at file offset `at`; `external` = (data file name,
/// offset) when its payload goes to the side file.
fn layout_tensor(init: &Initializer, at: u64, external: Option<(&str, u64)>) -> TensorLayout {
    if let Some((location, offset)) = external {
        let kv = |k: &str, v: String| proto::StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        let head = proto::TensorProto {
            dims: init.dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(init.dtype.onnx_code()),
            name: Some(init.name.clone()),
            external_data: vec![
                kv("location", location.to_string()),
                kv("offset", offset.to_string()),
                kv("length", init.data.len().to_string()),
            ],
            data_location: Some(proto::tensor_proto::DataLocation::External as i32),
            ..Default::default()
        }
        .encode_to_vec();
        return TensorLayout {
            body_len: head.len() as u64,
            head,
            pad: 0,
            external: Some(offset),
        };
    }
    let head = proto::TensorProto {
        dims: init.dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(init.dtype.onnx_code()),
        name: Some(init.name.clone()),
        ..Default::default()
    }
    .encode_to_vec();
    let data_len = init.data.len() as u64;
    let pad_tag = varint_len(u64::from(PAD_FIELD << 3 | 2));
    let raw_head = 1 + varint_len(data_len);
    let mut len_size = 1;
    loop {
        // position right after the padding field's tag and length byte(s); padding < 128 → 1 length byte
        let before_pad = at + 1 + len_size + head.len() as u64 + pad_tag + 1;
        let pad = (ALIGN - (before_pad + raw_head) % ALIGN) % ALIGN;
        let body_len = head.len() as u64 + pad_tag + 1 + pad + raw_head + data_len;
        if varint_len(body_len) == len_size {
            return TensorLayout {
                head,
                body_len,
                pad,
                external: None,
            };
        }
        len_size = varint_len(body_len);
    }
}

/// Lays out the whole file; returns (header bytes before the graph's length, graph body head, tensor
/// layouts, graph body length).
fn layout(
    g: &Graph,
    ext: &[Option<u64>],
    location: &str,
) -> (Vec<u8>, Vec<u8>, Vec<TensorLayout>, u64) {
    let header = model_header(g).encode_to_vec();
    let gbody = graph_proto_without_weights(g).encode_to_vec();
    let mut glen_size = 1;
    loop {
        let mut at = header.len() as u64 + 1 + glen_size + gbody.len() as u64;
        let start = at;
        let lays: Vec<TensorLayout> = g
            .initializers
            .iter()
            .zip(ext)
            .map(|(i, e)| {
                let l = layout_tensor(i, at, e.map(|o| (location, o)));
                at += l.field_len();
                l
            })
            .collect();
        let glen = gbody.len() as u64 + (at - start);
        if varint_len(glen) == glen_size {
            return (header, gbody, lays, glen);
        }
        glen_size = varint_len(glen);
    }
}

/// The `<out>.tmp` path next to `out`.
fn tmp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `g` to `out` (atomically: `<out>.tmp`, fsync, rename) and returns the bytes written. `input`, if
/// given, is refused as the output path. `progress(done_bytes, total_bytes)` is called as weights go out.
/// A model that would exceed the 2 GiB protobuf limit keeps its larger payloads in `<out>.data` (ONNX
/// external data, offsets multiples of [`EXT_ALIGN`]).
pub fn write_model(
    g: &Graph,
    out: &Path,
    input: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, WriteError> {
    write_model_with(g, out, input, progress, PROTO_LIMIT)
}

/// Alignment of payloads in the external data file (a page, so they can be mapped).
pub const EXT_ALIGN: u64 = 4096;
/// Payloads up to this size stay in the model file even in external-data mode.
const EXT_MIN: usize = 1024;

/// The `<out>.data` side file.
pub fn data_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".data");
    PathBuf::from(s)
}

/// [`write_model`] with the size above which payloads move to `<out>.data` (tests force it low).
pub fn write_model_with(
    g: &Graph,
    out: &Path,
    input: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
    inline_limit: u64,
) -> Result<u64, WriteError> {
    let path_s = out.display().to_string();
    let io = |source: std::io::Error| WriteError::Io {
        path: path_s.clone(),
        source,
    };
    if let Some(inp) = input {
        let same = match (std::fs::canonicalize(inp), std::fs::canonicalize(out)) {
            (Ok(a), Ok(b)) => a == b,
            _ => inp == out,
        };
        if same {
            return Err(WriteError::SameAsInput(path_s));
        }
    }
    let data_file = data_path(out);
    let location = data_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut ext = vec![None; g.initializers.len()];
    let (mut header, mut gbody, mut lays, mut glen) = layout(g, &ext, &location);
    let mut total = header.len() as u64 + 1 + varint_len(glen) + glen;
    let mut ext_len = 0u64;
    if total > inline_limit {
        for (e, i) in ext.iter_mut().zip(&g.initializers) {
            if i.data.len() > EXT_MIN {
                ext_len = ext_len.div_ceil(EXT_ALIGN) * EXT_ALIGN;
                *e = Some(ext_len);
                ext_len += i.data.len() as u64;
            }
        }
        (header, gbody, lays, glen) = layout(g, &ext, &location);
        total = header.len() as u64 + 1 + varint_len(glen) + glen;
    }
    if glen > PROTO_LIMIT || total > PROTO_LIMIT {
        return Err(WriteError::TooLarge {
            path: path_s,
            bytes: total,
        });
    }
    let tmp = tmp_path(out);
    let data_tmp = tmp_path(&data_file);
    let has_ext = ext.iter().any(Option::is_some);
    let result = (|| -> Result<(), WriteError> {
        let zeros = [0u8; EXT_ALIGN as usize];
        let weight_total: u64 = g.initializers.iter().map(|i| i.data.len() as u64).sum();
        let mut done = 0u64;
        if has_ext {
            let dio = |source: std::io::Error| WriteError::Io {
                path: data_file.display().to_string(),
                source,
            };
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&data_tmp).map_err(dio)?);
            let mut pos = 0u64;
            for (i, off) in g.initializers.iter().zip(&ext) {
                let Some(off) = *off else { continue };
                w.write_all(&zeros[..(off - pos) as usize]).map_err(dio)?;
                w.write_all(&i.data).map_err(dio)?;
                pos = off + i.data.len() as u64;
                done += i.data.len() as u64;
                progress(done, weight_total);
            }
            let f = w.into_inner().map_err(|e| dio(e.into_error()))?;
            f.sync_all().map_err(dio)?;
        }
        let f = File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut pos: u64 = 0;
        let put = |w: &mut BufWriter<File>, b: &[u8], pos: &mut u64| -> Result<(), WriteError> {
            w.write_all(b).map_err(io)?;
            *pos += b.len() as u64;
            Ok(())
        };
        put(&mut w, &header, &mut pos)?;
        let mut head = vec![7 << 3 | 2];
        put_varint(&mut head, glen);
        put(&mut w, &head, &mut pos)?;
        put(&mut w, &gbody, &mut pos)?;
        for (init, l) in g.initializers.iter().zip(&lays) {
            let mut b = vec![5 << 3 | 2];
            put_varint(&mut b, l.body_len);
            b.extend_from_slice(&l.head);
            if l.external.is_some() {
                put(&mut w, &b, &mut pos)?;
                continue;
            }
            put_varint(&mut b, u64::from(PAD_FIELD << 3 | 2));
            put_varint(&mut b, l.pad);
            b.extend_from_slice(&zeros[..l.pad as usize]);
            b.push(9 << 3 | 2);
            put_varint(&mut b, init.data.len() as u64);
            put(&mut w, &b, &mut pos)?;
            debug_assert_eq!(pos % ALIGN, 0, "payload of {} is aligned", init.name);
            put(&mut w, &init.data, &mut pos)?;
            done += init.data.len() as u64;
            progress(done, weight_total);
        }
        debug_assert_eq!(pos, total);
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&data_tmp);
        return Err(e);
    }
    // A failed rename (the output is a directory, another file system, ...) must not leave temp files.
    let cleanup = |e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&data_tmp);
        io(e)
    };
    if has_ext {
        std::fs::rename(&data_tmp, &data_file).map_err(cleanup)?;
    } else if data_file.exists() {
        // a stale side file from an earlier export of the same path would be misleading
        let _ = std::fs::remove_file(&data_file);
    }
    std::fs::rename(&tmp, out).map_err(cleanup)?;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(total + if has_ext { ext_len } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use onestep_format::graph::{DType, Node};
    use rand::{Rng, SeedableRng};

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("onestep-write-{}-{name}", std::process::id()))
    }

    #[test]
    fn payloads_are_aligned_and_decode_back() {
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let mut g = Graph {
            name: "t".into(),
            ..Default::default()
        };
        g.opsets.insert(String::new(), 23);
        g.metadata.insert("k".into(), "v".repeat(300));
        // sizes chosen to cross varint boundaries (127/128, 16383/16384 bytes)
        for (i, n) in [1usize, 3, 127, 128, 200, 16383, 16384, 40000, 5]
            .iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..*n).map(|_| r.random()).collect();
            g.initializers.push(Initializer {
                name: format!("w{i}{}", "x".repeat(i * 13)),
                dtype: DType::U8,
                dims: vec![*n],
                data: Bytes::from(data),
            });
        }
        g.inputs.push(ValueInfo {
            name: "a".into(),
            dtype: DType::U8,
            shape: vec![Dim::Known(5)],
        });
        g.outputs.push(ValueInfo {
            name: "b".into(),
            dtype: DType::U8,
            shape: vec![Dim::Known(5)],
        });
        g.nodes.push(Node {
            name: "add".into(),
            op: "Add".into(),
            domain: String::new(),
            inputs: vec!["a".into(), "w8".into()],
            outputs: vec!["b".into()],
            attrs: Default::default(),
        });
        let out = tmp("a.onnx");
        let size = write_model(&g, &out, None, &mut |_, _| {}).unwrap();
        let file = Bytes::from(std::fs::read(&out).unwrap());
        assert_eq!(file.len() as u64, size);
        assert!(!tmp_path(&out).exists());
        let m = proto::ModelProto::decode(file.clone()).unwrap();
        assert_eq!(m.ir_version, Some(IR_VERSION));
        let gp = m.graph.unwrap();
        assert_eq!(gp.initializer.len(), g.initializers.len());
        for (t, i) in gp.initializer.iter().zip(&g.initializers) {
            let raw = t.raw_data.as_ref().unwrap();
            assert_eq!(raw[..], i.data[..], "{}", i.name);
            assert_eq!(t.name.as_deref(), Some(i.name.as_str()));
            // prost slices `Bytes` input without copying: the payload's offset in the file
            let off = raw.as_ptr() as usize - file.as_ptr() as usize;
            assert_eq!(off % ALIGN as usize, 0, "{} at {off}", i.name);
        }
        assert_eq!(gp.node.len(), 1);
        assert_eq!(
            m.metadata_props[0].value.as_deref().map(str::len),
            Some(300)
        );
        std::fs::remove_file(&out).unwrap();
    }

    #[test]
    fn external_data_side_file() {
        let mut r = rand::rngs::StdRng::seed_from_u64(9);
        let mut g = Graph::default();
        for (i, n) in [3000usize, 10, 5000, 2000].iter().enumerate() {
            g.initializers.push(Initializer {
                name: format!("w{i}"),
                dtype: DType::U8,
                dims: vec![*n],
                data: Bytes::from((0..*n).map(|_| r.random()).collect::<Vec<u8>>()),
            });
        }
        let out = tmp("ext.onnx");
        let size = write_model_with(&g, &out, None, &mut |_, _| {}, 0).unwrap();
        let file = Bytes::from(std::fs::read(&out).unwrap());
        let data = std::fs::read(data_path(&out)).unwrap();
        assert_eq!(size, (file.len() + data.len()) as u64);
        let gp = proto::ModelProto::decode(file.clone())
            .unwrap()
            .graph
            .unwrap();
        for (t, i) in gp.initializer.iter().zip(&g.initializers) {
            if i.data.len() <= EXT_MIN {
                assert_eq!(t.raw_data.as_ref().unwrap()[..], i.data[..]);
                continue;
            }
            assert!(t.raw_data.is_none() && t.data_location == Some(1));
            let kv: std::collections::BTreeMap<_, _> = t
                .external_data
                .iter()
                .map(|e| (e.key.clone().unwrap(), e.value.clone().unwrap()))
                .collect();
            assert_eq!(
                kv["location"],
                "onestep-write-".to_string() + &format!("{}-ext.onnx.data", std::process::id())
            );
            let off: usize = kv["offset"].parse().unwrap();
            assert_eq!(off % EXT_ALIGN as usize, 0);
            assert_eq!(kv["length"], i.data.len().to_string());
            assert_eq!(data[off..off + i.data.len()], i.data[..], "{}", i.name);
        }
        // writing again without external data removes the stale side file
        write_model(&g, &out, None, &mut |_, _| {}).unwrap();
        assert!(!data_path(&out).exists());
        std::fs::remove_file(&out).unwrap();
    }

    #[test]
    fn refuses_input_as_output() {
        let out = tmp("same.onnx");
        std::fs::write(&out, b"x").unwrap();
        let e = write_model(&Graph::default(), &out, Some(&out), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, WriteError::SameAsInput(_)));
        assert_eq!(std::fs::read(&out).unwrap(), b"x");
        std::fs::remove_file(&out).unwrap();
    }
}
