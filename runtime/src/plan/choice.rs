//! Recognizing the token choice's tail: the nodes after the `TopK` that turn its sorted values and
//! indices into `next_token` (softmax, the nucleus of mass `top_p`, the draw with `random_u`, at
//! most the k-th) are bound to one [`Step::TokenChoice`](super::Step::TokenChoice) — on the GPU one
//! dispatch that reads back only the token id, on the CPU one pass instead of fifteen nodes.
//!
//! The match is proven, not assumed: the nodes as written are run on sample rows (k from 1 to 300,
//! several `top_p` and draws, ties) and must choose the token [`nucleus_pick`] chooses, every time.
//! Which of the two float inputs is `top_p` and which the draw is found the same way. Anything else
//! stays generic nodes.

use std::collections::{HashMap, HashSet};

use crate::backend::cpu::misc::nucleus_pick;
use crate::graph::DType;
use crate::tensor::Tensor;

use super::embedding::Graphs;
use super::{TokenChoice, ValId};

impl Graphs<'_> {
    /// The token choice whose output is `out` (the graph's `next_token`), if its tail proves to be
    /// [`nucleus_pick`] over a `TopK`: the step (in place of the tail's last node) and the tail's
    /// other nodes, which it absorbs.
    pub fn token_choice(&self, out: ValId) -> Option<(Vec<usize>, TokenChoice)> {
        let g = self.graph;
        let leader = (0..g.nodes.len()).find(|&ni| self.node_out[ni].contains(&out))?;
        if self.taken[leader] {
            return None;
        }
        // Ancestors of the output, back to (not through) the first TopK met.
        let mut anc: HashSet<usize> = HashSet::new();
        let mut todo = vec![leader];
        let mut topk = None;
        while let Some(ni) = todo.pop() {
            let n = &g.nodes[ni];
            if n.op == "TopK" && n.domain.is_empty() {
                if topk.is_some_and(|t| t != ni) {
                    return None;
                }
                topk = Some(ni);
                continue;
            }
            if !anc.insert(ni) {
                continue;
            }
            for v in self.node_in[ni].iter().flatten() {
                if let Some(p) = (0..g.nodes.len()).find(|&p| self.node_out[p].contains(v)) {
                    todo.push(p);
                }
            }
        }
        let tk = topk?;
        let n = &g.nodes[tk];
        let (&[vals, idx], Some(&Some(_)), Some(&Some(k))) = (
            &self.node_out[tk][..],
            self.node_in[tk].first(),
            self.node_in[tk].get(1),
        ) else {
            return None;
        };
        if n.attr_int("largest", 1) != 1 || n.attr_int("sorted", 1) != 1 || self.taken[tk] {
            return None;
        }
        // The tail: the ancestors of the output reached from the TopK's outputs or its k.
        let mut reach: HashSet<ValId> = [vals, idx, k].into_iter().collect();
        let mut members = Vec::new();
        for ni in 0..g.nodes.len() {
            if ni == tk || !anc.contains(&ni) {
                continue;
            }
            if self.node_in[ni].iter().flatten().any(|v| reach.contains(v)) {
                if self.taken[ni] {
                    return None;
                }
                members.push(ni);
                reach.extend(self.node_out[ni].iter().copied());
            }
        }
        if !members.contains(&leader) || !self.closed(&members, out) {
            return None;
        }
        // What the tail reads from outside: the TopK's outputs and k, and two more values.
        let made: HashSet<ValId> = members
            .iter()
            .flat_map(|&m| self.node_out[m].iter().copied())
            .collect();
        let mut outside: Vec<ValId> = Vec::new();
        for &m in &members {
            for &v in self.node_in[m].iter().flatten() {
                if !made.contains(&v)
                    && ![vals, idx, k].contains(&v)
                    && self.consts[v].is_none()
                    && !outside.contains(&v)
                {
                    outside.push(v);
                }
            }
        }
        let [a, b] = outside[..] else { return None };
        for (top_p, u) in [(a, b), (b, a)] {
            let mut c = TokenChoice {
                node: leader,
                vals,
                idx,
                k,
                top_p,
                u,
                out,
                out_shape: Vec::new(),
            };
            if let Some(shape) = self.proves_choice(&c, &members) {
                c.out_shape = shape;
                let absorbs = members.into_iter().filter(|&m| m != leader).collect();
                return Some((absorbs, c));
            }
        }
        None
    }

    /// Runs `members` on sample rows and compares their token with [`nucleus_pick`]'s; the output's
    /// shape when every sample agrees.
    fn proves_choice(&self, f: &TokenChoice, members: &[usize]) -> Option<Vec<usize>> {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut shape: Option<Vec<usize>> = None;
        for k in [1usize, 2, 5, 40, 300] {
            // Sorted values with a tie, and distinct token ids.
            let mut vals: Vec<f32> = (0..k).map(|_| (rnd() - 0.5) * 12.0).collect();
            vals.sort_by(|x, y| y.total_cmp(x));
            if k > 3 {
                vals[2] = vals[1];
            }
            let ids: Vec<i64> = (0..k as i64).map(|i| (i * 7919 + 13) % 49_999).collect();
            for top_p in [1.0f32, 0.9, 0.3, 1e-6] {
                for u in [0.0f32, rnd(), 0.999_999] {
                    let mut env: HashMap<ValId, Tensor> = HashMap::new();
                    env.insert(f.vals, Tensor::f32(&[1, k], &vals));
                    env.insert(f.idx, Tensor::i64(&[1, k], &ids));
                    env.insert(f.k, Tensor::i64(&[1], &[k as i64]));
                    env.insert(f.top_p, Tensor::f32(&[1], &[top_p]));
                    env.insert(f.u, Tensor::f32(&[1], &[u]));
                    self.run_nodes(members, &mut env)?;
                    let got = env.get(&f.out)?;
                    if got.dtype != DType::I64 || got.numel() != 1 {
                        return None;
                    }
                    if shape.as_ref().is_some_and(|s| *s != got.shape) {
                        return None;
                    }
                    shape = Some(got.shape.clone());
                    let j = nucleus_pick(&vals, top_p, u).ok()?;
                    if got.typed::<i64>()[0] != ids[j] {
                        return None;
                    }
                }
            }
        }
        shape
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::misc::nucleus_pick;
    use crate::plan::testutil::token_choice;
    use crate::plan::{Plan, Step};

    /// The token choice graph ([`crate::plan::testutil::token_choice`]) planned.
    fn plan(nucleus: &str) -> Plan {
        Plan::new(token_choice(nucleus)).unwrap()
    }

    /// The contract's tail becomes one step after the TopK, its scalars told apart by the proof.
    #[test]
    fn the_contract_tail_becomes_one_step() {
        let p = plan("before");
        assert_eq!(p.stats.token_choice, 1);
        let c = p
            .steps
            .iter()
            .find_map(|s| match s {
                Step::TokenChoice(c) => Some(c),
                _ => None,
            })
            .expect("a token choice step");
        let name = |v: usize| p.names[v].as_str();
        assert_eq!(
            (
                name(c.vals),
                name(c.idx),
                name(c.k),
                name(c.top_p),
                name(c.u)
            ),
            ("vals", "idx", "k", "tp", "random_u")
        );
        assert_eq!((name(c.out), &c.out_shape[..]), ("next_token", &[1][..]));
        // What is left: the k arithmetic, the temperature, the TopK, top_p's floor, the step.
        let ops: Vec<&str> = p
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Node { node, .. } => Some(p.graph.nodes[*node].op.as_str()),
                _ => None,
            })
            .collect();
        assert!(
            !ops.iter()
                .any(|o| ["Softmax", "CumSum", "GatherElements"].contains(o)),
            "{ops:?}"
        );
    }

    /// A tail that means something else — the nucleus without the token that crosses `top_p`
    /// (`cumsum < top_p`, not `cumsum − p < top_p`) — fails the proof and stays generic nodes.
    #[test]
    fn another_tail_stays_generic() {
        let p = plan("c");
        assert_eq!(p.stats.token_choice, 0);
        assert!(p.steps.iter().all(|s| !matches!(s, Step::TokenChoice(_))));
    }

    /// The pick on hand-worked rows: greedy-like k = 1, the nucleus cut, the draw's bounds.
    #[test]
    fn nucleus_pick_by_hand() {
        assert_eq!(nucleus_pick(&[3.0], 0.5, 0.9).unwrap(), 0);
        // p = [0.5, 0.25, 0.25] (ln values): top_p 0.6 keeps the first two (0 < .6, .5 < .6).
        let v = [0.0f32, -std::f32::consts::LN_2, -std::f32::consts::LN_2];
        assert_eq!(nucleus_pick(&v, 0.6, 0.0).unwrap(), 0);
        assert_eq!(nucleus_pick(&v, 0.6, 0.7).unwrap(), 1); // thr = .7 · .75 = .525 ≥ .5
        assert_eq!(nucleus_pick(&v, 0.6, 0.999_999).unwrap(), 1); // never past the nucleus
        assert_eq!(nucleus_pick(&v, 1.0, 0.999_999).unwrap(), 2);
        assert_eq!(nucleus_pick(&v, 0.4, 0.999_999).unwrap(), 0);
        // Every value −inf: no mass, every prefix sum (0) is ≤ the threshold (0): the last.
        assert_eq!(nucleus_pick(&[f32::NEG_INFINITY; 4], 0.9, 0.5).unwrap(), 3);
        assert!(nucleus_pick(&[], 0.9, 0.5).is_err());
    }
}
