//! The GPU's fusion patterns, found once from the plan's structure: `Transpose → RotaryEmbedding`, the
//! `Cast` f16 round trip of the new cache rows, linear layers of one input run as one dispatch
//! ([`LinGroup`]) and the attention reading the projections itself ([`AttnIn`]). (The residual epilogue
//! is the planner's: `plan/residual.rs`, run by both backends.)

use super::*;

/// Patterns of standard ops the GPU runs as fewer dispatches (found once from the plan's structure).
#[derive(Debug, Default)]
pub(super) struct Fusions {
    /// `Transpose(perm 0,2,1,3)` step → (its only consumer, a `RotaryEmbedding` step; the input).
    pub(super) tr: HashMap<usize, (usize, ValId)>,
    /// `Cast(f32→f16)` of a cache output → (its only consumer, a `Cast(f16→f32)` step; the input).
    pub(super) round: HashMap<usize, (usize, ValId)>,
    /// Linear layers of one input, with the RMS norm producing it and the SiLU gate joining them.
    pub(super) groups: Vec<LinGroup>,
    /// Attention step → the projections it can read itself (rotary, transposes and casts absorbed).
    pub(super) attn: HashMap<usize, AttnIn>,
}

/// The inputs of an attention whose rotary embeddings, transposes and f16 round trips (the graph's
/// `Transpose → RotaryEmbedding` for q and k, `Transpose` for v, `Cast(f16) → Cast(f32)` of the new
/// rows) the attention kernel does itself, reading the projections token-major.
#[derive(Debug, Clone)]
pub(super) struct AttnIn {
    /// Queries `[1, T, H, D]` (the projection, reshaped).
    pub(super) q: ValId,
    /// New keys `[1, T, KVH, D]`, before the rotary.
    pub(super) k: ValId,
    /// New values `[1, T, KVH, D]`.
    pub(super) v: ValId,
    /// The rotary's cos table.
    pub(super) cos: ValId,
    /// The rotary's sin table.
    pub(super) sin: ValId,
    /// The rotary's position ids.
    pub(super) pos: ValId,
    /// Interleaved rotary pairs.
    pub(super) interleaved: bool,
    /// The steps the kernel does.
    pub(super) absorbs: Vec<usize>,
}

/// Linear layers that read one input, run as one dispatch over their concatenated rows (q/k/v; gate/up),
/// with the `RMSNormalization` before them and the `SiluGate` after them folded in where only they use
/// those values. A lone linear after a norm (the output layer) is a group of one.
#[derive(Debug, Clone)]
pub(super) struct LinGroup {
    /// The linear steps, in the order their rows are concatenated.
    pub(super) members: Vec<usize>,
    /// `(step, its input, its scale, epsilon)` of the `RMSNormalization` that only the members read.
    pub(super) norm: Option<(usize, ValId, ValId, f32)>,
    /// The `SiluGate` step reading exactly the two members' outputs (the gate is the first member).
    pub(super) silu: Option<usize>,
}

impl Fusions {
    pub(super) fn find(plan: &Plan, on: &GpuFusions) -> Fusions {
        let nvals = plan.names.len();
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nvals];
        for (si, s) in plan.steps.iter().enumerate() {
            for v in crate::plan::step_reads(s) {
                if !consumers[v].contains(&si) {
                    consumers[v].push(si);
                }
            }
        }
        let outs: HashSet<ValId> = plan.outputs.values().copied().collect();
        let cache_out: HashSet<ValId> = plan.caches.iter().map(|c| c.output_val).collect();
        let node = |si: usize| generic_node(plan, si);
        let mut f = Fusions::default();
        for (si, s) in plan.steps.iter().enumerate() {
            let Step::Node {
                node: ni,
                inputs,
                outputs,
            } = s
            else {
                continue;
            };
            let n = &plan.graph.nodes[*ni];
            let (Some(&o), Some(Some(x))) = (outputs.first(), inputs.first()) else {
                continue;
            };
            if outs.contains(&o) && !cache_out.contains(&o) {
                continue;
            }
            let [ci] = consumers[o].as_slice() else {
                continue;
            };
            let Some((cn, cins, _)) = node(*ci) else {
                continue;
            };
            if n.op == "Transpose"
                && n.attr_ints("perm") == Some(&[0, 2, 1, 3][..])
                && !outs.contains(&o)
                && cn.op == "RotaryEmbedding"
                && cins.first().copied().flatten() == Some(o)
                && on.transpose_rope
            {
                f.tr.insert(si, (*ci, *x));
            }
            if n.op == "Cast"
                && n.attr_int("to", 0) == DType::F16.onnx_code() as i64
                && cache_out.contains(&o)
                && cn.op == "Cast"
                && cn.attr_int("to", 0) == DType::F32.onnx_code() as i64
                && on.f16_round_trip
            {
                f.round.insert(si, (*ci, *x));
            }
        }
        if on.attention_inputs {
            f.attn = AttnIn::find(plan, &consumers, &outs, &f);
        }
        if on.linear_groups {
            f.groups = LinGroup::find(plan, &consumers, &outs);
        }
        f
    }
}

