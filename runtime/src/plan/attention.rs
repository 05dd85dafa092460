//! Pass: attention over the caller-owned cache. `Attention(q, Concat(past, new), Concat(past, new),
//! mask)` — the past directly a cache input or through a `Cast` to f32 — becomes one
//! [`Step::CacheAttention`] that reads the cache in place instead of concatenating it; a following
//! `Transpose(perm=[0,2,1,3])` is absorbed (the kernel writes `[1, T, H, D]` itself).

use super::view::Planning;
use super::{Step, ValId};
use crate::error::{Error, Result};
use crate::graph::DType;

/// One of K and V: (its cache, this chunk's rows, the `Concat` node, the `Cast` of the past if any).
type Part = (usize, ValId, usize, Option<usize>);

/// Binds node `ni` to a cache attention when it attends over `Concat(cache, new)` for both K and V
/// with no attributes but `scale` and `softcap` (not causal: the mask says) and no inputs past the
/// mask; whether it did.
pub(super) fn cache_attention(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    let ins = &p.node_in[ni];
    if n.op != "Attention" || !n.domain.is_empty() || ins.len() < 3 {
        return Ok(false);
    }
    let extra = ins.len() > 4 && ins[4..].iter().any(|v| v.is_some());
    let plain = n
        .attrs
        .keys()
        .all(|k| matches!(k.as_str(), "scale" | "softcap" | "is_causal"))
        && n.attr_int("is_causal", 0) == 0;
    let parts: Vec<Part> = ins[1..3]
        .iter()
        .map_while(|&kv| concat_part(p, ni, kv?))
        .collect();
    if parts.len() != 2 || extra || !plain {
        return Ok(false);
    }
    let q = ins[0].ok_or_else(|| Error::node(&n.name, &n.op, "Q missing"))?;
    let mask = ins.get(3).copied().flatten();
    for &(_, _, ci, cast) in &parts {
        p.absorbed[ci] = true;
        if let Some(c) = cast {
            p.absorbed[c] = true;
        }
    }
    // Absorb a following Transpose to [1, T, H, D] (the kernel writes that order).
    let a_out = p.node_out[ni][0];
    let transpose = match p.consumers[a_out].as_slice() {
        [ti] if p.graph.nodes[*ti].op == "Transpose"
            && p.graph.nodes[*ti].attr_ints("perm") == Some(&[0, 2, 1, 3][..])
            && !p.graph_outputs.contains(&a_out) =>
        {
            Some(*ti)
        }
        _ => None,
    };
    let (out, tokens_first) = match transpose {
        Some(ti) => {
            p.absorbed[ti] = true;
            (p.node_out[ti][0], true)
        }
        None => (a_out, false),
    };
    p.kind[ni] = Some(Step::CacheAttention {
        node: ni,
        q,
        past: [parts[0].0, parts[1].0],
        new: [parts[0].1, parts[1].1],
        mask,
        out,
        tokens_first,
        inputs: None,
    });
    p.stats.cache_attention += 1;
    Ok(true)
}

/// `kv` (an input of attention node `ni`) as `Concat(past, new)` on the sequence axis, read only by
/// `ni`, with `past` a cache input directly or through a `Cast` to f32 read only by the concat.
fn concat_part(p: &Planning, ni: usize, kv: ValId) -> Option<Part> {
    let ci = p.producer[kv]?;
    let c = &p.graph.nodes[ci];
    if c.op != "Concat" || p.node_in[ci].len() != 2 || !p.only_consumer(kv, ni) {
        return None;
    }
    let axis = c.attr_int("axis", 0);
    if axis != 2 && axis != -2 {
        return None;
    }
    let (Some(past), Some(new)) = (p.node_in[ci][0], p.node_in[ci][1]) else {
        return None;
    };
    let (cache, cast) = match p.cache_of(past) {
        Some(c) => (Some(c), None),
        None => match p.producer[past] {
            Some(pi)
                if p.graph.nodes[pi].op == "Cast"
                    && p.graph.nodes[pi].attr_int("to", 0) == DType::F32.onnx_code() as i64
                    && p.only_consumer(past, ci) =>
            {
                (p.node_in[pi][0].and_then(|v| p.cache_of(v)), Some(pi))
            }
            _ => (None, None),
        },
    };
    Some((cache?, new, ci, cast))
}

