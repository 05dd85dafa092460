//! Pass: the attention reading its projections. Between the q/k/v projections and a cache attention a
//! graph rotates q and k (`plan/rope.rs`'s transposed rotaries), transposes v to heads-first, rounds an
//! f16 cache's new rows (`plan/round.rs`) and may name an f32 cache's rows through an `Identity`. When
//! nothing else reads those values, the attention takes those steps in
//! ([`AttnInputs`]): a kernel that reads the projections token-major and applies the rotary itself
//! does them all, and the CPU runs them in order before attending.

use super::view::Planning;
use super::{AttnInputs, FoldedNorm, Step, ValId};

/// Takes the rotaries, transposes, round trips and identities before each cache attention into it,
/// where `p.options.attention_inputs` lets it.
pub(super) fn attention_inputs(p: &mut Planning) {
    if !p.options.attention_inputs {
        return;
    }
    let mut readers = p.step_readers();
    for ai in 0..p.graph.nodes.len() {
        if let Some(found) = find(p, &readers, ai) {
            bind(p, ai, found);
            readers = p.step_readers();
        }
    }
}

/// What an attention takes in: its inputs, and the nodes whose steps it does.
struct Found {
    q: ValId,
    k: ValId,
    v: ValId,
    rope: [ValId; 3],
    interleaved: bool,
    norms: Option<[FoldedNorm; 2]>,
    nodes: Vec<usize>,
}

/// The rotary `v` is the output of, read only by node `user`.
struct Unroped {
    /// The rotary's input (token-major).
    x: ValId,
    /// Its cos and sin tables and positions.
    rope: [ValId; 3],
    interleaved: bool,
    /// The per-head norm its step does first.
    norm: Option<FoldedNorm>,
    /// Its node.
    node: usize,
}

/// The rotary `v` is the output of, read only by node `user` (with a head norm where the plan's
/// options take those).
fn unrope(p: &Planning, readers: &[Vec<usize>], v: ValId, user: usize) -> Option<Unroped> {
    let ri = p.producer[v]?;
    let Some(Step::Rope(r)) = &p.kind[ri] else {
        return None;
    };
    let n = &p.graph.nodes[ri];
    let (Some(Some(c)), Some(Some(s)), Some(Some(pos))) =
        (r.rest.first(), r.rest.get(1), r.rest.get(2))
    else {
        return None;
    };
    (r.out == v
        && (r.norm.is_none() || p.options.attention_input_norms)
        && readers[v] == [user]
        && p.private(v)
        && n.attr_int("rotary_embedding_dim", 0) == 0
        && p.consts[*c].is_some()
        && p.consts[*s].is_some())
    .then(|| Unroped {
        x: r.x,
        rope: [*c, *s, *pos],
        interleaved: n.attr_int("interleaved", 0) != 0,
        norm: r.norm,
        node: ri,
    })
}

/// The generic node of `op` writing `v`, read only by `*user` (which becomes it): its first input.
fn through(
    p: &Planning,
    readers: &[Vec<usize>],
    op: &str,
    v: ValId,
    user: &mut usize,
) -> Option<(ValId, usize)> {
    let ni = p.producer[v]?;
    let n = &p.graph.nodes[ni];
    let x = p.node_in[ni].first().copied().flatten()?;
    let perm_ok = op != "Transpose" || n.attr_ints("perm") == Some(&[0, 2, 1, 3][..]);
    (n.op == op
        && n.domain.is_empty()
        && perm_ok
        && p.kind[ni].is_none()
        && !p.absorbed[ni]
        && readers[v] == [*user]
        && p.private(v))
    .then(|| {
        *user = ni;
        (x, ni)
    })
}

