//! The GPU's last fusion pattern, found once from the plan's structure: the attention reading the
//! projections itself ([`AttnIn`]). (The residual epilogue, the transposed rotary, the f16 round trip and
//! the linear groups are the planner's: `plan/residual.rs`, `rope.rs`, `round.rs`, `group.rs`, run by
//! both backends.)

use super::*;

/// Patterns of standard ops the GPU runs as fewer dispatches (found once from the plan's structure).
#[derive(Debug, Default)]
pub(super) struct Fusions {
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

impl Fusions {
    pub(super) fn find(plan: &Plan, on: &GpuFusions) -> Fusions {
        let nvals = plan.names.len();
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nvals];
        for (si, s) in plan.steps.iter().enumerate() {
            for v in s.reads() {
                if !consumers[v].contains(&si) {
                    consumers[v].push(si);
                }
            }
        }
        let outs: HashSet<ValId> = plan.outputs.values().copied().collect();
        let mut f = Fusions::default();
        if on.attention_inputs {
            f.attn = AttnIn::find(plan, &consumers, &outs);
        }
        f
    }
}

impl AttnIn {
    pub(super) fn find(
        plan: &Plan,
        consumers: &[Vec<usize>],
        outs: &HashSet<ValId>,
    ) -> HashMap<usize, AttnIn> {
        let mut producer: HashMap<ValId, usize> = HashMap::new();
        for (si, s) in plan.steps.iter().enumerate() {
            for o in s.writes() {
                producer.insert(o, si);
            }
        }
        let node = |si: usize| generic_node(plan, si);
        let only = |v: ValId, si: usize| consumers[v].as_slice() == [si];
        // `v` = the plan's f16 round trip of x, read only by `user`: (x, [the round trip]).
        let unround = |v: ValId, user: usize| -> Option<(ValId, Vec<usize>)> {
            let ri = *producer.get(&v)?;
            let Step::RoundTrip(r) = &plan.steps[ri] else {
                return None;
            };
            (r.out == v && only(v, user) && !outs.contains(&v)).then(|| (r.x, vec![ri]))
        };
        // `v` = the plan's transposed rotary of `src`, read only by `user`: (src, [cos, sin,
        // positions], interleaved, [the rotary]).
        type Roped = (ValId, [ValId; 3], bool, Vec<usize>);
        let unrope = |v: ValId, user: usize| -> Option<Roped> {
            let ri = *producer.get(&v)?;
            let Step::Rope(r) = &plan.steps[ri] else {
                return None;
            };
            let n = &plan.graph.nodes[r.node];
            if n.attr_int("rotary_embedding_dim", 0) != 0 || !only(v, user) {
                return None;
            }
            let (Some(Some(c)), Some(Some(sn)), Some(Some(p))) =
                (r.rest.first(), r.rest.get(1), r.rest.get(2))
            else {
                return None;
            };
            (plan.consts[*c].is_some() && plan.consts[*sn].is_some()).then(|| {
                (
                    r.x,
                    [*c, *sn, *p],
                    n.attr_int("interleaved", 0) != 0,
                    vec![ri],
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
