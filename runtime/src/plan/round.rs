//! Pass: the f16 round trip of new cache rows. A graph that keeps an f16 cache writes the new rows as
//! `Cast(f32 → f16)` (the cache output) and attends over them read back as `Cast(f16 → f32)`. When the
//! second cast is the cache output's only reader, the pair becomes one [`Step::RoundTrip`]: both
//! values from the f32 rows in one pass.

use super::view::Planning;
use super::{RoundTrip, Step};
use crate::error::Result;
use crate::graph::{DType, Node};

/// Whether `n` is a default-domain `Cast` to `to`.
fn casts_to(n: &Node, to: DType) -> bool {
    n.op == "Cast" && n.domain.is_empty() && n.attr_int("to", 0) == to.onnx_code() as i64
}

/// Binds node `ni` (a `Cast` to f32) and the `Cast` to f16 writing a cache output before it to one
/// step; whether it did.
pub(super) fn round_trip(p: &mut Planning, ni: usize) -> Result<bool> {
    if !p.options.round_trip || !casts_to(&p.graph.nodes[ni], DType::F32) {
        return Ok(false);
    }
    let Some(Some(half)) = p.node_in[ni].first().copied() else {
        return Ok(false);
    };
    let Some(fi) = p.producer[half] else {
        return Ok(false);
    };
    let pair = casts_to(&p.graph.nodes[fi], DType::F16)
        && p.kind[fi].is_none()
        && !p.absorbed[fi]
        && p.caches.iter().any(|c| c.output_val == half)
        && p.consumers[half] == [ni];
    let Some(Some(x)) = p.node_in[fi].first().copied().filter(|_| pair) else {
        return Ok(false);
    };
    p.absorbed[fi] = true;
    p.kind[ni] = Some(Step::RoundTrip(RoundTrip {
        first: fi,
        node: ni,
        x,
        half,
        out: p.node_out[ni][0],
    }));
    p.stats.round_trip += 1;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use crate::graph::{Attr, DType, Dim, ValueInfo};
    use crate::plan::testutil::{graph, node, noise, run_graph, run_plan};
    use crate::plan::{Plan, PlanOptions, Step};

    /// `new.0.key = Cast(x, f16)`, `y = Cast(new.0.key, f32) * 2` over an f16 cache `past.0.key`.
    fn round_graph() -> crate::graph::Graph {
        let to = |d: DType| ("to", Attr::Int(d.onnx_code() as i64));
        let mut g = graph(
            &[("x", &[1, 2, 3, 4])],
            &["y", "new.0.key"],
            vec![
                node("Cast", &["x"], &["new.0.key"], &[to(DType::F16)]),
                node("Cast", &["new.0.key"], &["back"], &[to(DType::F32)]),
                node("Add", &["back", "back"], &["y"], &[]),
            ],
            Vec::new(),
        );
        g.inputs.push(ValueInfo {
            name: "past.0.key".into(),
            dtype: DType::F16,
            shape: [1, 2, 8, 4].map(Dim::Known).to_vec(),
        });
        g
    }

    /// The two casts become one step writing both values, bit for bit what the nodes write.
    #[test]
    fn the_cache_rows_round_trip_becomes_one_step() {
        let g = round_graph();
        let p = Plan::new(g.clone()).unwrap();
        assert_eq!(p.stats.round_trip, 1);
        assert!(matches!(&p.steps[0], Step::RoundTrip(r) if r.x == p.inputs["x"]));
        let x = noise(&[1, 2, 3, 4], 3);
        let want = run_graph(&g, &[("x", x.clone())]);
        let got = run_plan(&p, &[("x", x)]);
        for name in ["y", "new.0.key"] {
            assert_eq!(want[name].dtype, got[name].dtype, "{name}");
            assert_eq!(want[name].bytes(), got[name].bytes(), "{name}");
        }
    }

    /// Turned off, the casts stay nodes.
    #[test]
    fn the_pass_off_keeps_the_casts() {
        let off = PlanOptions {
            round_trip: false,
            ..PlanOptions::default()
        };
        let p = Plan::with_options(round_graph(), off).unwrap();
        assert_eq!((p.stats.round_trip, p.steps.len()), (0, 3));
    }
}