/// One of the new rows `v` of attention `ai`: through the f16 round trip for an f16 cache (then
/// maybe an `Identity`), or an `Identity` naming an f32 cache's output; the value before them, the
/// node that reads it, and their nodes.
fn unrow(
    p: &Planning,
    readers: &[Vec<usize>],
    v: ValId,
    ai: usize,
    f16: bool,
) -> Option<(ValId, usize, Vec<usize>)> {
    let mut nodes = Vec::new();
    let (mut v, mut user) = (v, ai);
    if f16 {
        let ri = p.producer[v]?;
        let Some(Step::RoundTrip(r)) = &p.kind[ri] else {
            return None;
        };
        if r.out != v || readers[v] != [ai] || !p.private(v) {
            return None;
        }
        nodes.push(ri);
        (v, user) = (r.x, ri);
    }
    if let Some((x, ni)) = through(p, readers, "Identity", v, &mut user) {
        nodes.push(ni);
        v = x;
    }
    Some((v, user, nodes))
}

/// The inputs attention node `ai` can read itself, when it is a cache attention whose q and k come
/// from transposed rotaries (the same tables and positions), and v from a transpose.
fn find(p: &Planning, readers: &[Vec<usize>], ai: usize) -> Option<Found> {
    let Some(Step::CacheAttention {
        q,
        new,
        past,
        inputs: None,
        ..
    }) = &p.kind[ai]
    else {
        return None;
    };
    let f16 = p.caches[past[0]].dtype == crate::graph::DType::F16;
    let qr = unrope(p, readers, *q, ai)?;
    let (k1, k_user, mut nodes) = unrow(p, readers, new[0], ai, f16)?;
    let (v1, mut v_user, vn) = unrow(p, readers, new[1], ai, f16)?;
    let kr = unrope(p, readers, k1, k_user)?;
    let (v_src, ti) = through(p, readers, "Transpose", v1, &mut v_user)?;
    // One rotary for both; both normalized or neither.
    let norms = match (qr.norm, kr.norm) {
        (Some(qn), Some(kn)) => Some([qn, kn]),
        (None, None) => None,
        _ => return None,
    };
    if kr.rope != qr.rope || kr.interleaved != qr.interleaved {
        return None;
    }
    nodes.extend(vn);
    nodes.extend([qr.node, kr.node, ti]);
    nodes.sort_unstable();
    Some(Found {
        q: qr.x,
        k: kr.x,
        v: v_src,
        rope: qr.rope,
        interleaved: qr.interleaved,
        norms,
        nodes,
    })
}

