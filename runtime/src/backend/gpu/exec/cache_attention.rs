//! The cache attention on the GPU: its inputs checked (the projections themselves where the plan's
//! attention took the rotary, transposes and casts before it in, see [`AttnInputs`]), then one of three forms of dispatches
//! — the whole attention, split over key chunks for one token over many keys, or a partial softmax a
//! segment of a cache larger than one buffer — each followed by a combine where it splits.

use super::*;
use crate::graph::Node;
use crate::plan::AttnInputs;

/// What every form of one attention's dispatches binds, and its parameters.
struct AttnBinds {
    q: ValId,
    /// New keys and values.
    new: [ValId; 2],
    mask: ValId,
    /// The plan caches of keys and values.
    past: [usize; 2],
    out: ValId,
    /// The rotary's cos, sin and positions when the kernel applies it (and the q/k norms' scales).
    extra: Vec<BufRef>,
    inputs: attention::Inputs,
    /// An f16 cache.
    f16: bool,
    ap: AttnParams,
}

impl AttnBinds {
    /// The bindings of a dispatch over cache segment `seg` writing `o`.
    fn binds(&self, seg: usize, o: BufRef) -> Vec<BufRef> {
        [
            BufRef::Val(self.q),
            BufRef::Val(self.new[0]),
            BufRef::Val(self.new[1]),
            BufRef::Val(self.mask),
            BufRef::CacheK(self.past[0], seg),
            BufRef::CacheV(self.past[1], seg),
            o,
        ]
        .into_iter()
        .chain(self.extra.iter().copied())
        .collect()
    }
}

impl GpuPlan {
    /// The cache attention: one dispatch, the split-keys pair plus its combine, or a partial softmax per
    /// cache segment plus the combine; reading the projections where the plan's attention took their
    /// rotary, transposes and casts in ([`AttnInputs`]).
    pub(super) fn attention_desc(&self, s: &Step, e: &Env) -> Result<Option<Desc>> {
        let Step::CacheAttention {
            node,
            q,
            past,
            new,
            mask,
            out,
            tokens_first,
            inputs,
        } = s
        else {
            return Ok(None);
        };
        let plan = e.plan;
        let f32m = |v: ValId| e.f32m(v);
        let n = &plan.graph.nodes[*node];
        // The kernel reads the projections themselves when the plan's attention took the rotary,
        // transposes and casts before it in.
        let fin = inputs.as_deref();
        let (q, new, inputs) = match fin {
            Some(a) => (
                &a.q,
                &[a.k, a.v],
                attention::Inputs::Rope {
                    interleaved: a.interleaved,
                    qk_norm: a.norms.is_some(),
                },
            ),
            None => (q, new, attention::Inputs::Graph),
        };
        if fin.is_some() {
            self.binds_projections(&plan.graph.nodes[*node], inputs)?;
        }
        let (Some(qm), Some(km), Some(vm)) = (f32m(*q), f32m(new[0]), f32m(new[1])) else {
            return Ok(None);
        };
        let (ck, cv) = (&plan.caches[past[0]], &plan.caches[past[1]]);
        if qm.shape.len() != 4 || ck.dtype != cv.dtype || ck.shape != cv.shape {
            return Ok(None);
        }
        let (h, t, d) = match fin {
            Some(_) => (qm.shape[2], qm.shape[1], qm.shape[3]),
            None => (qm.shape[1], qm.shape[2], qm.shape[3]),
        };
        let (kvh, slots) = (ck.shape[1], ck.shape[2]);
        let rows_shape = match fin {
            Some(_) => [1, t, kvh, d],
            None => [1, kvh, t, d],
        };
        if kvh == 0
            || h % kvh != 0
            || d % 2 != 0
            || d > attention::MAX_HEAD_DIM
            || km.shape != rows_shape
            || vm.shape != rows_shape
            || ck.shape[3] != d
            || !matches!(ck.dtype, DType::F16 | DType::F32)
            || (fin.is_none() && !self.writes_rows(plan, past, new))
        {
            if fin.is_some() {
                return Err(Error::device(
                    DeviceFault::Unsupported,
                    format!(
                        "attention `{}` with its rotary absorbed: inputs {:?} {:?} {:?} do not fit",
                        n.name, qm.shape, km.shape, vm.shape
                    ),
                ));
            }
            return Ok(None);
        }
        let extra = match fin {
            Some(a) => self.rotary_binds(n, a, e, t, d)?,
            None => Vec::new(),
        };
        let Some(mv) = mask else { return Ok(None) };
        let Some(mut ap) = attn_params(n, e, *mv, [h, kvh, t, d, slots]) else {
            return Ok(None);
        };
        ap.tokens_first = *tokens_first;
        if let Some([qn, kn]) = fin.and_then(|a| a.norms) {
            ap.qk_norm_eps = [qn.epsilon, kn.epsilon];
        }
        // Keys never exceed the slots (position + chunk ≤ S): one kernel serves every step.
        let rows = self.rows_variant && attention::rows_ok(d, slots);
        let oshape = if *tokens_first {
            vec![1, t, h, d]
        } else {
            vec![1, h, t, d]
        };
        let (seg_rows, nseg) = self.segs(kvh * d * ck.dtype.size(), slots, d)?;
        let at = AttnBinds {
            q: *q,
            new: *new,
            mask: *mv,
            past: *past,
            out: *out,
            extra,
            inputs,
            f16: ck.dtype == DType::F16,
            ap,
        };
        let disp = if nseg == 1 && (rows || self.split_keys == 0) {
            self.attention_whole(&at, rows, e.stage)?
        } else if nseg == 1 {
            self.attention_split(&at, e.stage)?
        } else if d % 4 != 0 || d > attention::MAX_HEAD_DIM {
            return Ok(None);
        } else {
            self.attention_segments(&at, seg_rows, nseg, e.stage)?
        };
        Ok(Some(Desc {
            at: Vec::new(),
            outs: vec![(
                *out,
                Meta {
                    dtype: DType::F32,
                    shape: oshape,
                },
                None,
            )],
            reads: [*q, new[0], new[1], *mv]
                .into_iter()
                .chain(fin.map(|a| [a.cos, a.sin, a.pos]).into_iter().flatten())
                .chain(
                    fin.and_then(|a| a.norms)
                        .into_iter()
                        .flatten()
                        .map(|n| n.scale),
                )
                .collect(),
            disp,
        }))
    }
}

