//! A tracer over symbolic tensors: every op checks shapes and dtypes when it is recorded, infers its output
//! shape, and appends one readably named node to the shared [`Graph`] IR.
//!
//! Dimensions are known numbers, `T + n` (the chunk length plus a constant; `T` itself is `T + 0`), or a
//! data-dependent size (the `k` of a `TopK`). Small int64 tensors (shapes, scalars such as `Tn`) also carry
//! their symbolic *contents* so that `Range`, `Expand` and `Reshape` can infer their output shapes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use onestep_format::graph::{Attr, DType, Dim, Graph, Initializer, Node, ValueInfo};

mod audio;
mod branch;

/// One symbolic dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SDim {
    /// A known size.
    N(usize),
    /// `T + n`: the chunk length plus a constant (`T(0)` is `T`).
    T(usize),
    /// A size known only when the graph runs (named after the node that makes it).
    Dyn(String),
}

impl fmt::Display for SDim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SDim::N(n) => write!(f, "{n}"),
            SDim::T(0) => f.write_str("T"),
            SDim::T(n) => write!(f, "{n}+T"),
            SDim::Dyn(s) => f.write_str(s),
        }
    }
}

impl SDim {
    fn add(&self, o: &SDim) -> Option<SDim> {
        match (self, o) {
            (SDim::N(a), SDim::N(b)) => Some(SDim::N(a + b)),
            (SDim::N(a), SDim::T(b)) | (SDim::T(b), SDim::N(a)) => Some(SDim::T(a + b)),
            _ => None,
        }
    }
}

/// Formats a shape as `[1, T, 64]`.
pub fn fmt_shape(s: &[SDim]) -> String {
    let v: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// A symbolic tensor: a value name in the graph, its dtype and symbolic shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sym {
    /// Value name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Symbolic shape.
    pub shape: Vec<SDim>,
    /// Symbolic contents of a small non-negative int64 tensor (shapes, sizes), when known.
    pub value: Option<Vec<SDim>>,
}

impl Sym {
    fn desc(&self) -> String {
        format!("{} {}{}", self.name, self.dtype, fmt_shape(&self.shape))
    }
    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// A shape or dtype error found while tracing, naming the node, the op and the operands.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// An op's operands do not fit together.
    #[error("node `{node}` ({op}): {detail}; operands: {operands}")]
    Op {
        /// Node name, e.g. `l3.attn.q_proj`.
        node: String,
        /// ONNX op type.
        op: String,
        /// What is wrong.
        detail: String,
        /// Operand names, dtypes and shapes.
        operands: String,
    },
    /// A value or initializer name is used twice.
    #[error("name `{0}` is already used in the graph")]
    Duplicate(String),
    /// A model-level problem found while building the graph (missing weight, bad config).
    #[error("{0}")]
    Model(String),
}

type R<T> = Result<T, TraceError>;

/// How `Attention` treats its scores before the softmax.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionScores {
    /// Multiplies `q·kᵀ` (`None`: `1/sqrt(head_dim)`).
    pub scale: Option<f32>,
    /// `c·tanh(s/c)` on the scaled scores (gemma2's attention logit softcapping).
    pub softcap: Option<f32>,
}

/// Records ops into a [`Graph`].
#[derive(Debug)]
pub struct Tracer {
    graph: Graph,
    names: HashSet<String>,
    consts: HashMap<(DType, Vec<usize>, Vec<u8>), Sym>,
    scope: String,
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (a >= 0 && (a as usize) < rank).then_some(a as usize)
}

fn broadcast(a: &[SDim], b: &[SDim]) -> Option<Vec<SDim>> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n {
            &a[i + a.len() - n]
        } else {
            &SDim::N(1)
        };
        let db = if i + b.len() >= n {
            &b[i + b.len() - n]
        } else {
            &SDim::N(1)
        };
        out.push(if da == db || *db == SDim::N(1) {
            da.clone()
        } else if *da == SDim::N(1) {
            db.clone()
        } else {
            return None;
        });
    }
    Some(out)
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

impl Tracer {
    /// A new, empty graph named `name` with the contract's opsets.
    pub fn new(name: &str) -> Self {
        let mut graph = Graph {
            name: name.to_string(),
            ..Graph::default()
        };
        graph
            .opsets
            .insert(String::new(), onestep_format::contract::OPSET);
        graph.opsets.insert(
            onestep_format::contract::MS_DOMAIN.into(),
            onestep_format::contract::MS_OPSET,
        );
        Tracer {
            graph,
            names: HashSet::new(),
            consts: HashMap::new(),
            scope: String::new(),
        }
    }