/// Moves the found nodes' steps into attention `ai`.
fn bind(p: &mut Planning, ai: usize, f: Found) {
    let steps: Vec<Step> = f
        .nodes
        .iter()
        .map(|&ni| {
            p.absorbed[ni] = true;
            p.kind[ni].take().unwrap_or_else(|| Step::Node {
                node: ni,
                inputs: p.node_in[ni].clone(),
                outputs: p.node_out[ni].clone(),
            })
        })
        .collect();
    let writes: Vec<ValId> = steps
        .iter()
        .flat_map(|s| s.writes())
        .filter(|v| p.graph_outputs.contains(v))
        .collect();
    if let Some(Step::CacheAttention { inputs, .. }) = p.kind[ai].as_mut() {
        *inputs = Some(Box::new(AttnInputs {
            q: f.q,
            k: f.k,
            v: f.v,
            cos: f.rope[0],
            sin: f.rope[1],
            pos: f.rope[2],
            interleaved: f.interleaved,
            norms: f.norms,
            steps,
            writes,
        }));
        p.stats.attention_inputs += 1;
    }
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType, Dim, Graph, Node, ValueInfo};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, PlanOptions, Step};
    use crate::tensor::Tensor;

    const T: usize = 3;
    const S: usize = 5;
    const D: usize = 8;

    fn tr(x: &str, y: &str) -> Node {
        node(
            "Transpose",
            &[x],
            &[y],
            &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )
    }

    fn rope(x: &str, y: &str) -> Node {
        node("RotaryEmbedding", &[x, "cos", "sin", "pos"], &[y], &[])
    }

    fn cast(x: &str, y: &str, to: DType) -> Node {
        node(
            "Cast",
            &[x],
            &[y],
            &[("to", Attr::Int(to.onnx_code() as i64))],
        )
    }

    /// One attention layer as the exporter writes it (2 query heads, 1 KV head): the projections
    /// `[1, T, heads, D]` transposed and rotated, the new rows kept in an f16 cache (round trip) or an
    /// f32 one (named through `Identity`).
    fn layer(f16: bool) -> Graph {
        let mut nodes = vec![
            tr("qp", "qt"),
            rope("qt", "q"),
            tr("kp", "kt"),
            rope("kt", "kr"),
            tr("vp", "vt"),
        ];
        let cache = if f16 { DType::F16 } else { DType::F32 };
        if f16 {
            nodes.extend([
                cast("kr", "new.0.key", DType::F16),
                cast("new.0.key", "k", DType::F32),
                cast("vt", "new.0.value", DType::F16),
                cast("new.0.value", "v", DType::F32),
                cast("past.0.key", "pk", DType::F32),
                cast("past.0.value", "pv", DType::F32),
            ]);
        } else {
            nodes.extend([
                node("Identity", &["kr"], &["new.0.key"], &[]),
                node("Identity", &["vt"], &["new.0.value"], &[]),
                node("Identity", &["past.0.key"], &["pk"], &[]),
                node("Identity", &["past.0.value"], &["pv"], &[]),
            ]);
        }
        let (k, v) = if f16 {
            ("k", "v")
        } else {
            ("new.0.key", "new.0.value")
        };
        let (pk, pv) = if f16 {
            ("pk", "pv")
        } else {
            ("past.0.key", "past.0.value")
        };
        nodes.extend([
            node("Concat", &[pk, k], &["kc"], &[("axis", Attr::Int(2))]),
            node("Concat", &[pv, v], &["vc"], &[("axis", Attr::Int(2))]),
            node("Attention", &["q", "kc", "vc", "mask"], &["a"], &[]),
            tr("a", "y"),
        ]);
        let cos: Vec<f32> = (0..16 * D / 2).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..16 * D / 2).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut g = graph(
            &[
                ("qp", &[1, T, 2, D]),
                ("kp", &[1, T, 1, D]),
                ("vp", &[1, T, 1, D]),
                ("mask", &[1, 1, T, S + T]),
            ],
            &["y", "new.0.key", "new.0.value"],
            nodes,
            vec![
                init("cos", DType::F32, &[16, D / 2], &cos),
                init("sin", DType::F32, &[16, D / 2], &sin),
            ],
        );
        let vi = |name: &str, dtype, shape: &[usize]| ValueInfo {
            name: name.into(),
            dtype,
            shape: shape.iter().map(|&d| Dim::Known(d)).collect(),
        };
        g.inputs.push(vi("pos", DType::I64, &[1, T]));
        g.inputs.push(vi("past.0.key", cache, &[1, 1, S, D]));
        g.inputs.push(vi("past.0.value", cache, &[1, 1, S, D]));
        g
    }

    /// A first step: the new rows causal, no cache slot attended (the cache inputs are zeros).
    fn inputs(f16: bool) -> Vec<(&'static str, Tensor)> {
        let mut mask = vec![f32::NEG_INFINITY; T * (S + T)];
        for i in 0..T {
            for j in 0..=i {
                mask[i * (S + T) + S + j] = 0.0;
            }
        }
        let cache = if f16 { DType::F16 } else { DType::F32 };
        vec![
            ("qp", noise(&[1, T, 2, D], 1)),
            ("kp", noise(&[1, T, 1, D], 2)),
            ("vp", noise(&[1, T, 1, D], 3)),
            ("mask", Tensor::f32(&[1, 1, T, S + T], &mask)),
            ("pos", Tensor::i64(&[1, T], &[0, 1, 2])),
            ("past.0.key", Tensor::zeros(cache, &[1, 1, S, D])),
            ("past.0.value", Tensor::zeros(cache, &[1, 1, S, D])),
        ]
    }

    /// Both cache forms: the attention takes in the rotaries, v's transpose, the round trips or the
    /// identities — one step left — and computes what the graph does, the new cache rows included.
    #[test]
    fn the_attention_takes_in_its_rotaries_transposes_and_round_trips() {
        for f16 in [true, false] {
            let g = layer(f16);
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!(p.stats.attention_inputs, 1, "f16 {f16}: {:?}", p.steps);
            let [Step::CacheAttention {
                inputs: Some(a), ..
            }] = &p.steps[..]
            else {
                panic!("f16 {f16}: one attention step expected: {:?}", p.steps);
            };
            assert_eq!(
                (a.q, a.k, a.v),
                (p.inputs["qp"], p.inputs["kp"], p.inputs["vp"])
            );
            assert_eq!(a.writes.len(), 2);
            assert_same(&g, &p, &inputs(f16), 1e-5);
        }
    }

    /// `layer` with an RMS norm of each head between q's and k's transposes and rotaries (QK-norm),
    /// or of k's only when `k_only`.
    fn normed_layer(f16: bool, k_only: bool) -> Graph {
        let mut g = layer(f16);
        let norm = |x: &str, w: &str, y: &str| {
            let eps = ("epsilon", Attr::Float(1e-6));
            node("RMSNormalization", &[x, w], &[y], &[eps])
        };
        // nodes: tr(qp→qt), rope(qt→q), tr(kp→kt), rope(kt→kr): the rotaries read the normed heads.
        g.nodes[3].inputs[0] = "ktn".into();
        g.nodes.insert(3, norm("kt", "kn", "ktn"));
        if !k_only {
            g.nodes[1].inputs[0] = "qtn".into();
            g.nodes.insert(1, norm("qt", "qn", "qtn"));
        }
        let w = |seed: u64| {
            noise(&[D], seed)
                .typed::<f32>()
                .iter()
                .map(|x| 1.0 + x)
                .collect::<Vec<_>>()
        };
        g.initializers.push(init("qn", DType::F32, &[D], &w(5)));
        g.initializers.push(init("kn", DType::F32, &[D], &w(6)));
        g
    }

    /// QK-norm: the attention takes in the normed rotaries (their norms named in its inputs), and
    /// computes what the graph does; not where the options leave the norms out, nor where only k is
    /// normed.
    #[test]
    fn the_attention_takes_in_rotaries_with_their_head_norms() {
        for f16 in [true, false] {
            let g = normed_layer(f16, false);
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!(p.stats.attention_inputs, 1, "f16 {f16}: {:?}", p.steps);
            let [Step::CacheAttention {
                inputs: Some(a), ..
            }] = &p.steps[..]
            else {
                panic!("f16 {f16}: one attention step expected: {:?}", p.steps);
            };
            let [qn, kn] = a.norms.expect("the norms taken in");
            assert_eq!(
                (p.names[qn.scale].as_str(), p.names[kn.scale].as_str()),
                ("qn", "kn")
            );
            assert_eq!((qn.epsilon, kn.epsilon), (1e-6, 1e-6));
            assert_same(&g, &p, &inputs(f16), 1e-5);
            let no_norms = PlanOptions {
                attention_input_norms: false,
                ..PlanOptions::default()
            };
            let p = Plan::with_options(g.clone(), no_norms).unwrap();
            assert_eq!((p.stats.attention_inputs, p.stats.transpose_rope), (0, 2));
            assert_same(&g, &p, &inputs(f16), 1e-5);
        }
        let g = normed_layer(true, true);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.attention_inputs, 0, "k normed, q not");
        assert_same(&g, &p, &inputs(true), 1e-5);
    }

    /// Turned off (a GPU without the storage buffers), or a rotated key another node reads: the
    /// steps stay before the attention, and the plan still computes what the graph does.
    #[test]
    fn off_or_a_shared_rotary_keeps_the_steps() {
        let off = PlanOptions {
            attention_inputs: false,
            ..PlanOptions::default()
        };
        let p = Plan::with_options(layer(true), off).unwrap();
        assert_eq!(p.stats.attention_inputs, 0);
        assert_same(&layer(true), &p, &inputs(true), 1e-5);
        let mut g = layer(true);
        g.nodes.push(node("Neg", &["kr"], &["z"], &[]));
        g.outputs.push(g.outputs[0].clone());
        g.outputs[3].name = "z".into();
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.attention_inputs, 0);
        assert_same(&g, &p, &inputs(true), 1e-5);
    }
}
