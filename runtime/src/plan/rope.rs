//! Pass: the rotary reading its input token-major. `RotaryEmbedding(Transpose(x, perm=[0,2,1,3]),
//! ...)` whose transposed value nothing else reads becomes one [`Step::Rope`]: the projection
//! `[1, T, H, D]` in, the rotated heads `[1, H, T, D]` out, without the transposed copy between. An
//! RMS norm of each head between them (QK-norm: `RotaryEmbedding(RMSNormalization(Transpose(x),
//! scale))`, axis −1, a constant scale) goes into the step too ([`FoldedNorm`](super::FoldedNorm)): it reads one head's
//! `D` values either side of the transpose.

use super::view::Planning;
use super::{Rope, Step};
use crate::error::Result;

/// Binds node `ni` (a `RotaryEmbedding`) and the `Transpose` before it to one step; whether it did.
pub(super) fn rope(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    if !p.options.transpose_rope || n.op != "RotaryEmbedding" || !n.domain.is_empty() {
        return Ok(false);
    }
    let Some(Some(r_in)) = p.node_in[ni].first().copied() else {
        return Ok(false);
    };
    let (norm, t) = match p.folded_norm(r_in, ni) {
        Some((norm, t)) => (Some(norm), t),
        None => (None, r_in),
    };
    let consumer = norm.map_or(ni, |n| n.node);
    let Some(ti) = p.producer[t] else {
        return Ok(false);
    };
    let tn = &p.graph.nodes[ti];
    let transposes = tn.op == "Transpose"
        && tn.domain.is_empty()
        && tn.attr_ints("perm") == Some(&[0, 2, 1, 3][..])
        && p.kind[ti].is_none()
        && !p.absorbed[ti]
        && p.only_consumer(t, consumer);
    let Some(Some(x)) = p.node_in[ti].first().copied().filter(|_| transposes) else {
        return Ok(false);
    };
    p.absorbed[ti] = true;
    if let Some(n) = norm {
        p.absorbed[n.node] = true;
    }
    p.kind[ni] = Some(Step::Rope(Rope {
        transpose: ti,
        node: ni,
        x,
        rest: p.node_in[ni][1..].to_vec(),
        norm,
        out: p.node_out[ni][0],
    }));
    p.stats.transpose_rope += 1;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType};
    use crate::plan::testutil::{assert_same, graph, init, node, noise};
    use crate::plan::{Plan, PlanOptions, Step};
    use crate::tensor::Tensor;

    /// `RotaryEmbedding(Transpose(x))` over `[1, T, H, D]`, with `extra` reading the transposed value
    /// too when set.
    fn rope_graph(interleaved: i64, extra: bool) -> crate::graph::Graph {
        let (t, h, d) = (3, 2, 8);
        let cos: Vec<f32> = (0..16 * d / 2).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..16 * d / 2).map(|i| (i as f32 * 0.1).sin()).collect();
        let perm = ("perm", Attr::Ints(vec![0, 2, 1, 3]));
        let mut nodes = vec![
            node("Transpose", &["x"], &["xt"], &[perm]),
            node(
                "RotaryEmbedding",
                &["xt", "cos", "sin", "pos"],
                &["y"],
                &[("interleaved", Attr::Int(interleaved))],
            ),
        ];
        let mut outs = vec!["y"];
        if extra {
            nodes.push(node("Neg", &["xt"], &["z"], &[]));
            outs.push("z");
        }
        let mut g = graph(
            &[("x", &[1, t, h, d])],
            &outs,
            nodes,
            vec![
                init("cos", DType::F32, &[16, d / 2], &cos),
                init("sin", DType::F32, &[16, d / 2], &sin),
            ],
        );
        g.inputs.push(crate::graph::ValueInfo {
            name: "pos".into(),
            dtype: DType::I64,
            shape: vec![crate::graph::Dim::Known(1), crate::graph::Dim::Known(t)],
        });
        g
    }

    fn inputs() -> Vec<(&'static str, Tensor)> {
        vec![
            ("x", noise(&[1, 3, 2, 8], 7)),
            ("pos", Tensor::i64(&[1, 3], &[4, 5, 9])),
        ]
    }

    /// The transpose goes into the rotary's step, both pair layouts; the step computes what the two
    /// nodes do.
    #[test]
    fn transpose_then_rotary_becomes_one_step() {
        for interleaved in [0, 1] {
            let g = rope_graph(interleaved, false);
            let p = Plan::new(g.clone()).unwrap();
            assert_eq!(p.stats.transpose_rope, 1);
            assert_eq!(p.steps.len(), 1);
            assert!(matches!(&p.steps[0], Step::Rope(r) if r.x == p.inputs["x"]));
            assert_same(&g, &p, &inputs(), 0.0);
        }
    }

    /// QK-norm: `RotaryEmbedding(RMSNormalization(Transpose(x), scale))` is one step with the norm in
    /// it; a norm whose output another node reads is not taken (the transpose and rotary still are not:
    /// the norm sits between them).
    #[test]
    fn a_head_norm_between_transpose_and_rotary_goes_into_the_step() {
        for shared in [false, true] {
            let mut g = rope_graph(0, false);
            let d = 8;
            g.nodes[1].inputs[0] = "xn".into();
            g.nodes.insert(
                1,
                node(
                    "RMSNormalization",
                    &["xt", "scale"],
                    &["xn"],
                    &[("epsilon", Attr::Float(1e-6))],
                ),
            );
            let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.1).collect();
            g.initializers.push(init("scale", DType::F32, &[d], &w));
            if shared {
                g.nodes.push(node("Neg", &["xn"], &["z"], &[]));
                g.outputs.push(g.outputs[0].clone());
                g.outputs.last_mut().unwrap().name = "z".into();
            }
            let p = Plan::new(g.clone()).unwrap();
            assert_same(&g, &p, &inputs(), 0.0);
            if shared {
                assert_eq!(p.stats.transpose_rope, 0);
                continue;
            }
            assert_eq!((p.stats.transpose_rope, p.steps.len()), (1, 1));
            let Step::Rope(r) = &p.steps[0] else {
                panic!("{:?}", p.steps);
            };
            let n = r.norm.expect("the norm in the step");
            assert_eq!((p.names[n.scale].as_str(), n.epsilon), ("scale", 1e-6));
        }
    }

    /// A transposed value another node reads, or the pass turned off: the nodes stay.
    #[test]
    fn a_shared_transpose_or_the_pass_off_stays_two_nodes() {
        let g = rope_graph(0, true);
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.transpose_rope, 0);
        assert_same(&g, &p, &inputs(), 0.0);
        let off = PlanOptions {
            transpose_rope: false,
            ..PlanOptions::default()
        };
        let p = Plan::with_options(rope_graph(0, false), off).unwrap();
        assert_eq!((p.stats.transpose_rope, p.steps.len()), (0, 2));
    }
}