impl AttnIn {
    pub(super) fn find(
        plan: &Plan,
        consumers: &[Vec<usize>],
        outs: &HashSet<ValId>,
        f: &Fusions,
    ) -> HashMap<usize, AttnIn> {
        let mut producer: HashMap<ValId, usize> = HashMap::new();
        for (si, s) in plan.steps.iter().enumerate() {
            if let Step::Node { outputs, .. } = s {
                for &o in outputs {
                    producer.insert(o, si);
                }
            }
        }
        let node = |si: usize| generic_node(plan, si);
        let only = |v: ValId, si: usize| consumers[v].as_slice() == [si];
        // `v` = Cast(f32) of Cast(f16) of x (the round pair), read only by `user`: (x, the two casts).
        let unround = |v: ValId, user: usize| -> Option<(ValId, Vec<usize>)> {
            let c2 = *producer.get(&v)?;
            let (c1, &(_, x)) = f.round.iter().find(|(_, (second, _))| *second == c2)?;
            (only(v, user) && !outs.contains(&v)).then(|| (x, vec![*c1, c2]))
        };
        // `v` = RotaryEmbedding(Transpose(src)) read only by `user`: (src, [cos, sin, positions],
        // interleaved, the two steps).
        type Roped = (ValId, [ValId; 3], bool, Vec<usize>);
        let unrope = |v: ValId, user: usize| -> Option<Roped> {
            let r = *producer.get(&v)?;
            let (n, ins, _) = node(r)?;
            if n.op != "RotaryEmbedding"
                || n.attr_int("rotary_embedding_dim", 0) != 0
                || !only(v, user)
            {
                return None;
            }
            let (Some(Some(x)), Some(Some(c)), Some(Some(sn)), Some(Some(p))) =
                (ins.first(), ins.get(1), ins.get(2), ins.get(3))
            else {
                return None;
            };
            let tr = *producer.get(x)?;
            let &(rs, src) = f.tr.get(&tr)?;
            (rs == r && plan.consts[*c].is_some() && plan.consts[*sn].is_some()).then(|| {
                (
                    src,
                    [*c, *sn, *p],
                    n.attr_int("interleaved", 0) != 0,
                    vec![tr, r],
                )
            })
        };
        // `v` = Identity(x) read only by `*user`: (x, [the Identity step]); `*user` becomes it.
        let through_identity = |v: ValId, user: &mut usize| -> (ValId, Vec<usize>) {
            let Some(&si) = producer.get(&v) else {
                return (v, Vec::new());
            };
            match node(si) {
                Some((n, ins, _)) if n.op == "Identity" && only(v, *user) => {
                    match ins.first().copied().flatten() {
                        Some(x) => {
                            *user = si;
                            (x, vec![si])
                        }
                        None => (v, Vec::new()),
                    }
                }
                _ => (v, Vec::new()),
            }
        };
        let mut found = HashMap::new();
        for (ai, s) in plan.steps.iter().enumerate() {
            let Step::CacheAttention { q, new, past, .. } = s else {
                continue;
            };
            let f16 = plan.caches[past[0]].dtype == DType::F16;
            let Some((q_src, rq, inter, mut absorbs)) = unrope(*q, ai) else {
                continue;
            };
            if outs.contains(q) {
                continue;
            }
            // The new rows: through the round pair for an f16 cache; the cache output itself for f32.
            let plain = |v: ValId| Some((v, Vec::new()));
            let (Some((k1, kc)), Some((v1, vc))) = (
                if f16 {
                    unround(new[0], ai)
                } else {
                    plain(new[0])
                },
                if f16 {
                    unround(new[1], ai)
                } else {
                    plain(new[1])
                },
            ) else {
                continue;
            };
            let mut k_user = kc.first().copied().unwrap_or(ai);
            let mut v_user = vc.first().copied().unwrap_or(ai);
            // An f32 cache's new rows may be named through an `Identity` (the graph output).
            let (k1, ki) = through_identity(k1, &mut k_user);
            let (v1, vi) = through_identity(v1, &mut v_user);
            absorbs.extend(ki);
            absorbs.extend(vi);
            let Some((k_src, rk, kinter, ka)) = unrope(k1, k_user) else {
                continue;
            };
            // v: Transpose(perm 0,2,1,3) of the projection.
            let Some(tv) = producer.get(&v1).copied() else {
                continue;
            };
            let Some((tn, tins, _)) = node(tv) else {
                continue;
            };
            let Some(Some(v_src)) = tins.first().copied() else {
                continue;
            };
            if rk != rq
                || kinter != inter
                || tn.op != "Transpose"
                || tn.attr_ints("perm") != Some(&[0, 2, 1, 3][..])
                || !only(v1, v_user)
            {
                continue;
            }
            absorbs.extend(ka);
            absorbs.extend(kc);
            absorbs.extend(vc);
            absorbs.push(tv);
            found.insert(
                ai,
                AttnIn {
                    q: q_src,
                    k: k_src,
                    v: v_src,
                    cos: rq[0],
                    sin: rq[1],
                    pos: rq[2],
                    interleaved: inter,
                    absorbs,
                },
            );
        }
        found
    }
}