    /// Sets the prefix of the following node names (`l3` → `l3.attn.q_proj`); `""` clears it.
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Model metadata (written as `metadata_props`).
    pub fn metadata_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.graph.metadata
    }

    /// Finishes tracing.
    pub fn finish(self) -> Graph {
        self.graph
    }

    fn claim(&mut self, name: &str) -> R<()> {
        if !self.names.insert(name.to_string()) {
            return Err(TraceError::Duplicate(name.to_string()));
        }
        Ok(())
    }

    fn unique(&mut self, name: &str) -> String {
        let base = if self.scope.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.scope)
        };
        let mut cand = base.clone();
        let mut i = 2;
        while self.names.contains(&cand) {
            cand = format!("{base}.{i}");
            i += 1;
        }
        self.names.insert(cand.clone());
        cand
    }

    fn err(&self, node: &str, op: &str, detail: impl Into<String>, xs: &[&Sym]) -> TraceError {
        let full = if self.scope.is_empty() {
            node.to_string()
        } else {
            format!("{}.{node}", self.scope)
        };
        TraceError::Op {
            node: full,
            op: op.to_string(),
            detail: detail.into(),
            operands: xs.iter().map(|s| s.desc()).collect::<Vec<_>>().join(", "),
        }
    }

    /// Declares a graph input. Its shape may use `T` (only `T(0)`) and known sizes.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<SDim>) -> R<Sym> {
        self.claim(name)?;
        let dims = to_dims(&shape).ok_or_else(|| {
            TraceError::Model(format!(
                "input `{name}`: shape {} is not representable",
                fmt_shape(&shape)
            ))
        })?;
        self.graph.inputs.push(ValueInfo {
            name: name.to_string(),
            dtype,
            shape: dims,
        });
        Ok(Sym {
            name: name.to_string(),
            dtype,
            shape,
            value: None,
        })
    }

    /// Makes `x` a graph output called `name` (renaming the value everywhere) and returns it renamed.
    pub fn output(&mut self, x: &Sym, name: &str) -> R<Sym> {
        if x.name != name {
            self.claim(name)?;
            let producer = self.graph.nodes.iter().any(|n| n.outputs.contains(&x.name));
            if !producer {
                return Err(TraceError::Model(format!(
                    "output `{name}`: value `{}` is not produced by a node",
                    x.name
                )));
            }
            for n in &mut self.graph.nodes {
                for v in n.outputs.iter_mut().chain(n.inputs.iter_mut()) {
                    if *v == x.name {
                        *v = name.to_string();
                    }
                }
            }
        }
        let dims = to_dims(&x.shape).ok_or_else(|| {
            TraceError::Model(format!(
                "output `{name}`: shape {} is not representable",
                fmt_shape(&x.shape)
            ))
        })?;
        self.graph.outputs.push(ValueInfo {
            name: name.to_string(),
            dtype: x.dtype,
            shape: dims,
        });
        Ok(Sym {
            name: name.to_string(),
            ..x.clone()
        })
    }

    /// Adds a weight initializer (its name is used as given).
    pub fn weight(&mut self, name: &str, dtype: DType, dims: &[usize], data: Bytes) -> R<Sym> {
        let numel: usize = dims.iter().product();
        if data.len() != numel * dtype.size() {
            return Err(TraceError::Model(format!(
                "weight `{name}`: {} bytes for {dtype}{dims:?} (expected {})",
                data.len(),
                numel * dtype.size()
            )));
        }
        self.claim(name)?;
        self.graph.initializers.push(Initializer {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
            data,
        });
        Ok(Sym {
            name: name.to_string(),
            dtype,
            shape: dims.iter().map(|&d| SDim::N(d)).collect(),
            value: None,
        })
    }

    fn constant(
        &mut self,
        hint: &str,
        dtype: DType,
        dims: &[usize],
        bytes: Vec<u8>,
        value: Option<Vec<SDim>>,
    ) -> Sym {
        let key = (dtype, dims.to_vec(), bytes);
        if let Some(s) = self.consts.get(&key) {
            return s.clone();
        }
        let mut name = format!("const.{hint}");
        let mut i = 2;
        while self.names.contains(&name) {
            name = format!("const.{hint}.{i}");
            i += 1;
        }
        self.names.insert(name.clone());
        self.graph.initializers.push(Initializer {
            name: name.clone(),
            dtype,
            dims: dims.to_vec(),
            data: Bytes::from(key.2.clone()),
        });
        let s = Sym {
            name,
            dtype,
            shape: dims.iter().map(|&d| SDim::N(d)).collect(),
            value,
        };
        self.consts.insert(key, s.clone());
        s
    }

    /// An int64 constant: a scalar when `scalar`, else a 1-D tensor.
    pub fn const_i64(&mut self, vals: &[i64], scalar: bool) -> Sym {
        let hint = format!(
            "i64.{}",
            vals.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("_")
        );
        let hint = if scalar { hint } else { format!("{hint}.v") };
        let dims: Vec<usize> = if scalar { vec![] } else { vec![vals.len()] };
        let value = vals
            .iter()
            .all(|&v| v >= 0)
            .then(|| vals.iter().map(|&v| SDim::N(v as usize)).collect());
        self.constant(
            &hint,
            DType::I64,
            &dims,
            bytemuck::cast_slice(vals).to_vec(),
            value,
        )
    }

    /// An f32 scalar constant.
    pub fn const_f32(&mut self, v: f32) -> Sym {
        self.constant(
            &format!("f32.{v:e}"),
            DType::F32,
            &[],
            v.to_le_bytes().to_vec(),
            None,
        )
    }

    /// A u8 scalar constant.
    pub fn const_u8(&mut self, v: u8) -> Sym {
        self.constant(&format!("u8.{v}"), DType::U8, &[], vec![v], None)
    }

    /// Appends a node with the given inputs (`None` = absent optional input) and one output per
    /// `(dtype, shape, value)`; returns the output symbols.
    fn node(
        &mut self,
        name: &str,
        op: &str,
        domain: &str,
        inputs: &[Option<&Sym>],
        attrs: Vec<(&str, Attr)>,
        outs: Vec<(DType, Vec<SDim>, Option<Vec<SDim>>)>,
    ) -> Vec<Sym> {
        let full = self.unique(name);
        let n_out = outs.len();
        let out_syms: Vec<Sym> = outs
            .into_iter()
            .enumerate()
            .map(|(i, (dtype, shape, value))| {
                let vname = if n_out == 1 {
                    full.clone()
                } else {
                    let v = format!("{full}:{i}");
                    self.names.insert(v.clone());
                    v
                };
                Sym {
                    name: vname,
                    dtype,
                    shape,
                    value,
                }
            })
            .collect();
        self.graph.nodes.push(Node {
            name: full,
            op: op.to_string(),
            domain: domain.to_string(),
            inputs: inputs
                .iter()
                .map(|i| i.map(|s| s.name.clone()).unwrap_or_default())
                .collect(),
            outputs: out_syms.iter().map(|s| s.name.clone()).collect(),
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        out_syms
    }

    #[allow(clippy::too_many_arguments)]
    fn one(
        &mut self,
        name: &str,
        op: &str,
        inputs: &[Option<&Sym>],
        attrs: Vec<(&str, Attr)>,
        dtype: DType,
        shape: Vec<SDim>,
        value: Option<Vec<SDim>>,
    ) -> Sym {
        self.node(name, op, "", inputs, attrs, vec![(dtype, shape, value)])
            .pop()
            .expect("one output")
    }

    // ---------------------------------------------------------------- shape ops

    /// `Reshape(x, shape)`: `target` may hold at most one non-constant dim (written as -1); the known
    /// sizes must multiply to the same number and the non-constant dims must match.
    pub fn reshape(&mut self, name: &str, x: &Sym, target: &[SDim]) -> R<Sym> {
        let split = |s: &[SDim]| {
            let mut k = 1usize;
            let mut syms: Vec<SDim> = s
                .iter()
                .filter_map(|d| match d {
                    SDim::N(n) => {
                        k *= n;
                        None
                    }
                    SDim::T(c) if *c > 0 => Some(d.clone()),
                    other => Some(other.clone()),
                })
                .collect();
            syms.sort_by_key(|d| d.to_string());
            (k, syms)
        };
        let (ka, sa) = split(&x.shape);
        let (kb, sb) = split(target);
        if ka != kb || sa != sb {
            return Err(self.err(
                name,
                "Reshape",
                format!("cannot reshape to {}", fmt_shape(target)),
                &[x],
            ));
        }
        if sb.len() > 1 {
            return Err(self.err(name, "Reshape", "more than one unknown target dim", &[x]));
        }
        let vals: Vec<i64> = target
            .iter()
            .map(|d| match d {
                SDim::N(n) => *n as i64,
                _ => -1,
            })
            .collect();
        let shape = self.const_i64(&vals, false);
        Ok(self.one(
            name,
            "Reshape",
            &[Some(x), Some(&shape)],
            vec![],
            x.dtype,
            target.to_vec(),
            x.value.clone(),
        ))
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, name: &str, x: &Sym, perm: &[usize]) -> R<Sym> {
        let mut seen = vec![false; x.rank()];
        for &p in perm {
            if p >= x.rank() || seen[p] {
                return Err(self.err(name, "Transpose", format!("bad perm {perm:?}"), &[x]));
            }
            seen[p] = true;
        }
        if perm.len() != x.rank() {
            return Err(self.err(
                name,
                "Transpose",
                format!("perm {perm:?} has the wrong rank"),
                &[x],
            ));
        }
        let shape = perm.iter().map(|&p| x.shape[p].clone()).collect();
        let p: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        Ok(self.one(
            name,
            "Transpose",
            &[Some(x)],
            vec![("perm", Attr::Ints(p))],
            x.dtype,
            shape,
            None,
        ))
    }

    /// `Squeeze(x, axes)`: every squeezed dim must be 1.
    pub fn squeeze(&mut self, name: &str, x: &Sym, axes: &[i64]) -> R<Sym> {
        let mut drop = vec![false; x.rank()];
        for &a in axes {
            match norm_axis(a, x.rank()) {
                Some(a) if x.shape[a] == SDim::N(1) => drop[a] = true,
                _ => {
                    return Err(self.err(
                        name,
                        "Squeeze",
                        format!("axis {a} is not a size-1 dim"),
                        &[x],
                    ))
                }
            }
        }
        let shape = x
            .shape
            .iter()
            .zip(&drop)
            .filter(|(_, d)| !**d)
            .map(|(s, _)| s.clone())
            .collect();
        let ax = self.const_i64(axes, false);
        Ok(self.one(
            name,
            "Squeeze",
            &[Some(x), Some(&ax)],
            vec![],
            x.dtype,
            shape,
            x.value.clone(),
        ))
    }

    /// `Unsqueeze(x, axes)`.
    pub fn unsqueeze(&mut self, name: &str, x: &Sym, axes: &[i64]) -> R<Sym> {
        let out_rank = x.rank() + axes.len();
        let mut ins = vec![false; out_rank];
        for &a in axes {
            match norm_axis(a, out_rank) {
                Some(a) if !ins[a] => ins[a] = true,
                _ => return Err(self.err(name, "Unsqueeze", format!("bad axis {a}"), &[x])),
            }
        }
        let mut it = x.shape.iter();
        let shape = ins
            .iter()
            .map(|&i| {
                if i {
                    SDim::N(1)
                } else {
                    it.next().cloned().unwrap_or(SDim::N(1))
                }
            })
            .collect();
        let ax = self.const_i64(axes, false);
        Ok(self.one(
            name,
            "Unsqueeze",
            &[Some(x), Some(&ax)],
            vec![],
            x.dtype,
            shape,
            x.value.clone(),
        ))
    }

    /// `Shape(x, start, end)`: int64 1-D holding the (symbolic) dims.
    pub fn shape(&mut self, name: &str, x: &Sym, start: usize, end: usize) -> R<Sym> {
        if start >= end || end > x.rank() {
            return Err(self.err(name, "Shape", format!("bad range {start}..{end}"), &[x]));
        }
        let value = x.shape[start..end].to_vec();
        Ok(self.one(
            name,
            "Shape",
            &[Some(x)],
            vec![
                ("start", Attr::Int(start as i64)),
                ("end", Attr::Int(end as i64)),
            ],
            DType::I64,
            vec![SDim::N(end - start)],
            Some(value),
        ))
    }

    /// `Range(start, limit, delta)` over scalars; the length is inferred when start is 0, delta is 1 and
    /// the limit's symbolic value is known.
    pub fn range(&mut self, name: &str, start: &Sym, limit: &Sym, delta: &Sym) -> R<Sym> {
        for s in [start, limit, delta] {
            if s.rank() != 0 || s.dtype != limit.dtype {
                return Err(self.err(
                    name,
                    "Range",
                    "operands must be scalars of one dtype",
                    &[start, limit, delta],
                ));
            }
        }
        let len = match (&start.value, &limit.value, &delta.value) {
            (Some(a), Some(l), Some(d)) if a[..] == [SDim::N(0)] && d[..] == [SDim::N(1)] => {
                l[0].clone()
            }
            _ => {
                return Err(self.err(
                    name,
                    "Range",
                    "length cannot be inferred (need start 0, delta 1)",
                    &[start, limit, delta],
                ))
            }
        };
        Ok(self.one(
            name,
            "Range",
            &[Some(start), Some(limit), Some(delta)],
            vec![],
            limit.dtype,
            vec![len],
            None,
        ))
    }

    /// `Expand(x, shape)` where `shape`'s contents are symbolically known.
    pub fn expand(&mut self, name: &str, x: &Sym, shape: &Sym) -> R<Sym> {
        let target = shape.value.clone().ok_or_else(|| {
            self.err(
                name,
                "Expand",
                "target shape is not known symbolically",
                &[x, shape],
            )
        })?;
        let out = broadcast(&x.shape, &target).ok_or_else(|| {
            self.err(
                name,
                "Expand",
                format!("cannot expand to {}", fmt_shape(&target)),
                &[x, shape],
            )
        })?;
        Ok(self.one(
            name,
            "Expand",
            &[Some(x), Some(shape)],
            vec![],
            x.dtype,
            out,
            None,
        ))
    }

    /// `Concat(xs, axis)`.
    pub fn concat(&mut self, name: &str, xs: &[&Sym], axis: i64) -> R<Sym> {
        let first = xs
            .first()
            .ok_or_else(|| self.err(name, "Concat", "no operands", &[]))?;
        let ax = norm_axis(axis, first.rank())
            .ok_or_else(|| self.err(name, "Concat", format!("bad axis {axis}"), xs))?;
        let mut shape = first.shape.clone();
        for x in &xs[1..] {
            if x.dtype != first.dtype || x.rank() != first.rank() {
                return Err(self.err(name, "Concat", "dtype or rank differs", xs));
            }
            for (i, (a, b)) in shape.iter_mut().zip(&x.shape).enumerate() {
                if i == ax {
                    *a = a
                        .add(b)
                        .ok_or_else(|| self.err(name, "Concat", "cannot add concat dims", xs))?;
                } else if a != b {
                    return Err(self.err(name, "Concat", format!("dim {i} differs"), xs));
                }
            }
        }
        let value = if first.rank() == 1 {
            xs.iter()
                .map(|x| x.value.clone())
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat())
        } else {
            None
        };
        let ins: Vec<Option<&Sym>> = xs.iter().map(|x| Some(*x)).collect();
        Ok(self.one(
            name,
            "Concat",
            &ins,
            vec![("axis", Attr::Int(axis))],
            first.dtype,
            shape,
            value,
        ))
    }

    /// `Gather(data, idx, axis)`; `idx` is int64 (scalar or tensor).
    pub fn gather(&mut self, name: &str, data: &Sym, idx: &Sym, axis: i64) -> R<Sym> {
        let ax = norm_axis(axis, data.rank())
            .ok_or_else(|| self.err(name, "Gather", format!("bad axis {axis}"), &[data, idx]))?;
        if !matches!(idx.dtype, DType::I64 | DType::I32) {
            return Err(self.err(name, "Gather", "indices must be int64/int32", &[data, idx]));
        }
        let mut shape = data.shape[..ax].to_vec();
        shape.extend(idx.shape.iter().cloned());
        shape.extend(data.shape[ax + 1..].iter().cloned());
        Ok(self.one(
            name,
            "Gather",
            &[Some(data), Some(idx)],
            vec![("axis", Attr::Int(axis))],
            data.dtype,
            shape,
            None,
        ))
    }

    /// `GatherElements(data, idx, axis)`.
    pub fn gather_elements(&mut self, name: &str, data: &Sym, idx: &Sym, axis: i64) -> R<Sym> {
        if idx.rank() != data.rank()
            || norm_axis(axis, data.rank()).is_none()
            || idx.dtype != DType::I64
        {
            return Err(self.err(
                name,
                "GatherElements",
                "indices must be int64 of the data's rank",
                &[data, idx],
            ));
        }
        Ok(self.one(
            name,
            "GatherElements",
            &[Some(data), Some(idx)],
            vec![("axis", Attr::Int(axis))],
            data.dtype,
            idx.shape.clone(),
            None,
        ))
    }

    /// `Cast(x, to)`.
    pub fn cast(&mut self, name: &str, x: &Sym, to: DType) -> R<Sym> {
        Ok(self.one(
            name,
            "Cast",
            &[Some(x)],
            vec![("to", Attr::Int(to.onnx_code() as i64))],
            to,
            x.shape.clone(),
            x.value.clone(),
        ))
    }

    // ---------------------------------------------------------------- elementwise

    fn binary(
        &mut self,
        name: &str,
        op: &str,
        a: &Sym,
        b: &Sym,
        out: Option<DType>,
        check: fn(DType) -> bool,
    ) -> R<Sym> {
        if a.dtype != b.dtype || !check(a.dtype) {
            return Err(self.err(
                name,
                op,
                "operand dtypes differ or are not allowed",
                &[a, b],
            ));
        }
        let shape = broadcast(&a.shape, &b.shape)
            .ok_or_else(|| self.err(name, op, "shapes do not broadcast", &[a, b]))?;
        let value = match (op, &a.value, &b.value) {
            ("Add", Some(x), Some(y)) if x.len() == 1 && y.len() == 1 => {
                x[0].add(&y[0]).map(|v| vec![v])
            }
            _ => None,
        };
        Ok(self.one(
            name,
            op,
            &[Some(a), Some(b)],
            vec![],
            out.unwrap_or(a.dtype),
            shape,
            value,
        ))
    }

    /// `Add(a, b)` with broadcasting.
    pub fn add(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Add", a, b, None, |d| d != DType::Bool)
    }
    /// `Sub(a, b)`.
    pub fn sub(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Sub", a, b, None, |d| d != DType::Bool)
    }
    /// `Mul(a, b)`.
    pub fn mul(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Mul", a, b, None, |d| d != DType::Bool)
    }
    /// `Div(a, b)`.
    pub fn div(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Div", a, b, None, |d| d != DType::Bool)
    }
    /// `Max(a, b)`.
    pub fn max(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Max", a, b, None, |d| d != DType::Bool)
    }
    /// `Min(a, b)`.
    pub fn min(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Min", a, b, None, |d| d != DType::Bool)
    }
    /// `Less(a, b)` → bool.
    pub fn less(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Less", a, b, Some(DType::Bool), |d| d != DType::Bool)
    }
    /// `LessOrEqual(a, b)` → bool.
    pub fn less_or_equal(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "LessOrEqual", a, b, Some(DType::Bool), |d| {
            d != DType::Bool
        })
    }
    /// `Greater(a, b)` → bool.
    pub fn greater(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "Greater", a, b, Some(DType::Bool), |d| {
            d != DType::Bool
        })
    }
    /// `And(a, b)` over bools.
    pub fn and(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "And", a, b, None, |d| d == DType::Bool)
    }
    /// `BitwiseAnd(a, b)` over u8.
    pub fn bitwise_and(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        self.binary(name, "BitwiseAnd", a, b, None, |d| d == DType::U8)
    }
    /// `BitShift(a, b, direction="RIGHT")` over u8.
    pub fn shift_right(&mut self, name: &str, a: &Sym, b: &Sym) -> R<Sym> {
        let s = self.binary(name, "BitShift", a, b, None, |d| d == DType::U8)?;
        if let Some(n) = self.graph.nodes.last_mut() {
            n.attrs
                .insert("direction".into(), Attr::Str("RIGHT".into()));
        }
        Ok(s)
    }

    /// `Where(cond, a, b)`.
    pub fn where_(&mut self, name: &str, cond: &Sym, a: &Sym, b: &Sym) -> R<Sym> {
        if cond.dtype != DType::Bool || a.dtype != b.dtype {
            return Err(self.err(
                name,
                "Where",
                "cond must be bool and branches one dtype",
                &[cond, a, b],
            ));
        }
        let shape = broadcast(&cond.shape, &a.shape)
            .and_then(|s| broadcast(&s, &b.shape))
            .ok_or_else(|| self.err(name, "Where", "shapes do not broadcast", &[cond, a, b]))?;
        Ok(self.one(
            name,
            "Where",
            &[Some(cond), Some(a), Some(b)],
            vec![],
            a.dtype,
            shape,
            None,
        ))
    }

    /// `Gelu(x, approximate="tanh")`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    pub fn gelu_tanh(&mut self, name: &str, x: &Sym) -> R<Sym> {
        let tanh = vec![("approximate", Attr::Str("tanh".into()))];
        self.unary_float(name, "Gelu", x, tanh)
    }

    /// A float op of one input whose output has its shape and type.
    fn unary_float(&mut self, name: &str, op: &str, x: &Sym, attrs: Vec<(&str, Attr)>) -> R<Sym> {
        if !is_float(x.dtype) {
            return Err(self.err(name, op, "needs a float", &[x]));
        }
        Ok(self.one(name, op, &[Some(x)], attrs, x.dtype, x.shape.clone(), None))
    }

    /// `Tanh(x)`.
    pub fn tanh(&mut self, name: &str, x: &Sym) -> R<Sym> {
        self.unary_float(name, "Tanh", x, vec![])
    }

    /// `Sigmoid(x)`.
    pub fn sigmoid(&mut self, name: &str, x: &Sym) -> R<Sym> {
        self.unary_float(name, "Sigmoid", x, vec![])
    }

    // ---------------------------------------------------------------- reductions and sampling

    /// `Softmax(x, axis)`.
    pub fn softmax(&mut self, name: &str, x: &Sym, axis: i64) -> R<Sym> {
        if !is_float(x.dtype) || norm_axis(axis, x.rank()).is_none() {
            return Err(self.err(name, "Softmax", "needs a float and a valid axis", &[x]));
        }
        Ok(self.one(
            name,
            "Softmax",
            &[Some(x)],
            vec![("axis", Attr::Int(axis))],
            x.dtype,
            x.shape.clone(),
            None,
        ))
    }

    /// `CumSum(x, axis)`.
    pub fn cumsum(&mut self, name: &str, x: &Sym, axis: i64) -> R<Sym> {
        if norm_axis(axis, x.rank()).is_none() || x.dtype == DType::Bool {
            return Err(self.err(name, "CumSum", "bad axis or dtype", &[x]));
        }
        let ax = self.const_i64(&[axis], true);
        Ok(self.one(
            name,
            "CumSum",
            &[Some(x), Some(&ax)],
            vec![],
            x.dtype,
            x.shape.clone(),
            None,
        ))
    }

    /// `ReduceSum(x, axes, keepdims)`.
    pub fn reduce_sum(&mut self, name: &str, x: &Sym, axes: &[i64], keepdims: bool) -> R<Sym> {
        let mut red = vec![false; x.rank()];
        for &a in axes {
            let a = norm_axis(a, x.rank())
                .ok_or_else(|| self.err(name, "ReduceSum", format!("bad axis {a}"), &[x]))?;
            red[a] = true;
        }
        let shape = x
            .shape
            .iter()
            .zip(&red)
            .filter_map(|(d, r)| match (r, keepdims) {
                (true, true) => Some(SDim::N(1)),
                (true, false) => None,
                _ => Some(d.clone()),
            })
            .collect();
        let ax = self.const_i64(axes, false);
        Ok(self.one(
            name,
            "ReduceSum",
            &[Some(x), Some(&ax)],
            vec![("keepdims", Attr::Int(keepdims as i64))],
            x.dtype,
            shape,
            None,
        ))
    }

    /// `TopK(x, k, axis, largest=1, sorted=1)` → (values, indices); `k` is int64 `[1]`.
    pub fn topk(&mut self, name: &str, x: &Sym, k: &Sym, axis: i64) -> R<(Sym, Sym)> {
        let ax =
            norm_axis(axis, x.rank()).ok_or_else(|| self.err(name, "TopK", "bad axis", &[x, k]))?;
        if k.dtype != DType::I64 || k.shape != [SDim::N(1)] {
            return Err(self.err(name, "TopK", "k must be int64 [1]", &[x, k]));
        }
        let mut shape = x.shape.clone();
        shape[ax] = SDim::Dyn(format!("{name}.k"));
        let mut o = self.node(
            name,
            "TopK",
            "",
            &[Some(x), Some(k)],
            vec![
                ("axis", Attr::Int(axis)),
                ("largest", Attr::Int(1)),
                ("sorted", Attr::Int(1)),
            ],
            vec![(x.dtype, shape.clone(), None), (DType::I64, shape, None)],
        );
        let idx = o.pop().expect("two outputs");
        let vals = o.pop().expect("two outputs");
        Ok((vals, idx))
    }

    // ---------------------------------------------------------------- fused model ops

    /// `RMSNormalization(x, scale, axis=-1, epsilon)`; scale is f32 `[last dim]`.
    pub fn rms_norm(&mut self, name: &str, x: &Sym, scale: &Sym, eps: f32) -> R<Sym> {
        if x.dtype != DType::F32
            || scale.dtype != DType::F32
            || scale.rank() != 1
            || x.shape.last() != Some(&scale.shape[0])
        {
            return Err(self.err(
                name,
                "RMSNormalization",
                "scale must be f32 [last dim of x]",
                &[x, scale],
            ));
        }
        Ok(self.one(
            name,
            "RMSNormalization",
            &[Some(x), Some(scale)],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
            DType::F32,
            x.shape.clone(),
            None,
        ))
    }

    /// `RotaryEmbedding(x, cos, sin, pos_ids, interleaved)`: x `[B, heads, T, D]`, caches `[P, D/2]`,
    /// pos_ids int64 `[B, T]`.
    pub fn rope(
        &mut self,
        name: &str,
        x: &Sym,
        cos: &Sym,
        sin: &Sym,
        pos: &Sym,
        interleaved: bool,
    ) -> R<Sym> {
        let ok = x.rank() == 4
            && x.dtype == DType::F32
            && cos.dtype == DType::F32
            && cos.shape == sin.shape
            && cos.rank() == 2
            && matches!((&x.shape[3], &cos.shape[1]), (SDim::N(d), SDim::N(h)) if *d == 2 * h)
            && pos.dtype == DType::I64
            && pos.shape == [x.shape[0].clone(), x.shape[2].clone()];
        if !ok {
            return Err(self.err(
                name,
                "RotaryEmbedding",
                "need x f32 [B,H,T,D], cos/sin f32 [P,D/2], position ids i64 [B,T]",
                &[x, cos, sin, pos],
            ));
        }
        Ok(self.one(
            name,
            "RotaryEmbedding",
            &[Some(x), Some(cos), Some(sin), Some(pos)],
            vec![("interleaved", Attr::Int(interleaved as i64))],
            DType::F32,
            x.shape.clone(),
            None,
        ))
    }

    /// `Attention(q, k, v, mask)`: q `[B, nh, T, D]`, k/v `[B, kvh, S, D]`, bool mask broadcastable to
    /// `[B, nh, T, S]`; `nh` must be a multiple of `kvh`. Scores scaled by `1/sqrt(D)`, not capped.
    pub fn attention(&mut self, name: &str, q: &Sym, k: &Sym, v: &Sym, mask: &Sym) -> R<Sym> {
        self.attention_with(name, q, k, v, Some(mask), AttentionScores::default())
    }

    /// [`Tracer::attention`] with the scores' scale and softcap as given (the `scale` and `softcap`
    /// attributes of ONNX `Attention`, written only when set), and the mask optional (`None`: every
    /// query attends every key).
    pub fn attention_with(
        &mut self,
        name: &str,
        q: &Sym,
        k: &Sym,
        v: &Sym,
        mask: Option<&Sym>,
        scores: AttentionScores,
    ) -> R<Sym> {
        let mut ops = vec![q, k, v];
        ops.extend(mask);
        let fail = |t: &Self, d: &str| t.err(name, "Attention", d, &ops);
        if q.rank() != 4
            || k.rank() != 4
            || v.rank() != 4
            || [k.dtype, v.dtype] != [q.dtype; 2]
            || q.dtype != DType::F32
        {
            return Err(fail(self, "q, k, v must be f32 rank-4"));
        }
        if q.shape[0] != k.shape[0] || k.shape[..3] != v.shape[..3] || q.shape[3] != k.shape[3] {
            return Err(fail(self, "batch, kv heads, lengths or head dims differ"));
        }
        match (&q.shape[1], &k.shape[1]) {
            (SDim::N(a), SDim::N(b)) if *b > 0 && a % b == 0 => {}
            _ => return Err(fail(self, "query heads are not a multiple of kv heads")),
        }
        let full = [
            q.shape[0].clone(),
            q.shape[1].clone(),
            q.shape[2].clone(),
            k.shape[2].clone(),
        ];
        if mask.is_some_and(|mask| {
            !matches!(mask.dtype, DType::Bool | DType::F32)
                || broadcast(&mask.shape, &full).as_deref() != Some(&full[..])
        }) {
            return Err(fail(
                self,
                &format!(
                    "mask must be bool or f32 broadcastable to {}",
                    fmt_shape(&full)
                ),
            ));
        }
        let mut shape = q.shape.clone();
        shape[3] = v.shape[3].clone();
        let mut attrs = Vec::new();
        if let Some(s) = scores.scale {
            attrs.push(("scale", Attr::Float(s)));
        }
        if let Some(c) = scores.softcap {
            attrs.push(("softcap", Attr::Float(c)));
        }
        Ok(self.one(
            name,
            "Attention",
            &[Some(q), Some(k), Some(v), mask],
            attrs,
            DType::F32,
            shape,
            None,
        ))
    }

    /// `Gemm(x, w, [bias], transB=1)`: x f32 `[M, K]`, w f32 `[N, K]`, bias f32 `[N]`.
    pub fn gemm(&mut self, name: &str, x: &Sym, w: &Sym, bias: Option<&Sym>) -> R<Sym> {
        let mut ops = vec![x, w];
        ops.extend(bias);
        if x.rank() != 2 || w.rank() != 2 || x.dtype != DType::F32 || w.dtype != DType::F32 {
            return Err(self.err(name, "Gemm", "x and w must be f32 rank-2", &ops));
        }
        if x.shape[1] != w.shape[1] {
            return Err(self.err(
                name,
                "Gemm",
                "inner dims differ (w is [N, K], transB=1)",
                &ops,
            ));
        }
        if let Some(b) = bias {
            if b.dtype != DType::F32 || b.shape[..] != [w.shape[0].clone()] {
                return Err(self.err(name, "Gemm", "bias must be f32 [N]", &ops));
            }
        }
        Ok(self.one(
            name,
            "Gemm",
            &[Some(x), Some(w), bias],
            vec![("transB", Attr::Int(1))],
            DType::F32,
            vec![x.shape[0].clone(), w.shape[0].clone()],
            None,
        ))
    }

    /// `com.microsoft::MatMulNBits(x, b, scales, zero_points, K, N, bits, block_size)`: x f32 `[M, K]`,
    /// b u8 `[N, K/bs, bs*bits/8]`, scales f32 `[N*K/bs]`, zero points f32 or u8 `[N*K/bs]`, or (4 bits)
    /// u8 `[N*ceil(K/bs/2)]` packed two per byte.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_nbits(
        &mut self,
        name: &str,
        x: &Sym,
        b: &Sym,
        scales: &Sym,
        zeros: &Sym,
        bits: usize,
        block: usize,
    ) -> R<Sym> {
        let ops = [x, b, scales, zeros];
        let (n, blocks, blob) = match b.shape[..] {
            [SDim::N(n), SDim::N(kb), SDim::N(bl)] => (n, kb, bl),
            _ => return Err(self.err(name, "MatMulNBits", "b must be [N, K/block, blob]", &ops)),
        };
        let k = blocks * block;
        let ok = x.dtype == DType::F32
            && x.rank() == 2
            && x.shape[1] == SDim::N(k)
            && b.dtype == DType::U8
            && blob * 8 == block * bits
            && scales.dtype == DType::F32
            && scales.shape[..] == [SDim::N(n * blocks)]
            && match zeros.dtype {
                DType::F32 => zeros.shape[..] == [SDim::N(n * blocks)],
                // u8: one per block for 8 bits; packed two per byte, per row, for 4 bits
                DType::U8 if bits == 8 => zeros.shape[..] == [SDim::N(n * blocks)],
                DType::U8 if bits == 4 => zeros.shape[..] == [SDim::N(n * blocks.div_ceil(2))],
                _ => false,
            };
        if !ok {
            return Err(self.err(
                name,
                "MatMulNBits",
                format!("x must be f32 [M, {k}], scales/zero points [{}], blob {blob} bytes for {bits} bits", n * blocks),
                &ops,
            ));
        }
        let attrs = vec![
            ("K", Attr::Int(k as i64)),
            ("N", Attr::Int(n as i64)),
            ("bits", Attr::Int(bits as i64)),
            ("block_size", Attr::Int(block as i64)),
        ];
        Ok(self
            .node(
                name,
                "MatMulNBits",
                onestep_format::contract::MS_DOMAIN,
                &[Some(x), Some(b), Some(scales), Some(zeros)],
                attrs,
                vec![(DType::F32, vec![x.shape[0].clone(), SDim::N(n)], None)],
            )
            .pop()
            .expect("one output"))
    }

    /// `DequantizeLinear(q, scale, axis)`: q int8 `[N, K]`, scale f32 `[N]` along `axis`.
    pub fn dequantize_linear(&mut self, name: &str, q: &Sym, scale: &Sym, axis: i64) -> R<Sym> {
        let ax = norm_axis(axis, q.rank());
        let ok = q.dtype == DType::I8
            && scale.dtype == DType::F32
            && ax.is_some_and(|a| scale.shape[..] == [q.shape[a].clone()]);
        if !ok {
            return Err(self.err(
                name,
                "DequantizeLinear",
                "need int8 data and f32 scales along axis",
                &[q, scale],
            ));
        }
        Ok(self.one(
            name,
            "DequantizeLinear",
            &[Some(q), Some(scale)],
            vec![("axis", Attr::Int(axis))],
            DType::F32,
            q.shape.clone(),
            None,
        ))
    }
}

