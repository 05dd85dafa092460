//! GGUF reader: memory-maps the file, parses the header (versions 2 and 3), the metadata and the tensor
//! table, and hands out zero-copy slices of the mapping.
//!
//! Every count, length and offset read from the file is checked against the bytes that remain before
//! it is used, so a truncated or hostile file gives a [`SourceError`] naming the file and the key or
//! tensor at fault — never a panic, and never an allocation sized by an unchecked count.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

use super::check;
use super::tokenizer::{self, GgufVocab};
use super::{ModelConfig, RopeScaling, SourceDType, SourceError, SourceModel, SourceTensor};
use crate::arch::family;

/// `GGUF` in little-endian byte order.
const MAGIC: &[u8; 4] = b"GGUF";
/// Default data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's maximum tensor rank.
const MAX_DIMS: u32 = 4;
/// Deepest array-of-array nesting we accept in metadata.
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most array elements all metadata together may hold. Each element becomes a [`GgufValue`] (32 bytes
/// for a 1-byte `uint8`): without a bound a file could make us allocate 32× its size. Real vocabularies
/// (tokens + merges + types) stay under 1M; 4M admits any of them.
pub const MAX_METADATA_ELEMENTS: u64 = 1 << 22;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// uint8.
    U8(u8),
    /// int8.
    I8(i8),
    /// uint16.
    U16(u16),
    /// int16.
    I16(i16),
    /// uint32.
    U32(u32),
    /// int32.
    I32(i32),
    /// float32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values (all of one type).
    Array(Vec<GgufValue>),
    /// uint64.
    U64(u64),
    /// int64.
    I64(i64),
    /// float64.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I64(v) => Some(v),
            ref other => other
                .as_u64()
                .and_then(|v| i64::try_from(v).ok())
                .or(match *other {
                    GgufValue::I8(v) => Some(v.into()),
                    GgufValue::I16(v) => Some(v.into()),
                    GgufValue::I32(v) => Some(v.into()),
                    _ => None,
                }),
        }
    }

    /// The value as a float (any float or integer type).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            ref other => other.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "uint8",
            GgufValue::I8(_) => "int8",
            GgufValue::U16(_) => "uint16",
            GgufValue::I16(_) => "int16",
            GgufValue::U32(_) => "uint32",
            GgufValue::I32(_) => "int32",
            GgufValue::F32(_) => "float32",
            GgufValue::Bool(_) => "bool",
            GgufValue::Str(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "uint64",
            GgufValue::I64(_) => "int64",
            GgufValue::F64(_) => "float64",
        }
    }
}

/// One entry of the tensor table, as stored (before any name or shape interpretation).
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    /// Tensor name.
    pub name: String,
    /// `ne`: dimensions innermost first, as stored.
    pub ne: Vec<u64>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Byte range in the file (absolute), already checked against the file length.
    pub range: std::ops::Range<usize>,
}

/// A parsed GGUF file: metadata, tensor table and the mapped bytes.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// The file, for messages.
    pub path: String,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor table in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// The whole mapped file.
    pub data: Bytes,
}

/// Reads a GGUF file of a family in [`crate::arch::ARCHS`] into a [`SourceModel`].
pub fn read(path: &Path) -> Result<SourceModel, SourceError> {
    let file = open(path)?;
    into_model(&file)
}

