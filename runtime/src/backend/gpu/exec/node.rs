//! Generic nodes on the GPU: each op the GPU runs has a description function, found by its name in
//! [`NODE_OPS`]; view ops share their input's buffer and need none. A node that no function takes (or
//! whose inputs do not fit) runs on the CPU.

use super::*;
use crate::graph::Node;
use crate::plan::FoldedNorm;

/// A generic node as its description functions see it.
#[derive(Clone, Copy)]
pub(super) struct NodeAt<'a> {
    /// The node.
    n: &'a Node,
    /// Its input values (`None`: an omitted optional input).
    inputs: &'a [Option<ValId>],
    /// Its output values (at least one).
    outputs: &'a [ValId],
    /// The values as the executor sees them.
    e: &'a Env<'a>,
}

/// What a generic op does on the GPU (`None`: it runs on the CPU).
type NodeDescribe = fn(&GpuPlan, &NodeAt<'_>) -> Result<Option<Desc>>;

/// The generic ops the GPU runs, by op name (view ops aside).
const NODE_OPS: &[(&str, NodeDescribe)] = &[
    ("Add", GpuPlan::binary_desc),
    ("Sub", GpuPlan::binary_desc),
    ("Mul", GpuPlan::binary_desc),
    ("Div", GpuPlan::binary_desc),
    ("Sigmoid", GpuPlan::unary_desc),
    ("Neg", GpuPlan::unary_desc),
    ("Tanh", GpuPlan::unary_desc),
    ("Gelu", GpuPlan::unary_desc),
    ("Cast", GpuPlan::cast_desc),
    ("Transpose", GpuPlan::transpose_desc),
    ("Gather", GpuPlan::gather_desc),
    ("RMSNormalization", GpuPlan::rms_norm_desc),
    ("LayerNormalization", GpuPlan::layer_norm_desc),
    ("RotaryEmbedding", GpuPlan::rotary_desc),
    ("TopK", GpuPlan::top_k_desc),
    ("Attention", GpuPlan::plain_attention_desc),
];

impl GpuPlan {
    /// A generic node: a view, or what its op's function in [`NODE_OPS`] describes.
    pub(super) fn node_desc(&self, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::Node {
            node,
            inputs,
            outputs,
        } = s
        else {
            return Ok(None);
        };
        let n = &e.plan.graph.nodes[*node];
        if !(n.domain.is_empty() || n.domain == "ai.onnx") || outputs.is_empty() {
            return Ok(None);
        }
        let a = NodeAt {
            n,
            inputs,
            outputs,
            e,
        };
        if crate::plan::is_view_op(&n.op) {
            return self.view_desc(&a);
        }
        match NODE_OPS.iter().find(|(op, _)| *op == n.op) {
            Some((_, describe)) => describe(self, &a),
            None => Ok(None),
        }
    }

    /// A view op (reshape, squeeze, ...): no dispatch, the output shares its input's buffer.
    fn view_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        let Some(x) = inp(0) else { return Ok(None) };
        let Some(xm) = e.meta[x].clone() else {
            return Ok(None);
        };
        let placeholder = Tensor::shape_only(xm.dtype, &xm.shape);
        let mut args: Vec<Option<&Tensor>> = vec![Some(&placeholder)];
        for i in 1..inputs.len() {
            match inp(i) {
                Some(v) => match e.cpu(v) {
                    Some(t) => args.push(Some(t)),
                    None => return Ok(None),
                },
                None => args.push(None),
            }
        }
        let o = ops::run_node(n, &args)?;
        let m = Meta::of(&o[0]);
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, m, Some(x))],
            reads: vec![x],
            disp: Vec::new(),
        }))
    }

    /// `Add`, `Sub`, `Mul`, `Div` of two f32 inputs, broadcast.
    fn binary_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let f32m = |v: ValId| e.f32m(v);
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        if inputs.len() != 2 {
            return Ok(None);
        }
        let (Some(a), Some(b)) = (inp(0), inp(1)) else {
            return Ok(None);
        };
        let (Some(am), Some(bm)) = (f32m(a), f32m(b)) else {
            return Ok(None);
        };
        let Some(os) = ops::broadcast_shape(&am.shape, &bm.shape) else {
            return Ok(None);
        };
        if os.len() > ew::MAX_RANK {
            return Ok(None);
        }
        let op = BinOp::from_onnx(&n.op).ok_or_else(|| Error::internal("op"))?;
        let p = ew::binary_params(op, &am.shape, &bm.shape, &os)?;
        let nn = os.iter().product();
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                out,
                Meta {
                    dtype: DType::F32,
                    shape: os,
                },
                None,
            )],
            reads: vec![a, b],
            disp: vec![ew_disp(
                "binary",
                vec![BufRef::Val(a), BufRef::Val(b), BufRef::Val(out)],
                p,
                nn,
            )?],
        }))
    }

    /// `Sigmoid`, `Neg`, `Tanh` and `Gelu` (exact or tanh-approximated) of an f32 input.
    fn unary_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let f32m = |v: ValId| e.f32m(v);
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        let Some(a) = inp(0) else { return Ok(None) };
        let Some(am) = f32m(a) else { return Ok(None) };
        let op = match n.op.as_str() {
            "Sigmoid" => UnOp::Sigmoid,
            "Tanh" => UnOp::Tanh,
            "Gelu" => match n.attrs.get("approximate") {
                Some(Attr::Str(s)) if s == "tanh" => UnOp::GeluTanh,
                None => UnOp::GeluErf,
                Some(Attr::Str(s)) if s == "none" => UnOp::GeluErf,
                _ => return Ok(None),
            },
            _ => UnOp::Neg,
        };
        let nn = am.numel();
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, am, None)],
            reads: vec![a],
            disp: vec![ew_disp(
                "unary",
                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                Params::new().u(nn).u(op as usize),
                nn,
            )?],
        }))
    }

    /// `Cast` between f32, f16 and the integer types the kernel converts.
    fn cast_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        let Some(a) = inp(0) else { return Ok(None) };
        let Some(am) = e.meta(a) else { return Ok(None) };
        let to = DType::from_onnx(n.attr_int("to", 0) as i32);
        let nn = am.numel();
        let entry = match (am.dtype, to) {
            (x, Some(y)) if x == y => {
                if e.meta[a].is_none() {
                    return Ok(None);
                }
                return Ok(Some(Desc {
                    at: Vec::new(),
                    outs: vec![(out, am, Some(a))],
                    reads: vec![a],
                    disp: Vec::new(),
                }));
            }
            (DType::F32, Some(DType::F16)) => ("cast_to_f16", nn.div_ceil(2)),
            (DType::F16, Some(DType::F32)) => ("cast_from_f16", nn),
            // Byte elements need a GPU source: a host value casts on the host.
            (DType::U8, Some(DType::F32)) if e.meta[a].is_some() => ("cast_from_u8", nn),
            (DType::I8, Some(DType::F32)) if e.meta[a].is_some() => ("cast_from_i8", nn),
            _ => return Ok(None),
        };
        let to = to.unwrap_or(DType::F32);
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                out,
                Meta {
                    dtype: to,
                    shape: am.shape,
                },
                None,
            )],
            reads: vec![a],
            disp: vec![ew_disp(
                entry.0,
                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                Params::new().u(nn),
                entry.1,
            )?],
        }))
    }

    /// `Transpose` of up to the kernel's rank.
    fn transpose_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        let Some(a) = inp(0) else { return Ok(None) };
        let Some(am) = e.meta(a) else { return Ok(None) };
        let r = am.shape.len();
        let perm: Vec<usize> = match n.attr_ints("perm") {
            Some(p) => p.iter().map(|&x| x as usize).collect(),
            None => (0..r).rev().collect(),
        };
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != (0..r).collect::<Vec<_>>() {
            return Ok(None);
        }
        let oshape: Vec<usize> = perm.iter().map(|&p| am.shape[p]).collect();
        let (entry, shape, perm, items) = match am.dtype.size() {
            4 => ("transpose32", am.shape.clone(), perm, am.numel()),
            2 => (
                "transpose16",
                am.shape.clone(),
                perm,
                am.numel().div_ceil(2),
            ),
            8 => {
                let mut s = am.shape.clone();
                s.push(2);
                let mut p = perm.clone();
                p.push(r);
                ("transpose32", s, p, am.numel() * 2)
            }
            _ => return Ok(None),
        };
        if shape.len() > ew::MAX_RANK {
            return Ok(None);
        }
        let p = ew::transpose_params(&shape, &perm)?;
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                out,
                Meta {
                    dtype: am.dtype,
                    shape: oshape,
                },
                None,
            )],
            reads: vec![a],
            disp: vec![ew_disp(
                entry,
                vec![BufRef::Val(a), BufRef::Dummy, BufRef::Val(out)],
                p,
                items,
            )?],
        }))
    }

    /// `Gather` of rows of a constant table (an embedding) or of a GPU value.
    fn gather_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let plan = e.plan;
        let ew_disp =
            |entry, binds, params, items| self.ew_disp(e.stage, entry, binds, params, items);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        let out = outputs[0];
        let (Some(d), Some(ix)) = (inp(0), inp(1)) else {
            return Ok(None);
        };
        let Some(dm) = e.meta(d) else { return Ok(None) };
        let Some(im) = e.meta(ix) else {
            return Ok(None);
        };
        // The data on the GPU already, or a constant table (an embedding) that is
        // loaded once and fits one binding.
        let table = self.gather_table(plan, d);
        if n.attr_int("axis", 0) != 0
            || dm.shape.is_empty()
            || im.dtype != DType::I64
            || (e.meta[d].is_none() && !table)
        {
            return Ok(None);
        }
        let row_bytes = dm.shape[1..].iter().product::<usize>() * dm.dtype.size();
        let rows = dm.shape[0] as i64;
        // Indices the host holds are checked here; ones on the GPU (a fed-back
        // token) are in range by construction, and the kernel gives zeros if not.
        if e.meta[ix].is_none() {
            let Some(it) = e.cpu(ix) else { return Ok(None) };
            e.stage.check(|| {
                if it.typed::<i64>().iter().any(|&i| i < -rows || i >= rows) {
                    return Err(Error::node(
                        &n.name,
                        &n.op,
                        format!("index out of range for {rows} rows"),
                    ));
                }
                Ok(())
            })?;
        }
        let mut shape = im.shape.clone();
        shape.extend_from_slice(&dm.shape[1..]);
        let nidx = im.numel();
        let (entry, unit) = if row_bytes % 4 == 0 {
            ("gather_rows", 4)
        } else {
            ("gather_bytes", 1)
        };
        let words = row_bytes / unit;
        let threads = (nidx * row_bytes).div_ceil(4);
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                out,
                Meta {
                    dtype: dm.dtype,
                    shape,
                },
                None,
            )],
            reads: vec![d, ix],
            disp: vec![ew_disp(
                entry,
                vec![BufRef::Val(d), BufRef::Val(ix), BufRef::Val(out)],
                Params::new().u(nidx).u(words).u(dm.shape[0]),
                threads,
            )?],
        }))
    }

    /// `RMSNormalization` over the last axis with a constant scale.
    fn rms_norm_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let inp = |i: usize| a.inputs.get(i).copied().flatten();
        let (Some(x), Some(w)) = (inp(0), inp(1)) else {
            return Ok(None);
        };
        self.norm_desc(a.n, (x, w), None, a.outputs[0], a.e)
    }

    /// `RMSNormalization` node `n` over `x` with scale `w` (`[.., H]`, `[H]`), adding `res` (of `x`'s
    /// shape) to its output when given: one workgroup a row.
    pub(super) fn norm_desc(
        &self,
        n: &Node,
        (x, w): (ValId, ValId),
        res: Option<ValId>,
        out: ValId,
        e: &Env,
    ) -> Result<Option<Desc>> {
        let ctx = &self.ctx;
        let (Some(xm), Some(wm)) = (e.f32m(x), e.meta(w)) else {
            return Ok(None);
        };
        if res.is_some_and(|r| !e.meta_is(r, &xm)) {
            return Ok(None);
        }
        let r = xm.shape.len();
        let ax = n.attr_int("axis", -1);
        let h = *xm.shape.last().unwrap_or(&0);
        if r == 0
            || !(ax == -1 || ax == r as i64 - 1)
            || wm.dtype != DType::F32
            || wm.numel() != h
            || n.attr_int("stash_type", 1) != 1
        {
            return Ok(None);
        }
        let rows = xm.numel() / h.max(1);
        let (gx, gy) = grid(rows, 1, ctx.max_groups);
        let mut reads = vec![x, w];
        reads.extend(res);
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, xm, None)],
            reads,
            disp: vec![Disp {
                kernel: e.stage.kernel(&|| norm::kernel(ctx, res.is_some()))?,
                binds: vec![
                    BufRef::Val(x),
                    BufRef::Val(w),
                    res.map_or(BufRef::Dummy, BufRef::Val),
                    BufRef::Val(out),
                ],
                params: norm::params(rows, h, n.attr_float("epsilon", 1e-5), false),
                groups: (gx, gy, 1),
            }],
        }))
    }

    /// `LayerNormalization` over the last axis with an f32 scale and bias of `[H]` (or none), only its
    /// output `Y` read (the `Mean` and `InvStdDev` outputs: the CPU's).
    fn layer_norm_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let (n, e) = (a.n, a.e);
        let inp = |i: usize| a.inputs.get(i).copied().flatten();
        let (Some(x), Some(w), b) = (inp(0), inp(1), inp(2)) else {
            return Ok(None);
        };
        let Some(xm) = e.f32m(x) else { return Ok(None) };
        let r = xm.shape.len();
        let h = *xm.shape.last().unwrap_or(&0);
        let ax = n.attr_int("axis", -1);
        let vec_h = |v: ValId| {
            e.meta(v)
                .is_some_and(|m| m.dtype == DType::F32 && m.numel() == h)
        };
        if r == 0
            || !(ax == -1 || ax == r as i64 - 1)
            || n.attr_int("stash_type", 1) != 1
            || a.outputs.len() != 1
            || !vec_h(w)
            || b.is_some_and(|b| !vec_h(b))
        {
            return Ok(None);
        }
        let out = a.outputs[0];
        let rows = xm.numel() / h.max(1);
        let (gx, gy) = grid(rows, 1, self.ctx.max_groups);
        let mut reads = vec![x, w];
        reads.extend(b);
        let ctx = &self.ctx;
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, xm, None)],
            reads,
            disp: vec![Disp {
                kernel: e.stage.kernel(&|| norm::layer_kernel(ctx))?,
                binds: vec![
                    BufRef::Val(x),
                    BufRef::Val(w),
                    b.map_or(BufRef::Dummy, BufRef::Val),
                    BufRef::Val(out),
                ],
                params: norm::params(rows, h, n.attr_float("epsilon", 1e-5), b.is_some()),
                groups: (gx, gy, 1),
            }],
        }))
    }

    /// `RotaryEmbedding` with constant cos/sin tables.
    fn rotary_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let (Some(x), Some(rest)) = (a.inputs.first().copied().flatten(), a.inputs.get(1..)) else {
            return Ok(None);
        };
        self.rope_desc(a.n, x, (false, None), rest, a.outputs[0], a.e)
    }

    /// The rotary of node `n` over `x` (`[1, H, T, D]`, or `[1, T, H, D]` read as that when
    /// `transposed`: the plan's [`Rope`](crate::plan::Rope), each head normalized first by its `norm`);
    /// `rest`: cos, sin, positions.
    pub(super) fn rope_desc(
        &self,
        n: &Node,
        x: ValId,
        (transposed, norm): (bool, Option<&FoldedNorm>),
        rest: &[Option<ValId>],
        out: ValId,
        e: &Env,
    ) -> Result<Option<Desc>> {
        let ctx = &self.ctx;
        let plan = e.plan;
        let (Some(&Some(c)), Some(&Some(sn)), Some(&Some(pv))) =
            (rest.first(), rest.get(1), rest.get(2))
        else {
            return Ok(None);
        };
        let Some(mut xm) = e.f32m(x) else {
            return Ok(None);
        };
        if transposed && xm.shape.len() == 4 {
            xm.shape = vec![xm.shape[0], xm.shape[2], xm.shape[1], xm.shape[3]];
        }
        let (Some(ct), Some(st)) = (plan.consts[c].as_ref(), plan.consts[sn].as_ref()) else {
            return Ok(None);
        };
        let Some(pt) = e.cpu(pv) else { return Ok(None) };
        if xm.shape.len() != 4
            || xm.shape[0] != 1
            || ct.dtype != DType::F32
            || st.dtype != DType::F32
            || ct.rank() != 2
            || st.shape != ct.shape
            || pt.dtype != DType::I64
        {
            return Ok(None);
        }
        let (h, t, d) = (xm.shape[1], xm.shape[2], xm.shape[3]);
        let rot = match n.attr_int("rotary_embedding_dim", 0) {
            0 => d,
            r if r > 0 => r as usize,
            _ => return Ok(None),
        };
        if rot % 2 != 0 || rot > d || ct.shape[1] != rot / 2 || pt.numel() != t {
            return Ok(None);
        }
        // The head norm's scale: f32 `[D]` (the planner checked f32 and rank 1).
        if let Some(nm) = norm {
            if plan.consts[nm.scale].as_ref().map(|s| s.numel()) != Some(d) {
                return Ok(None);
            }
        }
        e.stage.check(|| check_positions(n, pt, ct.shape[0]))?;
        let nn = h * t * d;
        let (gx, gy) = grid(nn, 256, ctx.max_groups);
        let mut reads = vec![x, c, sn, pv];
        reads.extend(norm.map(|nm| nm.scale));
        let input = rope::RopeIn {
            tokens_first: transposed,
            norm_eps: norm.map(|nm| nm.epsilon),
        };
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, xm, None)],
            reads,
            disp: vec![Disp {
                kernel: e.stage.kernel(&|| rope::kernel(ctx, norm.is_some()))?,
                binds: vec![
                    BufRef::Val(x),
                    BufRef::Val(c),
                    BufRef::Val(sn),
                    BufRef::Val(pv),
                    norm.map_or(BufRef::Dummy, |nm| BufRef::Val(nm.scale)),
                    BufRef::Val(out),
                ],
                params: rope::params(h, t, d, rot, n.attr_int("interleaved", 0) != 0, input),
                groups: (gx, gy, 1),
            }],
        }))
    }

    /// A plain `Attention` (`attention_plain.rs`): f32 Q `[1, H, T, D]`, K `[1, KVH, S, D]`, V
    /// `[1, KVH, S, Dv]`, no mask or past inputs, only the output `Y`, a float `scale`, a soft cap,
    /// `is_causal`, `qk_matmul_output_mode` 0. Anything else runs on the CPU.
    fn plain_attention_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        use super::super::attention_plain as ap;
        let (n, e) = (a.n, a.e);
        if a.inputs.len() > 3 && a.inputs[3..].iter().any(|i| i.is_some()) {
            return Ok(None);
        }
        let (Some(&Some(q)), Some(&Some(k)), Some(&Some(v))) =
            (a.inputs.first(), a.inputs.get(1), a.inputs.get(2))
        else {
            return Ok(None);
        };
        let (Some(qm), Some(km), Some(vm)) = (e.f32m(q), e.f32m(k), e.f32m(v)) else {
            return Ok(None);
        };
        let dims = |m: &Meta| <[usize; 4]>::try_from(&m.shape[..]).ok();
        let (Some([1, h, t, d]), Some([1, kvh, s, dk]), Some([1, kvh2, s2, dv])) =
            (dims(&qm), dims(&km), dims(&vm))
        else {
            return Ok(None);
        };
        let shape = ap::Shape {
            h,
            kvh,
            t,
            s,
            d,
            dv,
        };
        let softcap = n.attr_float("softcap", 0.0);
        let causal = n.attr_int("is_causal", 0);
        if dk != d
            || (kvh2, s2) != (kvh, s)
            || !shape.fits()
            || a.outputs.len() != 1
            || !(softcap >= 0.0 && softcap.is_finite())
            || !(causal == 0 || causal == 1)
            || n.attr_int("qk_matmul_output_mode", 0) != 0
            || n.attrs
                .get("scale")
                .is_some_and(|s| !matches!(s, Attr::Float(_)))
        {
            return Ok(None);
        }
        let scale = n.attr_float("scale", 1.0 / (d as f32).sqrt());
        let out = a.outputs[0];
        let (gx, gy) = grid(shape.items(), 1, self.ctx.max_groups);
        let ctx = &self.ctx;
        let om = Meta {
            dtype: DType::F32,
            shape: vec![1, h, t, dv],
        };
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(out, om, None)],
            reads: vec![q, k, v],
            disp: vec![Disp {
                kernel: e.stage.kernel(&|| ap::kernel(ctx))?,
                binds: vec![
                    BufRef::Val(q),
                    BufRef::Val(k),
                    BufRef::Val(v),
                    BufRef::Val(out),
                ],
                params: ap::params(&shape, scale, softcap, causal == 1),
                groups: (gx, gy, 1),
            }],
        }))
    }

    /// `TopK` over the last axis: the one- and two-candidate kernels, or the sort for a larger k.
    fn top_k_desc(&self, a: &NodeAt) -> Result<Option<Desc>> {
        let NodeAt {
            n,
            inputs,
            outputs,
            e,
            ..
        } = *a;
        let ctx = &self.ctx;
        let k = |f: &dyn Fn() -> Result<Arc<Kernel>>| e.stage.kernel(f);
        let f32m = |v: ValId| e.f32m(v);
        let inp = |i: usize| inputs.get(i).copied().flatten();
        if outputs.len() != 2 {
            return Ok(None);
        }
        let (Some(x), Some(kv)) = (inp(0), inp(1)) else {
            return Ok(None);
        };
        let Some(xm) = f32m(x) else { return Ok(None) };
        let Some(kt) = e.cpu(kv) else { return Ok(None) };
        let r = xm.shape.len();
        let ax = n.attr_int("axis", -1);
        if r == 0
            || !(ax == -1 || ax == r as i64 - 1)
            || n.attr_int("largest", 1) != 1
            || n.attr_int("sorted", 1) != 1
        {
            return Ok(None);
        }
        let v = xm.shape[r - 1];
        let rows = xm.numel() / v.max(1);
        // Rows longer than MAX_K have the sort's slots (their number is fixed by the
        // row length); it runs when there is one row (the token choice's) and the
        // indices' buffer holds all of it (planned so at load).
        let sorts = v > select::MAX_K;
        let sortable = sorts
            && rows == 1
            && (self.home[outputs[1]])
                .is_some_and(|h| self.offs[outputs[1]] + (v * 8) as u64 <= self.caps[h]);
        let kk = match kt.to_i64_vec(&n.name)?[..] {
            [k] if k >= 1 && (k as usize <= select::MAX_K || sortable || e.stage.placing()) => {
                k as usize
            }
            _ => return Ok(None),
        };
        if v < kk || rows > ctx.max_groups as usize {
            return Ok(None);
        }
        let mut os = xm.shape.clone();
        os[r - 1] = kk;
        // Two slots, the arg-max (k = 1) and the k rounds; a step records the one its k
        // takes (the buffers are sized for MAX_K at load).
        let binds = vec![
            BufRef::Val(x),
            BufRef::Val(outputs[0]),
            BufRef::Val(outputs[1]),
        ];
        let slot = |kernel, on: bool| Disp {
            kernel,
            binds: binds.clone(),
            params: select::params(rows, v, kk),
            groups: (if on { rows as u32 } else { 0 }, 1, 1),
        };
        let mut disp = vec![
            slot(k(&|| select::kernel(ctx, 1))?, kk == 1),
            slot(
                k(&|| select::kernel(ctx, 2))?,
                1 < kk && kk <= select::MAX_K,
            ),
        ];
        // The sort's slots follow whatever k this step has (their number is v's).
        if sorts {
            let on = kk > select::MAX_K;
            for d in select::sort_schedule(v, kk) {
                let groups = if d.entry == "sort_local" {
                    (d.items as u32, 1)
                } else {
                    grid(d.items, 256, ctx.max_groups)
                };
                disp.push(Disp {
                    kernel: k(&|| select::entry_kernel(ctx, d.entry))?,
                    binds: binds.clone(),
                    params: d.params,
                    groups: (if on { groups.0 } else { 0 }, groups.1, 1),
                });
            }
        }
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![
                (
                    outputs[0],
                    Meta {
                        dtype: DType::F32,
                        shape: os.clone(),
                    },
                    None,
                ),
                (
                    outputs[1],
                    Meta {
                        dtype: DType::I64,
                        shape: os,
                    },
                    None,
                ),
            ],
            reads: vec![x],
            disp,
        }))
    }
}