/// Converts a symbolic shape to graph dims (`T` → `Dim::Sym("T")`, a named size → `Dim::Sym(name)`);
/// `None` if it holds `T + n`.
pub fn to_dims(s: &[SDim]) -> Option<Vec<Dim>> {
    s.iter()
        .map(|d| match d {
            SDim::N(n) => Some(Dim::Known(*n)),
            SDim::T(0) => Some(Dim::Sym(onestep_format::contract::CHUNK_DIM.into())),
            SDim::Dyn(s) => Some(Dim::Sym(s.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_mismatch_names_node_and_shapes() {
        let mut t = Tracer::new("g");
        t.set_scope("l3.attn");
        let x = t
            .input("x", DType::F32, vec![SDim::T(0), SDim::N(64)])
            .unwrap();
        let w = t
            .weight(
                "w",
                DType::F32,
                &[128, 32],
                Bytes::from(vec![0u8; 128 * 32 * 4]),
            )
            .unwrap();
        let e = t.gemm("q_proj", &x, &w, None).unwrap_err().to_string();
        assert!(
            e.contains("l3.attn.q_proj")
                && e.contains("Gemm")
                && e.contains("[T, 64]")
                && e.contains("[128, 32]"),
            "{e}"
        );
    }

    #[test]
    fn reshape_and_mask_shapes_are_inferred() {
        let mut t = Tracer::new("g");
        let ids = t
            .input("input_ids", DType::I64, vec![SDim::N(1), SDim::T(0)])
            .unwrap();
        let flat = t.reshape("ids", &ids, &[SDim::T(0)]).unwrap();
        assert_eq!(flat.shape, vec![SDim::T(0)]);
        let tn = t.shape("tn", &ids, 1, 2).unwrap();
        let tn = t.squeeze("tn_s", &tn, &[0]).unwrap();
        let zero = t.const_i64(&[0], true);
        let one = t.const_i64(&[1], true);
        let r = t.range("r", &zero, &tn, &one).unwrap();
        assert_eq!(r.shape, vec![SDim::T(0)]);
        let s = t.const_i64(&[16], true);
        let rs = t.range("rs", &zero, &s, &one).unwrap();
        assert_eq!(rs.shape, vec![SDim::N(16)]);
        let a = t.unsqueeze("a", &rs, &[0]).unwrap();
        let b = t.unsqueeze("b", &r, &[0]).unwrap();
        let c = t.concat("c", &[&a, &b], 1).unwrap();
        assert_eq!(c.shape, vec![SDim::N(1), SDim::T(16)]);
        // a wrong reshape is refused with both shapes named
        let e = t
            .reshape("bad", &ids, &[SDim::N(2), SDim::T(0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad") && e.contains("[2, T]"), "{e}");
        // names are unique
        let r2 = t.range("r", &zero, &tn, &one).unwrap();
        assert_eq!(r2.name, "r.2");
    }
}