/// Memory-maps and parses a GGUF file without interpreting it as a model.
pub fn open(path: &Path) -> Result<GgufFile, SourceError> {
    let p = path.display().to_string();
    let io = |source| SourceError::Io {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only; the usual memory-map caveat applies (another process truncating or
    // rewriting the file while it is mapped is undefined behaviour), which every mmap-based loader accepts.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    parse(&p, Bytes::from_owner(map))
}

/// Parses GGUF bytes (a mapped file or a buffer); `path` names them in errors.
pub fn parse(path: &str, data: Bytes) -> Result<GgufFile, SourceError> {
    let mut r = Reader {
        buf: &data,
        pos: 0,
        path,
        elements: 0,
    };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(r.fail(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        )));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(unsupported(
                path,
                "GGUF version 1 (re-convert the model)".into(),
            ))
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(unsupported(path, "big-endian GGUF".into()))
        }
        v => return Err(unsupported(path, format!("GGUF version {v}"))),
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata kv count")?;
    // Each kv needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at least 8 + 4 + 4 + 8.
    r.check_count(n_kv, 13, "metadata kv count")?;
    r.check_count(n_tensors, 24, "tensor count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("key of metadata entry {i}"))?;
        let ty = r.u32(&format!("type of `{key}`"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.fail(format!("duplicate metadata key `{key}`")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(SourceError::Key {
                    path: path.into(),
                    key: "general.alignment".into(),
                    detail: format!("must be a power of two, got {v:?}"),
                })
            }
        },
    };

    struct RawInfo {
        name: String,
        ne: Vec<u64>,
        ggml_type: u32,
        offset: u64,
    }
    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor {i}"))?;
        let n_dims = r.u32(&format!("rank of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.fail(format!(
                "tensor `{name}` has rank {n_dims} (1..={MAX_DIMS} allowed)"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            ne.push(r.u64(&format!("dimension {d} of tensor `{name}`"))?);
        }
        let ggml_type = r.u32(&format!("type of tensor `{name}`"))?;
        let offset = r.u64(&format!("offset of tensor `{name}`"))?;
        infos.push(RawInfo {
            name,
            ne,
            ggml_type,
            offset,
        });
    }

    let file_len = data.len() as u64;
    let data_start = align_up(r.pos as u64, alignment)
        .filter(|&s| s <= file_len)
        .ok_or_else(|| r.fail("file ends before its tensor data section".into()))?;

    let mut tensors = Vec::with_capacity(infos.len());
    let mut seen = std::collections::HashSet::new();
    for info in infos {
        if !seen.insert(info.name.clone()) {
            return Err(r.fail(format!("duplicate tensor `{}`", info.name)));
        }
        let fail = |detail: String| SourceError::Format {
            path: path.into(),
            detail: format!("tensor `{}`: {detail}", info.name),
        };
        if info.offset % alignment != 0 {
            return Err(fail(format!(
                "data offset {} is not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        let size = match tensor_nbytes(info.ggml_type, &info.ne) {
            Ok(s) => s,
            Err(NbytesError::UnknownType) => {
                return Err(fail(format!("unknown ggml type id {}", info.ggml_type)))
            }
            Err(NbytesError::Overflow) => {
                return Err(fail(format!("shape {:?} overflows", info.ne)))
            }
            Err(NbytesError::NotBlockMultiple(b)) => {
                return Err(fail(format!(
                    "innermost dimension {} of type {} is not a multiple of its block size {b}",
                    info.ne[0],
                    ggml_type_name(info.ggml_type)
                )))
            }
        };
        let start = data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(size));
        let (start, end) = match (start, end) {
            (Some(s), Some(e)) if e <= file_len => (s, e),
            _ => {
                return Err(fail(format!(
                    "data [{} + {}, {size} bytes) runs past the end of the file ({file_len} bytes)",
                    data_start, info.offset
                )))
            }
        };
        tensors.push(GgufTensorInfo {
            name: info.name,
            ne: info.ne,
            ggml_type: info.ggml_type,
            range: start as usize..end as usize,
        });
    }

    Ok(GgufFile {
        path: path.into(),
        version,
        metadata,
        tensors,
        data,
    })
}

fn unsupported(path: &str, what: String) -> SourceError {
    SourceError::Unsupported {
        path: path.into(),
        what,
    }
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// A bounds-checked little-endian reader over the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
    /// Metadata array elements read so far (bounded by [`MAX_METADATA_ELEMENTS`]).
    elements: u64,
}

impl<'a> Reader<'a> {
    fn fail(&self, detail: String) -> SourceError {
        SourceError::Format {
            path: self.path.into(),
            detail,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SourceError> {
        if n > self.remaining() {
            return Err(self.fail(format!(
                "truncated reading {what} at offset {} (needs {n} bytes, {} left)",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SourceError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, SourceError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, SourceError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    /// Refuses a count whose elements (each at least `min_size` bytes) cannot fit in what remains.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), SourceError> {
        match count.checked_mul(min_size) {
            Some(need) if need <= self.remaining() as u64 => Ok(()),
            _ => Err(self.fail(format!(
                "{what} {count} at offset {} cannot fit in the {} bytes left",
                self.pos,
                self.remaining()
            ))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String, SourceError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, &format!("length of {what}"))?;
        let start = self.pos;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.fail(format!("{what} at offset {start} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue, SourceError> {
        let what = || format!("value of `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(&what())?[0]),
            1 => GgufValue::I8(self.arr::<1>(&what())?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.arr(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(&what())?)),
            7 => match self.arr::<1>(&what())?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.fail(format!("`{key}`: bool byte {b} is neither 0 nor 1"))),
            },
            8 => GgufValue::Str(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.fail(format!("`{key}`: arrays nested too deep")));
                }
                let elem = self.u32(&format!("array type of `{key}`"))?;
                let n = self.u64(&format!("array length of `{key}`"))?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.fail(format!("`{key}`: unknown array element type {t}"))),
                };
                self.check_count(n, min, &format!("array length of `{key}`"))?;
                self.elements = self.elements.saturating_add(n);
                if self.elements > MAX_METADATA_ELEMENTS {
                    return Err(self.fail(format!(
                        "`{key}`: metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements"
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.arr(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(&what())?)),
            t => return Err(self.fail(format!("`{key}`: unknown value type {t}"))),
        })
    }
}

enum NbytesError {
    UnknownType,
    Overflow,
    NotBlockMultiple(u64),
}

/// (block size in elements, bytes per block) of every ggml type we know the size of.
fn ggml_type_layout(t: u32) -> Option<(u64, u64)> {
    const QK_K: u64 = 256;
    Some(match t {
        0 => (1, 4),       // F32
        1 => (1, 2),       // F16
        2 => (32, 18),     // Q4_0
        3 => (32, 20),     // Q4_1
        6 => (32, 22),     // Q5_0
        7 => (32, 24),     // Q5_1
        8 => (32, 34),     // Q8_0
        9 => (32, 36),     // Q8_1
        10 => (QK_K, 84),  // Q2_K
        11 => (QK_K, 110), // Q3_K
        12 => (QK_K, 144), // Q4_K
        13 => (QK_K, 176), // Q5_K
        14 => (QK_K, 210), // Q6_K
        15 => (QK_K, 292), // Q8_K
        16 => (QK_K, 66),  // IQ2_XXS
        17 => (QK_K, 74),  // IQ2_XS
        18 => (QK_K, 98),  // IQ3_XXS
        19 => (QK_K, 50),  // IQ1_S
        20 => (32, 18),    // IQ4_NL
        21 => (QK_K, 110), // IQ3_S
        22 => (QK_K, 82),  // IQ2_S
        23 => (QK_K, 136), // IQ4_XS
        24 => (1, 1),      // I8
        25 => (1, 2),      // I16
        26 => (1, 4),      // I32
        27 => (1, 8),      // I64
        28 => (1, 8),      // F64
        29 => (QK_K, 56),  // IQ1_M
        30 => (1, 2),      // BF16
        34 => (QK_K, 54),  // TQ1_0
        35 => (QK_K, 66),  // TQ2_0
        39 => (32, 17),    // MXFP4
        _ => return None,
    })
}

/// ggml's name for a type id.
pub fn ggml_type_name(t: u32) -> String {
    let n = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("#{t}"),
    };
    n.to_string()
}

/// The ggml type ids [`source_dtype`] reads.
const SUPPORTED_TYPES: [u32; 11] = [0, 1, 30, 8, 2, 3, 6, 7, 12, 13, 14];

fn source_dtype(t: u32) -> Option<SourceDType> {
    Some(match t {
        0 => SourceDType::F32,
        1 => SourceDType::F16,
        30 => SourceDType::BF16,
        8 => SourceDType::Q8_0,
        2 => SourceDType::Q4_0,
        3 => SourceDType::Q4_1,
        6 => SourceDType::Q5_0,
        7 => SourceDType::Q5_1,
        12 => SourceDType::Q4_K,
        13 => SourceDType::Q5_K,
        14 => SourceDType::Q6_K,
        _ => return None,
    })
}

fn tensor_nbytes(t: u32, ne: &[u64]) -> Result<u64, NbytesError> {
    let (block, bytes) = ggml_type_layout(t).ok_or(NbytesError::UnknownType)?;
    let inner = ne.first().copied().unwrap_or(1);
    if inner % block != 0 {
        return Err(NbytesError::NotBlockMultiple(block));
    }
    let mut n = (inner / block)
        .checked_mul(bytes)
        .ok_or(NbytesError::Overflow)?;
    for &d in &ne[1..] {
        n = n.checked_mul(d).ok_or(NbytesError::Overflow)?;
    }
    Ok(n)
}

/// Typed metadata look-ups that name the file and key on failure.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl<'a> Meta<'a> {
    fn key_err(&self, key: &str, detail: String) -> SourceError {
        SourceError::Key {
            path: self.file.path.clone(),
            key: key.into(),
            detail,
        }
    }

    fn get(&self, key: &str) -> Option<&'a GgufValue> {
        self.file.metadata.get(key)
    }

    fn req(&self, key: &str) -> Result<&'a GgufValue, SourceError> {
        self.get(key)
            .ok_or_else(|| self.key_err(key, "missing".into()))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.key_err(key, format!("expected a non-negative integer, got {v:?}"))
                }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, SourceError> {
        self.req(key)?;
        self.usize_opt(key)?
            .ok_or_else(|| self.key_err(key, "missing".into()))
    }

    fn positive(&self, key: &str) -> Result<usize, SourceError> {
        let v = self.usize(key)?;
        if v == 0 {
            return Err(self.key_err(key, "must be positive".into()));
        }
        Ok(v)
    }

    fn f32_opt(&self, key: &str) -> Result<Option<f32>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.key_err(key, format!("expected a number, got {v:?}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.key_err(key, format!("expected a string, got {}", v.type_name()))
            }),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.key_err(key, format!("expected a bool, got {}", v.type_name()))
            }),
        }
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>, SourceError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.key_err(key, format!("expected a token id, got {v:?}"))),
        }
    }

    /// An optional array whose every element `elem` converts (`what` names the element type in errors).
    fn array_opt<T>(
        &self,
        key: &str,
        what: &str,
        elem: impl Fn(&GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, SourceError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.as_array().ok_or_else(|| {
            self.key_err(key, format!("expected an array, got {}", v.type_name()))
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                elem(e).ok_or_else(|| self.key_err(key, format!("element {i} is not {what}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn strings_opt(&self, key: &str) -> Result<Option<Vec<String>>, SourceError> {
        self.array_opt(key, "a string", |e| e.as_str().map(str::to_owned))
    }

    fn floats_opt(&self, key: &str) -> Result<Option<Vec<f32>>, SourceError> {
        self.array_opt(key, "a number", |e| e.as_f64().map(|x| x as f32))
    }

    fn ints_opt(&self, key: &str) -> Result<Option<Vec<i32>>, SourceError> {
        self.array_opt(key, "an int32", |e| {
            e.as_i64().and_then(|x| i32::try_from(x).ok())
        })
    }
}

/// Every tensor of the file in its stored encoding, by name, with shapes outermost first (GGUF's `ne`
/// flipped); a type the exporter does not read is an error naming the tensor and the supported types.
pub fn tensors(file: &GgufFile) -> Result<BTreeMap<String, SourceTensor>, SourceError> {
    let path = file.path.as_str();
    let mut tensors = BTreeMap::new();
    for t in &file.tensors {
        let dtype = source_dtype(t.ggml_type).ok_or_else(|| {
            unsupported(
                path,
                format!(
                    "tensor type {} in `{}` (supported: {})",
                    ggml_type_name(t.ggml_type),
                    t.name,
                    SUPPORTED_TYPES.map(ggml_type_name).join(", ")
                ),
            )
        })?;
        let shape =
            t.ne.iter()
                .rev()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| SourceError::Format {
                    path: path.into(),
                    detail: format!("tensor `{}`: dimension does not fit in usize", t.name),
                })?;
        tensors.insert(
            t.name.clone(),
            SourceTensor {
                dtype,
                shape,
                data: file.data.slice(t.range.clone()),
            },
        );
    }
    Ok(tensors)
}

/// The tokenizer of a parsed GGUF file alone (`tokenizer.json`, BOS, stop ids), whatever its architecture.
pub fn tokenizer(file: &GgufFile) -> Result<super::TokenizerData, SourceError> {
    let m = Meta { file };
    let tokens = m
        .strings_opt("tokenizer.ggml.tokens")?
        .ok_or_else(|| m.key_err("tokenizer.ggml.tokens", "missing".into()))?;
    tokenizer::from_gguf(&file.path, &vocab(&m, tokens)?)
}

/// The `tokenizer.*` keys the tokenizer is rebuilt from.
fn vocab(m: &Meta<'_>, tokens: Vec<String>) -> Result<GgufVocab, SourceError> {
    Ok(GgufVocab {
        model: m
            .str_opt("tokenizer.ggml.model")?
            .ok_or_else(|| m.key_err("tokenizer.ggml.model", "missing".into()))?
            .to_string(),
        pre: m.str_opt("tokenizer.ggml.pre")?.map(str::to_owned),
        tokens,
        token_types: m.ints_opt("tokenizer.ggml.token_type")?,
        merges: m.strings_opt("tokenizer.ggml.merges")?,
        scores: m.floats_opt("tokenizer.ggml.scores")?,
        add_space_prefix: m.bool_opt("tokenizer.ggml.add_space_prefix")?,
        bos_id: m.u32_opt("tokenizer.ggml.bos_token_id")?,
        eos_id: m.u32_opt("tokenizer.ggml.eos_token_id")?,
        eot_id: m.u32_opt("tokenizer.ggml.eot_token_id")?,
        eom_id: m.u32_opt("tokenizer.ggml.eom_token_id")?,
        unk_id: m.u32_opt("tokenizer.ggml.unknown_token_id")?,
        pad_id: m.u32_opt("tokenizer.ggml.padding_token_id")?,
        add_bos: m.bool_opt("tokenizer.ggml.add_bos_token")?,
        add_eos: m.bool_opt("tokenizer.ggml.add_eos_token")?,
        chat_template: m.str_opt("tokenizer.chat_template")?.map(str::to_owned),
    })
}

/// A GGUF file's `{arch}.*` keys for a family's own reading (`Arch::read_gguf`): typed look-ups by the
/// key's suffix (`attention.sliding_window`) whose errors name the file and the whole key.
pub struct GgufKeys<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl GgufKeys<'_> {
    /// The whole key of `suffix`: `{arch}.{suffix}`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }
    /// An error naming the file and the key of `suffix`.
    pub fn err(&self, suffix: &str, detail: impl Into<String>) -> SourceError {
        self.meta().key_err(&self.key(suffix), detail.into())
    }
    /// A required positive integer.
    pub fn positive(&self, suffix: &str) -> Result<usize, SourceError> {
        self.meta().positive(&self.key(suffix))
    }
    /// An optional non-negative integer.
    pub fn usize_opt(&self, suffix: &str) -> Result<Option<usize>, SourceError> {
        self.meta().usize_opt(&self.key(suffix))
    }
    /// An optional number.
    pub fn f32_opt(&self, suffix: &str) -> Result<Option<f32>, SourceError> {
        self.meta().f32_opt(&self.key(suffix))
    }
    fn meta(&self) -> Meta<'_> {
        Meta { file: self.file }
    }
}

/// Interprets a parsed GGUF file as a decoder-only model of a family in [`crate::arch::ARCHS`].
pub fn into_model(file: &GgufFile) -> Result<SourceModel, SourceError> {
    let path = file.path.as_str();
    let m = Meta { file };
    let name = m
        .str_opt("general.architecture")?
        .ok_or_else(|| m.key_err("general.architecture", "missing".into()))?;
    let arch = family::find_gguf(name).ok_or_else(|| {
        unsupported(
            path,
            format!(
                "architecture `{name}` (supported: {})",
                family::supported(|a| a.gguf_names())
            ),
        )
    })?;

    let tensors = tensors(file)?;
    if tensors.contains_key("rope_freqs.weight") {
        return Err(unsupported(
            path,
            "tensor `rope_freqs.weight` (per-frequency RoPE factors, e.g. Llama 3.1 scaling)"
                .into(),
        ));
    }
    let keys = GgufKeys { file, arch: name };
    let mut config = common_config(&m, &keys, &tensors)?;
    config.architecture = arch.name().into();
    arch.read_gguf(&keys, &mut config)?;
    check::check_tensors(path, arch, &config, &tensors)?;

    let tokens = m.strings_opt("tokenizer.ggml.tokens")?;
    let tokens = tokens.ok_or_else(|| m.key_err("tokenizer.ggml.tokens", "missing".into()))?;
    let vocab = vocab(&m, tokens)?;
    if vocab.tokens.len() != config.vocab_size {
        return Err(m.key_err(
            "tokenizer.ggml.tokens",
            format!(
                "{} tokens but vocab size {}",
                vocab.tokens.len(),
                config.vocab_size
            ),
        ));
    }
    let tokenizer = tokenizer::from_gguf(path, &vocab)?;

    Ok(SourceModel {
        origin: path.to_string(),
        config,
        tensors,
        tokenizer,
        generation: None,
    })
}

/// The config from the `{arch}.*` keys every family has (and the tensors: tying, biases, vocabulary
/// size where the file has no token list).
fn common_config(
    m: &Meta<'_>,
    k: &GgufKeys<'_>,
    tensors: &BTreeMap<String, SourceTensor>,
) -> Result<ModelConfig, SourceError> {
    let hidden_size = k.positive("embedding_length")?;
    let intermediate_size = k.positive("feed_forward_length")?;
    let num_layers = k.positive("block_count")?;
    let (num_heads, num_kv_heads, head_dim) = heads(k, hidden_size)?;
    let rms_eps = k
        .f32_opt("attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| k.err("attention.layer_norm_rms_epsilon", "missing"))?;
    let rope_theta = k.f32_opt("rope.freq_base")?.unwrap_or(10_000.0);
    let max_position_embeddings = k.positive("context_length")?;
    let rope_scaling = rope_scaling(m, k.arch)?;

    // Vocabulary size: the tokenizer's token list, else the embedding table.
    let tokens = m.strings_opt("tokenizer.ggml.tokens")?;
    let vocab_size = match (&tokens, tensors.get(super::canonical::TOKEN_EMBD)) {
        (Some(t), _) => t.len(),
        (None, Some(e)) => e.shape.first().copied().unwrap_or(0),
        (None, None) => {
            return Err(SourceError::MissingTensor {
                path: m.file.path.clone(),
                tensor: super::canonical::TOKEN_EMBD.into(),
            })
        }
    };
    Ok(ModelConfig {
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: !tensors.contains_key(super::canonical::OUTPUT),
        attention_bias: tensors.contains_key(&super::canonical::blk(0, "attn_q.bias")),
        ..ModelConfig::default()
    })
}

/// Heads, KV heads (dividing the heads) and the head size (`attention.key_length`, else the embedding
/// length / heads); a value size other than the key size and a partial rotation are refused.
fn heads(k: &GgufKeys<'_>, hidden_size: usize) -> Result<(usize, usize, usize), SourceError> {
    let num_heads = k.positive("attention.head_count")?;
    let num_kv_heads = match k.usize_opt("attention.head_count_kv")? {
        None => num_heads,
        Some(0) => return Err(k.err("attention.head_count_kv", "must be positive")),
        Some(v) => v,
    };
    if num_heads % num_kv_heads != 0 {
        return Err(k.err(
            "attention.head_count_kv",
            format!("{num_kv_heads} does not divide the head count {num_heads}"),
        ));
    }
    let head_dim = match k.usize_opt("attention.key_length")? {
        Some(d) if d > 0 => d,
        Some(_) => return Err(k.err("attention.key_length", "must be positive")),
        None if !hidden_size.is_multiple_of(num_heads) => {
            return Err(k.err(
                "attention.head_count",
                format!("{num_heads} does not divide the embedding length {hidden_size}"),
            ))
        }
        None => hidden_size / num_heads,
    };
    let path = &k.file.path;
    if let Some(v) = k.usize_opt("attention.value_length")? {
        if v != head_dim {
            let what = format!("value head size {v} different from key head size {head_dim}");
            return Err(unsupported(path, what));
        }
    }
    if let Some(rot) = k.usize_opt("rope.dimension_count")? {
        if rot != head_dim {
            let what = format!("partial rotary embedding ({rot} of {head_dim} head dimensions)");
            return Err(unsupported(path, what));
        }
    }
    Ok((num_heads, num_kv_heads, head_dim))
}
fn rope_scaling(m: &Meta<'_>, arch: &str) -> Result<Option<RopeScaling>, SourceError> {
    let k = |s: &str| format!("{arch}.rope.scaling.{s}");
    let ty = m.str_opt(&k("type"))?;
    let factor = m.f32_opt(&k("factor"))?;
    // Older files carry only `rope.scale_linear`.
    let legacy = m.f32_opt(&format!("{arch}.rope.scale_linear"))?;
    match (ty, factor.or(legacy)) {
        (None | Some("none"), None) | (Some("none"), _) => Ok(None),
        (None | Some("linear"), Some(f)) => {
            if !(f.is_finite() && f > 0.0) {
                return Err(m.key_err(&k("factor"), format!("must be positive, got {f}")));
            }
            if f == 1.0 {
                Ok(None)
            } else {
                Ok(Some(RopeScaling::Linear { factor: f }))
            }
        }
        (Some("linear"), None) => Err(m.key_err(&k("factor"), "missing".into())),
        (Some(other), _) => Err(unsupported(
            &m.file.path,
            format!("RoPE scaling type `{other}`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::testutil::noise;

    /// A metadata value for the test writer.
    #[derive(Clone)]
    enum V {
        U32(u32),
        F32(f32),
        Bool(bool),
        Str(String),
        Strs(Vec<String>),
        I32s(Vec<i32>),
    }

    fn s(x: &str) -> V {
        V::Str(x.into())
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &V) {
        match v {
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*b));
            }
            V::Str(x) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, x);
            }
            V::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    put_str(out, x);
                }
            }
            V::I32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }

    /// A tensor for the test writer: name, `ne` (innermost first), ggml type, bytes.
    #[derive(Clone)]
    struct T {
        name: String,
        ne: Vec<u64>,
        ty: u32,
        data: Vec<u8>,
    }

    /// Writes a GGUF v3 file with alignment 32.
    fn write_gguf(kvs: &[(&str, V)], tensors: &[T]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        let start = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend(&t.data);
        }
        out
    }

    const HIDDEN: u64 = 32;
    const FFN: u64 = 64;
    const HEADS: u32 = 2;
    const KV_HEADS: u32 = 1;
    const HEAD_DIM: u64 = 16;
    const LAYERS: usize = 2;

    fn vocab() -> Vec<String> {
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "a",
            "b",
            "ab",
            "Ġ",
            "Ġa",
            "Ġab",
            "c",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    }

    fn metadata(arch: &str) -> Vec<(String, V)> {
        let k = |x: &str| format!("{arch}.{x}");
        vec![
            ("general.architecture".into(), s(arch)),
            ("general.name".into(), s("tiny")),
            (k("embedding_length"), V::U32(HIDDEN as u32)),
            (k("feed_forward_length"), V::U32(FFN as u32)),
            (k("block_count"), V::U32(LAYERS as u32)),
            (k("attention.head_count"), V::U32(HEADS)),
            (k("attention.head_count_kv"), V::U32(KV_HEADS)),
            (k("attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
            (k("rope.freq_base"), V::F32(5e5)),
            (k("rope.dimension_count"), V::U32(HEAD_DIM as u32)),
            (k("context_length"), V::U32(256)),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            ("tokenizer.ggml.tokens".into(), V::Strs(vocab())),
            (
                "tokenizer.ggml.token_type".into(),
                V::I32s(vec![3, 3, 3, 1, 1, 1, 1, 1, 1, 1]),
            ),
            (
                "tokenizer.ggml.merges".into(),
                V::Strs(vec!["a b".into(), "Ġ a".into(), "Ġ ab".into()]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
            ("tokenizer.chat_template".into(), s("{{ messages }}")),
        ]
    }

    /// Bytes of a `[rows, cols]` (outermost first) tensor of ggml type `ty`.
    fn tensor(name: &str, shape: &[u64], ty: u32, seed: u64) -> T {
        let ne: Vec<u64> = shape.iter().rev().copied().collect();
        let (block, bytes) = ggml_type_layout(ty).expect("known type");
        let n = ne.iter().product::<u64>() / block * bytes;
        T {
            name: name.into(),
            ne,
            ty,
            data: noise(n as usize, seed),
        }
    }

    /// Every tensor of a tiny llama, cycling through all supported types.
    fn tensors(biases: bool) -> Vec<T> {
        const TYPES: [u32; 8] = [0, 1, 30, 8, 2, 3, 6, 7]; // F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1
        let q = HEADS as u64 * HEAD_DIM;
        let kv = KV_HEADS as u64 * HEAD_DIM;
        let vocab = vocab().len() as u64;
        let mut v = vec![
            tensor("token_embd.weight", &[vocab, HIDDEN], 8, 1),
            tensor("output_norm.weight", &[HIDDEN], 0, 2),
            tensor("output.weight", &[vocab, HIDDEN], 2, 3),
        ];
        let mut k = 0;
        for i in 0..LAYERS {
            let mut mat = |suffix: &str, shape: &[u64]| {
                k += 1;
                tensor(
                    &format!("blk.{i}.{suffix}"),
                    shape,
                    TYPES[k % TYPES.len()],
                    100 + k as u64,
                )
            };
            v.push(mat("attn_q.weight", &[q, HIDDEN]));
            v.push(mat("attn_k.weight", &[kv, HIDDEN]));
            v.push(mat("attn_v.weight", &[kv, HIDDEN]));
            v.push(mat("attn_output.weight", &[HIDDEN, q]));
            v.push(mat("ffn_gate.weight", &[FFN, HIDDEN]));
            v.push(mat("ffn_up.weight", &[FFN, HIDDEN]));
            v.push(mat("ffn_down.weight", &[HIDDEN, FFN]));
            v.push(tensor(
                &format!("blk.{i}.attn_norm.weight"),
                &[HIDDEN],
                0,
                7 + i as u64,
            ));
            v.push(tensor(
                &format!("blk.{i}.ffn_norm.weight"),
                &[HIDDEN],
                0,
                9 + i as u64,
            ));
            if biases {
                v.push(tensor(&format!("blk.{i}.attn_q.bias"), &[q], 0, 11));
                v.push(tensor(&format!("blk.{i}.attn_k.bias"), &[kv], 0, 12));
                v.push(tensor(&format!("blk.{i}.attn_v.bias"), &[kv], 0, 13));
            }
        }
        v
    }

    fn build(kvs: &[(String, V)], ts: &[T]) -> Vec<u8> {
        let kvs: Vec<(&str, V)> = kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        write_gguf(&kvs, ts)
    }

    fn load(bytes: Vec<u8>) -> Result<SourceModel, SourceError> {
        let f = parse("tiny.gguf", Bytes::from(bytes))?;
        into_model(&f)
    }

    #[test]
    fn reads_every_supported_type_zero_copy() {
        let ts = tensors(false);
        let m = load(build(&metadata("llama"), &ts)).expect("tiny llama loads");
        let c = &m.config;
        assert_eq!(c.architecture, "llama");
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers),
            (32, 64, 2)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (2, 1, 16));
        assert_eq!((c.vocab_size, c.max_position_embeddings), (10, 256));
        assert_eq!(c.rope_theta, 5e5);
        assert!((c.rms_eps - 1e-5).abs() < 1e-12);
        assert!(!c.tie_word_embeddings && c.rope_interleaved && !c.attention_bias);
        assert_eq!(m.tensors.len(), ts.len());
        let mut seen = BTreeSet::new();
        for t in &ts {
            let got = &m.tensors[&t.name];
            let shape: Vec<usize> = t.ne.iter().rev().map(|&d| d as usize).collect();
            assert_eq!(got.shape, shape, "{}", t.name);
            assert_eq!(got.data.as_ref(), t.data.as_slice(), "{}", t.name);
            assert_eq!(Some(got.dtype), source_dtype(t.ty));
            seen.insert(format!("{:?}", got.dtype));
        }
        assert_eq!(seen.len(), 8, "all eight block-32 types covered: {seen:?}");
        assert!(m.generation.is_none());
    }

    use std::collections::BTreeSet;

    #[test]
    fn reads_from_a_mapped_file() {
        let bytes = build(&metadata("llama"), &tensors(false));
        let path = std::env::temp_dir().join(format!("onestep-gguf-{}.gguf", std::process::id()));
        std::fs::write(&path, &bytes).expect("write temp file");
        let m = read(&path);
        std::fs::remove_file(&path).ok();
        let m = m.expect("reads");
        assert_eq!(m.origin, path.display().to_string());
        // The tensor bytes are slices of the mapping, not copies.
        let a = &m.tensors["blk.0.attn_q.weight"].data;
        let b = &m.tensors["blk.1.attn_q.weight"].data;
        assert!(a.as_ptr() < b.as_ptr());
    }

    #[test]
    fn tokenizer_from_tiny_vocab() {
        let m = load(build(&metadata("llama"), &tensors(false))).expect("loads");
        let t = &m.tokenizer;
        assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(1), 2, false));
        // <|endoftext|> and <|im_end|> end generation (llama.cpp's rule).
        assert_eq!(t.stop_ids, vec![0, 2]);
        assert_eq!(t.chat_template.as_deref(), Some("{{ messages }}"));
        let tok = tokenizers::Tokenizer::from_bytes(t.tokenizer_json.as_bytes()).expect("loads");
        let enc = tok.encode("ab ab<|im_end|>a", false).expect("encode");
        assert_eq!(enc.get_ids(), &[5, 8, 2, 3]);
        assert_eq!(
            tok.decode(enc.get_ids(), false).expect("decode"),
            "ab ab<|im_end|>a"
        );
        assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), "ab aba");
    }

    #[test]
    fn qwen2_has_biases_and_rotate_half() {
        let kvs = metadata("qwen2");
        let m = load(build(&kvs, &tensors(true))).expect("qwen2 loads");
        assert!(m.config.attention_bias && !m.config.rope_interleaved);
        // Without the biases it is a missing-tensor error.
        let e = load(build(&kvs, &tensors(false))).expect_err("biases required");
        assert!(
            matches!(&e, SourceError::MissingTensor { tensor, .. } if tensor == "blk.0.attn_q.bias"),
            "{e}"
        );
    }

    #[test]
    fn qwen3_has_qk_norms_and_rotate_half() {
        let mut ts = tensors(false);
        for i in 0..LAYERS {
            for n in ["attn_q_norm", "attn_k_norm"] {
                ts.push(tensor(&format!("blk.{i}.{n}.weight"), &[HEAD_DIM], 0, 50));
            }
        }
        let m = load(build(&metadata("qwen3"), &ts)).expect("qwen3 loads");
        assert!(m.config.qk_norm && !m.config.rope_interleaved && !m.config.attention_bias);
        // The norms are required for qwen3 ...
        let e = load(build(&metadata("qwen3"), &tensors(false))).expect_err("norms required");
        assert!(
            matches!(&e, SourceError::MissingTensor { tensor, .. } if tensor == "blk.0.attn_q_norm.weight"),
            "{e}"
        );
        // ... and refused where the architecture would not apply them.
        match load(build(&metadata("llama"), &ts)) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("blk.0.attn_q_norm.weight"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Gemma 3: q/k norms and the two post-norms required, every 6th layer global unless the file
    /// says, local layers on base 10,000, scores scaled by 1/sqrt(head_dim), no soft caps; Gemma 2
    /// takes its soft caps from the file and alternates.
    #[test]
    fn gemma_layers_norms_and_caps() {
        let mut ts = tensors(false);
        for i in 0..LAYERS {
            for n in ["attn_q_norm", "attn_k_norm"] {
                ts.push(tensor(&format!("blk.{i}.{n}.weight"), &[HEAD_DIM], 0, 50));
            }
        }
        let with_post = |mut ts: Vec<T>| {
            for i in 0..LAYERS {
                for n in ["post_attention_norm", "post_ffw_norm"] {
                    ts.push(tensor(&format!("blk.{i}.{n}.weight"), &[HIDDEN], 0, 51));
                }
            }
            ts
        };
        let gemma = |arch: &str, extra: &[(&str, V)]| {
            let mut kvs = metadata(arch);
            kvs.push((format!("{arch}.attention.sliding_window"), V::U32(4)));
            kvs.extend(
                extra
                    .iter()
                    .map(|(k, v)| (format!("{arch}.{k}"), v.clone())),
            );
            kvs
        };
        // the post-norms are required
        let e = load(build(&gemma("gemma3", &[]), &ts)).expect_err("post-norms required");
        assert!(
            matches!(&e, SourceError::MissingTensor { tensor, .. } if tensor == "blk.0.post_attention_norm.weight"),
            "{e}"
        );
        let m = load(build(&gemma("gemma3", &[]), &with_post(ts.clone()))).expect("gemma3 loads");
        let g = &m.config;
        assert!(m.config.qk_norm && !m.config.rope_interleaved);
        assert_eq!(m.config.sliding_window, Some(4));
        let every6: Vec<usize> = (0..LAYERS).filter(|i| i % 6 == 5).collect();
        assert_eq!(g.global_layers, every6);
        assert_eq!((g.local_rope_theta, g.norm_offset), (Some(10_000.0), 0.0));
        assert_eq!(g.attn_scale, Some(1.0 / (HEAD_DIM as f32).sqrt()));
        assert_eq!((g.attn_softcap, g.final_softcap), (None, None));
        // a pattern in the file wins
        let kvs = gemma("gemma3", &[("attention.sliding_window_pattern", V::U32(2))]);
        let m = load(build(&kvs, &with_post(ts.clone()))).expect("gemma3 loads");
        let every2: Vec<usize> = (0..LAYERS).filter(|i| i % 2 == 1).collect();
        assert_eq!(m.config.global_layers, every2);
        // gemma2: no q/k norms, soft caps, every second layer global
        let caps = [
            ("attn_logit_softcapping", V::F32(50.0)),
            ("final_logit_softcapping", V::F32(30.0)),
        ];
        let m = load(build(&gemma("gemma2", &caps), &with_post(tensors(false)))).expect("gemma2");
        let g = m.config;
        assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(g.global_layers, every2);
        // a bad cap and a missing window are errors naming the key
        let bad = [("final_logit_softcapping", V::F32(-1.0))];
        match load(build(&gemma("gemma2", &bad), &with_post(tensors(false)))) {
            Err(SourceError::Key { key, .. }) => assert_eq!(key, "gemma2.final_logit_softcapping"),
            other => panic!("{other:?}"),
        }
        match load(build(&metadata("gemma3"), &with_post(ts))) {
            Err(SourceError::Key { key, .. }) => assert_eq!(key, "gemma3.attention.sliding_window"),
            other => panic!("{other:?}"),
        }
        // post-norms in a llama file are refused
        match load(build(&metadata("llama"), &with_post(tensors(false)))) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("post_attention_norm"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = build(&metadata("llama"), &tensors(false));
        assert!(load(bytes.clone()).is_ok());
        for len in 0..bytes.len() {
            let r = load(bytes[..len].to_vec());
            assert!(
                r.is_err(),
                "truncated to {len} of {} bytes loaded",
                bytes.len()
            );
        }
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = build(&metadata("llama"), &tensors(false));
        let header_len = 2048.min(bytes.len());
        let rnd = noise(40_000, 77);
        let mut errors = 0;
        for i in 0..10_000 {
            let mut b = bytes.clone();
            let pos = (usize::from(rnd[4 * i]) << 8 | usize::from(rnd[4 * i + 1])) % header_len;
            b[pos] ^= rnd[4 * i + 2];
            errors += usize::from(load(b).is_err());
        }
        assert!(errors > 1000, "corruptions detected: {errors}");
    }

    fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    fn format_detail(r: Result<GgufFile, SourceError>) -> String {
        match r {
            Err(SourceError::Format { detail, .. }) => detail,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn metadata_arrays_are_bounded_in_total() {
        // Two arrays of uint8 that each fit the file, together over the element budget: a file of
        // N bytes must not become 32 N bytes of values.
        let half = MAX_METADATA_ELEMENTS / 2 + 1;
        let mut b = header(0, 2);
        for key in ["a", "b"] {
            put_str(&mut b, key);
            b.extend(9u32.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(half.to_le_bytes());
            b.resize(b.len() + half as usize, 7);
        }
        let d = format_detail(parse("h.gguf", Bytes::from(b)));
        assert!(d.contains("`b`") && d.contains("elements"), "{d}");
        // Just under the budget parses.
        let mut b = header(0, 1);
        put_str(&mut b, "a");
        b.extend(9u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(MAX_METADATA_ELEMENTS.to_le_bytes());
        b.resize(b.len() + MAX_METADATA_ELEMENTS as usize, 7);
        b.resize(b.len().div_ceil(32) * 32, 0);
        let f = parse("h.gguf", Bytes::from(b)).expect("at the budget");
        assert_eq!(
            f.metadata["a"].as_array().map(<[_]>::len),
            Some(MAX_METADATA_ELEMENTS as usize)
        );
    }

    #[test]
    fn hostile_counts_fail_without_allocating() {
        let d = format_detail(parse("h.gguf", Bytes::from(header(u64::MAX, 0))));
        assert!(d.contains("tensor count"), "{d}");
        let d = format_detail(parse("h.gguf", Bytes::from(header(0, u64::MAX / 2))));
        assert!(d.contains("kv count"), "{d}");
        // A key whose length claims most of the address space.
        let mut b = header(0, 1);
        b.extend(u64::MAX.to_le_bytes());
        b.extend([0u8; 64]);
        let d = format_detail(parse("h.gguf", Bytes::from(b)));
        assert!(d.contains("length of key"), "{d}");
        // A string array with a huge length.
        let mut b = header(0, 1);
        put_str(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        b.extend([0u8; 64]);
        let d = format_detail(parse("h.gguf", Bytes::from(b)));
        assert!(d.contains("tokenizer.ggml.tokens"), "{d}");
        // A string value longer than the file.
        let mut b = header(0, 1);
        put_str(&mut b, "general.name");
        b.extend(8u32.to_le_bytes());
        b.extend(1000u64.to_le_bytes());
        b.extend(b"short");
        let d = format_detail(parse("h.gguf", Bytes::from(b)));
        assert!(d.contains("general.name"), "{d}");
        // A tensor of rank 5, and one whose shape overflows.
        for (ne, want) in [(vec![1u64; 5], "rank 5"), (vec![u64::MAX, 4], "overflows")] {
            let mut b = header(1, 0);
            put_str(&mut b, "t");
            b.extend((ne.len() as u32).to_le_bytes());
            for d in &ne {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
            b.resize(b.len() + 64, 0);
            let d = format_detail(parse("h.gguf", Bytes::from(b)));
            assert!(d.contains(want), "{d}");
        }
    }

    #[test]
    fn bad_magic_and_versions() {
        let d = format_detail(parse("x.gguf", Bytes::from_static(b"GGML\x03\0\0\0")));
        assert!(d.contains("magic"), "{d}");
        for (v, want) in [
            (1u32, "version 1"),
            (3u32.swap_bytes(), "big-endian"),
            (9, "version 9"),
        ] {
            let mut b = b"GGUF".to_vec();
            b.extend(v.to_le_bytes());
            b.extend([0u8; 16]);
            match parse("x.gguf", Bytes::from(b)) {
                Err(SourceError::Unsupported { what, .. }) => {
                    assert!(what.contains(want), "{what}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn k_quants_read_in_whole_super_blocks() {
        let mut ts = tensors(false);
        for (i, ty) in [12u32, 13, 14].into_iter().enumerate() {
            ts[3 + i] = tensor(&ts[3 + i].name.clone(), &[2, 256], ty, 40 + i as u64);
        }
        let f = parse("tiny.gguf", Bytes::from(build(&metadata("llama"), &ts))).unwrap();
        for (i, want) in [SourceDType::Q4_K, SourceDType::Q5_K, SourceDType::Q6_K]
            .into_iter()
            .enumerate()
        {
            let t = &f.tensors[3 + i];
            assert_eq!(source_dtype(t.ggml_type), Some(want));
            assert_eq!(t.range.len(), 2 * want.block_bytes(), "{}", t.name);
        }
        // A row of 32 is not a whole super-block of 256: a format error naming the tensor.
        ts[3].ne = vec![32, 2];
        let name = ts[3].name.clone();
        let e = format_detail(parse(
            "tiny.gguf",
            Bytes::from(build(&metadata("llama"), &ts)),
        ));
        assert!(e.contains(&name) && e.contains("256"), "{e}");
    }

    #[test]
    fn unsupported_tensor_type_names_tensor_and_type() {
        let mut ts = tensors(false);
        ts[3] = tensor(&ts[3].name.clone(), &[HEADS as u64 * HEAD_DIM, 256], 10, 5); // Q2_K
        let name = ts[3].name.clone();
        match load(build(&metadata("llama"), &ts)) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(
                    what.contains("Q2_K") && what.contains(&name) && what.contains("Q6_K"),
                    "{what}"
                )
            }
            other => panic!("{other:?}"),
        }
        // An id ggml does not know at all is a format error naming the tensor.
        ts[3].ty = 99;
        match load(build(&metadata("llama"), &ts)) {
            Err(SourceError::Format { detail, .. }) => {
                assert!(detail.contains("99") && detail.contains(&name), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn config_and_shape_errors() {
        // Unsupported architecture.
        let mut kvs = metadata("llama");
        kvs[0].1 = s("gpt2");
        match load(build(&kvs, &tensors(false))) {
            Err(SourceError::Unsupported { what, .. }) => assert!(what.contains("gpt2"), "{what}"),
            other => panic!("{other:?}"),
        }
        // A missing required key names it.
        let kvs: Vec<_> = metadata("llama")
            .into_iter()
            .filter(|(k, _)| k != "llama.feed_forward_length")
            .collect();
        match load(build(&kvs, &tensors(false))) {
            Err(SourceError::Key { key, .. }) => assert_eq!(key, "llama.feed_forward_length"),
            other => panic!("{other:?}"),
        }
        // A tensor whose shape disagrees with the config.
        let mut ts = tensors(false);
        let i = ts
            .iter()
            .position(|t| t.name == "blk.1.ffn_up.weight")
            .expect("exists");
        ts[i] = tensor("blk.1.ffn_up.weight", &[96, HIDDEN], 0, 3);
        match load(build(&metadata("llama"), &ts)) {
            Err(SourceError::Shape {
                tensor,
                actual,
                expected,
                ..
            }) => {
                assert_eq!(tensor, "blk.1.ffn_up.weight");
                assert_eq!((actual, expected), (vec![96, 32], vec![64, 32]));
            }
            other => panic!("{other:?}"),
        }
        // Tied embeddings when `output.weight` is absent.
        let ts: Vec<T> = tensors(false)
            .into_iter()
            .filter(|t| t.name != "output.weight")
            .collect();
        assert!(
            load(build(&metadata("llama"), &ts))
                .expect("loads")
                .config
                .tie_word_embeddings
        );
        // Linear RoPE scaling; yarn is refused.
        let mut kvs = metadata("llama");
        kvs.push(("llama.rope.scaling.type".into(), s("linear")));
        kvs.push(("llama.rope.scaling.factor".into(), V::F32(4.0)));
        let m = load(build(&kvs, &tensors(false))).expect("loads");
        assert_eq!(
            m.config.rope_scaling,
            Some(RopeScaling::Linear { factor: 4.0 })
        );
        let n = kvs.len();
        kvs[n - 2].1 = s("yarn");
        assert!(matches!(
            load(build(&kvs, &tensors(false))),
            Err(SourceError::Unsupported { .. })
        ));
    }

    #[test]
    fn unsupported_tokenizer_model_is_clear() {
        let mut kvs = metadata("llama");
        for (k, v) in kvs.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = s("t5");
            }
        }
        match load(build(&kvs, &tensors(false))) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("`t5`"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }
}