impl LinGroup {
    pub(super) fn find(
        plan: &Plan,
        consumers: &[Vec<usize>],
        outs: &HashSet<ValId>,
    ) -> Vec<LinGroup> {
        let mut producer: HashMap<ValId, usize> = HashMap::new();
        let mut by_x: std::collections::BTreeMap<ValId, Vec<usize>> = Default::default();
        for (si, s) in plan.steps.iter().enumerate() {
            match s {
                Step::Node { outputs, .. } => {
                    for &o in outputs {
                        producer.insert(o, si);
                    }
                }
                // A layer with a residual in its epilogue runs alone.
                Step::Linear {
                    x, residual: None, ..
                } => by_x.entry(*x).or_default().push(si),
                _ => {}
            }
        }
        let out_of = |si: usize| match &plan.steps[si] {
            Step::Linear { out, .. } => *out,
            _ => usize::MAX,
        };
        let mut groups = Vec::new();
        for (x, mut members) in by_x {
            if members.len() > linear::MAX_PARTS {
                continue;
            }
            let only_members = {
                let mut c = consumers[x].clone();
                c.sort_unstable();
                c == members && !outs.contains(&x)
            };
            let norm = producer.get(&x).and_then(|&ni| {
                let Step::Node { node, inputs, .. } = &plan.steps[ni] else {
                    return None;
                };
                let n = &plan.graph.nodes[*node];
                let (Some(Some(xin)), Some(Some(w))) = (inputs.first(), inputs.get(1)) else {
                    return None;
                };
                let w_ok = plan.consts[*w]
                    .as_ref()
                    .is_some_and(|t| t.dtype == DType::F32 && t.rank() == 1);
                (n.op == "RMSNormalization"
                    && (n.domain.is_empty() || n.domain == "ai.onnx")
                    && n.attr_int("axis", -1) == -1
                    && n.attr_int("stash_type", 1) == 1
                    && inputs.len() == 2
                    && w_ok
                    && only_members)
                    .then(|| (ni, *xin, *w, n.attr_float("epsilon", 1e-5)))
            });
            if members.len() > 1 && members.iter().any(|&m| outs.contains(&out_of(m))) {
                continue;
            }
            let mut silu = None;
            if let [a, b] = members[..] {
                let (oa, ob) = (out_of(a), out_of(b));
                let only = |o: ValId| consumers[o].len() == 1 && !outs.contains(&o);
                if only(oa) && only(ob) && consumers[oa] == consumers[ob] {
                    let si = consumers[oa][0];
                    // (the group's epilogue computes SiLU; another gate stays its own dispatch)
                    if let Step::Gate(
                        sg @ Gate {
                            act: GateAct::Silu, ..
                        },
                    ) = &plan.steps[si]
                    {
                        if sg.g == ob && sg.u == oa {
                            members.swap(0, 1);
                            silu = Some(si);
                        } else if sg.g == oa && sg.u == ob {
                            silu = Some(si);
                        }
                    }
                }
            }
            if members.len() > 1 || norm.is_some() {
                groups.push(LinGroup {
                    members,
                    norm,
                    silu,
                });
            }
        }
        groups
    }
}