/// The kernel's parameters for attention node `n` of `[heads, kv_heads, tokens, head_dim, slots]` under
/// mask `mv`, or `None` unless the mask is f32 `[1.., t, slots + t]`. Only the cache prefix the
/// (CPU-computed) mask allows is visited, from the first key a window lets row 0 see (the mask still
/// decides per row); all slots otherwise.
fn attn_params(n: &Node, e: &Env, mv: ValId, dims: [usize; 5]) -> Option<AttnParams> {
    let [h, kvh, t, d, slots] = dims;
    let mm = e.f32m(mv)?;
    let r = mm.shape.len();
    if r < 2
        || mm.shape[r - 1] != slots + t
        || mm.shape[r - 2] != t
        || mm.shape[..r - 2].iter().any(|&x| x != 1)
    {
        return None;
    }
    let att = e.mask_prefix(mv, t, slots);
    Some(AttnParams {
        heads: h,
        kv_heads: kvh,
        tokens: t,
        head_dim: d,
        slots,
        npast: att.map_or(slots, |a| a.prefix),
        key_start: att
            .and_then(|a| a.window.map(|w| (a.prefix + 1).saturating_sub(w)))
            .unwrap_or(0),
        position: e.stage.position(),
        scale: n.attr_float("scale", 1.0 / (d as f32).sqrt()),
        softcap: n.attr_float("softcap", 0.0).max(0.0),
        tokens_first: false,
        write_cache: true,
        mask_stride: Some(slots + t),
        segment: None,
        split: None,
        qk_norm_eps: [0.0; 2],
    })
}

impl GpuPlan {
    /// Whether a shader stage has the storage buffers an attention reading its projections binds (10,
    /// 12 with the q/k norms; 7 otherwise): the planner takes the inputs in only where the probed adapter
    /// has them (`backend::plan_options`), so this refuses only a plan made for another adapter.
    fn binds_projections(&self, n: &Node, inputs: attention::Inputs) -> Result<()> {
        let need = inputs.bindings();
        let have = self
            .ctx
            .device
            .limits()
            .max_storage_buffers_per_shader_stage;
        if have >= need {
            return Ok(());
        }
        Err(Error::device(
            DeviceFault::Unsupported,
            format!(
                "attention `{}` reads its projections: {need} storage buffers a shader stage, the \
                 device has {have} (turn it off: gpu_no_fuse=attn)",
                n.name
            ),
        ))
    }

    /// The rotary's cos, sin and positions for an attention that applies it itself ([`AttnInputs`]), checked
    /// against its head size `d` and `t` tokens (at run time the positions against the tables' rows).
    fn rotary_binds(
        &self,
        n: &Node,
        a: &AttnInputs,
        e: &Env,
        t: usize,
        d: usize,
    ) -> Result<Vec<BufRef>> {
        let (Some(ct), Some(pt)) = (e.plan.consts[a.cos].as_ref(), e.cpu(a.pos)) else {
            return Err(Error::device(
                DeviceFault::Unsupported,
                format!("attention `{}`: rotary positions or tables missing", n.name),
            ));
        };
        if ct.rank() != 2 || ct.shape[1] != d / 2 || pt.dtype != DType::I64 || pt.numel() != t {
            return Err(Error::device(
                DeviceFault::Unsupported,
                format!(
                    "attention `{}`: rotary tables {:?} or positions {:?} do not fit",
                    n.name, ct.shape, pt.shape
                ),
            ));
        }
        e.stage.check(|| check_positions(n, pt, ct.shape[0]))?;
        let mut binds = vec![BufRef::Val(a.cos), BufRef::Val(a.sin), BufRef::Val(a.pos)];
        for nm in a.norms.iter().flatten() {
            if e.plan.consts[nm.scale].as_ref().map(|s| s.numel()) != Some(d) {
                return Err(Error::device(
                    DeviceFault::Unsupported,
                    format!("attention `{}`: a q/k norm's scale is not [{d}]", n.name),
                ));
            }
            binds.push(BufRef::Val(nm.scale));
        }
        Ok(binds)
    }

