//! Pass: liveness. Walking back from the graph outputs keeps only the steps whose values are needed
//! (dead and absorbed nodes go), then records each value's last use so its buffer is freed right after.

use super::view::Planning;
use super::{Step, ValId};

/// The live steps in graph order: each node's fused step, or the node itself as a generic step.
pub(super) fn live_steps(p: &mut Planning) -> Vec<Step> {
    let nodes = p.graph.nodes.len();
    let mut needed = vec![false; p.names.len()];
    for &o in &p.graph_outputs {
        needed[o] = true;
    }
    let mut live = vec![false; nodes];
    for ni in (0..nodes).rev() {
        if p.absorbed[ni] && p.kind[ni].is_none() {
            continue;
        }
        let (writes, reads) = match &p.kind[ni] {
            Some(s) => (s.writes(), s.reads()),
            None => (
                p.node_out[ni].clone(),
                p.node_in[ni].iter().flatten().copied().collect(),
            ),
        };
        if !writes.iter().any(|&o| needed[o]) {
            continue;
        }
        live[ni] = true;
        for v in reads {
            if p.consts[v].is_none() {
                needed[v] = true;
            }
        }
    }
    // Unabsorbed cache inputs read by generic nodes are materialized on demand (see the executors).
    let mut steps = Vec::new();
    for (ni, &is_live) in live.iter().enumerate() {
        if !is_live {
            if !p.absorbed[ni] {
                p.stats.removed += 1;
            }
            continue;
        }
        match p.kind[ni].take() {
            Some(s) => steps.push(s),
            None => {
                p.stats.generic += 1;
                steps.push(Step::Node {
                    node: ni,
                    inputs: p.node_in[ni].clone(),
                    outputs: p.node_out[ni].clone(),
                })
            }
        }
    }
    steps
}

/// Per step, the values whose last use it is (constants and graph outputs are never freed).
pub(super) fn frees(p: &Planning, steps: &[Step]) -> Vec<Vec<ValId>> {
    let mut last_use: Vec<Option<usize>> = vec![None; p.names.len()];
    for (si, s) in steps.iter().enumerate() {
        for v in s.reads() {
            last_use[v] = Some(si);
        }
    }
    let mut frees = vec![Vec::new(); steps.len()];
    for (v, lu) in last_use.iter().enumerate() {
        if let Some(si) = lu {
            if p.consts[v].is_none() && !p.graph_outputs.contains(&v) {
                frees[*si].push(v);
            }
        }
    }
    frees
}

#[cfg(test)]
mod tests {
    use crate::plan::testutil::{graph, node};
    use crate::plan::Plan;

    /// A node no output depends on goes; every value is freed after its last reader, graph outputs
    /// never.
    #[test]
    fn dead_nodes_go_and_values_are_freed_after_their_last_use() {
        let g = graph(
            &[("x", &[4])],
            &["y"],
            vec![
                node("Neg", &["x"], &["a"], &[]),
                node("Exp", &["x"], &["dead"], &[]),
                node("Abs", &["a"], &["b"], &[]),
                node("Add", &["a", "b"], &["y"], &[]),
            ],
            Vec::new(),
        );
        let p = Plan::new(g).unwrap();
        assert_eq!((p.steps.len(), p.stats.removed), (3, 1));
        let v = |n: &str| p.names.iter().position(|s| s == n).unwrap();
        assert_eq!(p.frees[0], vec![v("x")]);
        assert!(p.frees[1].is_empty());
        let mut last = p.frees[2].clone();
        last.sort_unstable();
        assert_eq!(last, vec![v("a"), v("b")]);
    }
}