#[cfg(test)]
mod tests {
    use crate::graph::Attr;
    use crate::plan::testutil::{graph, node};
    use crate::plan::{Plan, Step};

    /// One layer's attention over caches of 5 slots, as the exporter writes it, with `attrs` on the
    /// `Attention` node.
    fn layer(attrs: &[(&str, Attr)]) -> Plan {
        let g = graph(
            &[
                ("q", &[1, 2, 1, 4]),
                ("k", &[1, 1, 1, 4]),
                ("v", &[1, 1, 1, 4]),
                ("mask", &[1, 1, 1, 6]),
                ("past.0.key", &[1, 1, 5, 4]),
                ("past.0.value", &[1, 1, 5, 4]),
            ],
            &["y", "new.0.key", "new.0.value"],
            vec![
                node("Identity", &["k"], &["new.0.key"], &[]),
                node("Identity", &["v"], &["new.0.value"], &[]),
                node(
                    "Concat",
                    &["past.0.key", "k"],
                    &["kc"],
                    &[("axis", Attr::Int(2))],
                ),
                node(
                    "Concat",
                    &["past.0.value", "v"],
                    &["vc"],
                    &[("axis", Attr::Int(-2))],
                ),
                node("Attention", &["q", "kc", "vc", "mask"], &["a"], attrs),
                node(
                    "Transpose",
                    &["a"],
                    &["y"],
                    &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
                ),
            ],
            Vec::new(),
        );
        Plan::new(g).unwrap()
    }

    /// The attention reads the caches in place: both concats and the transpose after it go into its
    /// step, which writes `[1, T, H, D]`.
    #[test]
    fn attention_over_concatenated_caches_reads_them_in_place() {
        let p = layer(&[("scale", Attr::Float(0.5))]);
        assert_eq!(p.stats.cache_attention, 1);
        assert_eq!(p.caches.len(), 2);
        let att = p
            .steps
            .iter()
            .find_map(|s| match s {
                Step::CacheAttention {
                    past,
                    out,
                    tokens_first,
                    mask,
                    ..
                } => Some((*past, *out, *tokens_first, *mask)),
                _ => None,
            })
            .expect("a cache attention step");
        assert_eq!(att, ([0, 1], p.outputs["y"], true, Some(p.inputs["mask"])));
        assert!(!p.steps.iter().any(|s| matches!(
            s,
            Step::Node { node, .. } if matches!(p.graph.nodes[*node].op.as_str(), "Concat" | "Transpose")
        )));
    }

    /// A soft cap (Gemma 2) is the kernels' too: the attention is fused (the kernels' agreement with
    /// the generic op is in `backend::cpu::attention` and `backend::gpu::attention`'s tests). An
    /// attribute the kernels do not know keeps it generic.
    #[test]
    fn a_soft_capped_attention_is_fused_an_unknown_attribute_is_not() {
        let p = layer(&[("scale", Attr::Float(0.5)), ("softcap", Attr::Float(50.0))]);
        assert_eq!(p.stats.cache_attention, 1);
        let p = layer(&[("qk_matmul_output_mode", Attr::Int(1))]);
        assert_eq!(p.stats.cache_attention, 0);
    }

    /// A causal attention (the mask is the contract's) stays generic.
    #[test]
    fn a_causal_attention_stays_generic() {
        let p = layer(&[("is_causal", Attr::Int(1))]);
        assert_eq!(p.stats.cache_attention, 0);
    }
}