    /// The whole attention in one dispatch (`rows`: one (head, token) an invocation, on CPU adapters).
    fn attention_whole(&self, at: &AttnBinds, rows: bool, stage: Stage) -> Result<Vec<Disp>> {
        let (ctx, ap) = (&self.ctx, &at.ap);
        Ok(vec![Disp {
            kernel: stage.kernel(&|| attention::kernel(ctx, at.f16, rows, at.inputs))?,
            binds: at.binds(0, BufRef::Val(at.out)),
            params: ap.params(),
            groups: attention::groups(ctx, ap.heads * ap.tokens, rows),
        }])
    }

    /// One token over many keys: chunks of keys a workgroup each, then the combine. Three slots: a step
    /// records the whole attention or the split pair, by its number of keys.
    fn attention_split(&self, at: &AttnBinds, stage: Stage) -> Result<Vec<Disp>> {
        let (ctx, ap) = (&self.ctx, at.ap);
        let (h, t, d) = (ap.heads, ap.tokens, ap.head_dim);
        let ch = self.split_chunk;
        let nkeys = ap.npast + t - ap.key_start;
        let chunks = nkeys.div_ceil(ch);
        let split = t == 1 && nkeys >= self.split_keys && chunks >= 2;
        self.part_need.fetch_max(
            ((ap.slots + 1).div_ceil(ch) * h * (d + 2) * 4) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let sp = AttnParams {
            split: Some((ch, chunks)),
            ..ap
        };
        let (gx, gy, _) = attention::groups(ctx, h * t, false);
        let on = |yes: bool, g: (u32, u32, u32)| if yes { g } else { (0, 0, 0) };
        let whole = || attention::kernel(ctx, at.f16, false, at.inputs);
        Ok(vec![
            Disp {
                kernel: stage.kernel(&whole)?,
                binds: at.binds(0, BufRef::Val(at.out)),
                params: ap.params(),
                groups: on(!split, (gx, gy, 1)),
            },
            Disp {
                kernel: stage.kernel(&whole)?,
                binds: at.binds(0, BufRef::Part),
                params: sp.params(),
                groups: on(split, (gx, gy, chunks as u32)),
            },
            Disp {
                kernel: stage.kernel(&|| attention::combine_kernel(ctx))?,
                binds: vec![BufRef::Part, BufRef::Val(at.out)],
                params: sp.params(),
                groups: on(split, attention::groups(ctx, h * t, true)),
            },
        ])
    }

    /// A cache split over `nseg` buffers of `seg_rows` rows: a partial softmax a segment, then one
    /// combine.
    fn attention_segments(
        &self,
        at: &AttnBinds,
        seg_rows: usize,
        nseg: usize,
        stage: Stage,
    ) -> Result<Vec<Disp>> {
        let (ctx, ap) = (&self.ctx, at.ap);
        let (h, t, d, slots) = (ap.heads, ap.tokens, ap.head_dim, ap.slots);
        self.part_need.fetch_max(
            (nseg * h * t * (d + 2) * 4) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut v = Vec::new();
        for sg in 0..nseg {
            let seg = attention::Segment {
                r0: sg * seg_rows,
                r1: ((sg + 1) * seg_rows).min(slots),
                with_new: sg + 1 == nseg,
                index: sg,
                count: nseg,
            };
            v.push(Disp {
                kernel: stage.kernel(&|| attention::part_kernel(ctx, at.f16, at.inputs))?,
                binds: at.binds(sg, BufRef::Part),
                params: AttnParams {
                    segment: Some(seg),
                    ..ap
                }
                .params(),
                groups: attention::groups(ctx, h * t, true),
            });
        }
        v.push(Disp {
            kernel: stage.kernel(&|| attention::combine_kernel(ctx))?,
            binds: vec![BufRef::Part, BufRef::Val(at.out)],
            params: AttnParams {
                segment: Some(attention::Segment {
                    r0: 0,
                    r1: slots,
                    with_new: true,
                    index: 0,
                    count: nseg,
                }),
                ..ap
            }
            .params(),
            groups: attention::groups(ctx, h * t, true),
        });
        Ok(v)
    }
}
