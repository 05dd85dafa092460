//! Pass: the rotary reading its input token-major. `RotaryEmbedding(Transpose(x, perm=[0,2,1,3]),
//! ...)` whose transposed value nothing else reads becomes one [`Step::Rope`]: the projection
//! `[1, T, H, D]` in, the rotated heads `[1, H, T, D]` out, without the transposed copy between.

use super::view::Planning;
use super::{Rope, Step};
use crate::error::Result;

/// Binds node `ni` (a `RotaryEmbedding`) and the `Transpose` before it to one step; whether it did.
pub(super) fn rope(p: &mut Planning, ni: usize) -> Result<bool> {
    let n = &p.graph.nodes[ni];
    if !p.options.transpose_rope || n.op != "RotaryEmbedding" || !n.domain.is_empty() {
        return Ok(false);
    }
    let Some(Some(t)) = p.node_in[ni].first().copied() else {
        return Ok(false);
    };
    let Some(ti) = p.producer[t] else {
        return Ok(false);
    };
    let tn = &p.graph.nodes[ti];
    let transposes = tn.op == "Transpose"
        && tn.domain.is_empty()
        && tn.attr_ints("perm") == Some(&[0, 2, 1, 3][..])
        && p.kind[ti].is_none()
        && !p.absorbed[ti]
        && p.only_consumer(t, ni);
    let Some(Some(x)) = p.node_in[ti].first().copied().filter(|_| transposes) else {
        return Ok(false);
    };
    p.absorbed[ti] = true;
    p.kind[ni] = Some(Step::Rope(Rope {
        transpose: ti,
        node: ni,
        x,
        rest: p.node_in[ni][1..].to_vec(),
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
