//! The planner's shared view of the graph: values resolved to slots, producers and consumers, the
//! caller-owned caches, and what the passes have decided so far (a step kind per node, the nodes
//! absorbed into another's step). Every pass reads and extends it; [`super::Plan::new`] runs them in order.

use std::collections::HashMap;

use super::{embedding, CacheSlot, FoldedNorm, PlanOptions, PlanStats, Step, ValId};
use crate::error::{Error, Result};
use crate::graph::{DType, Graph};
use crate::tensor::Tensor;

/// The graph as the passes see it, and their decisions.
pub(super) struct Planning {
    pub graph: Graph,
    /// Value names by slot.
    pub names: Vec<String>,
    /// Per node: its input slots (`None`: an omitted optional input).
    pub node_in: Vec<Vec<Option<ValId>>>,
    /// Per node: its output slots.
    pub node_out: Vec<Vec<ValId>>,
    /// Per value: its constant, from an initializer or folded by the planner.
    pub consts: Vec<Option<Tensor>>,
    /// Per value: the node that writes it.
    pub producer: Vec<Option<usize>>,
    /// Per value: the nodes that read it.
    pub consumers: Vec<Vec<usize>>,
    /// Graph inputs other than the caches: name → slot.
    pub inputs: HashMap<String, ValId>,
    /// Graph outputs: name → slot.
    pub outputs: HashMap<String, ValId>,
    /// The graph outputs' slots.
    pub graph_outputs: Vec<ValId>,
    /// Caller-owned caches.
    pub caches: Vec<CacheSlot>,
    /// Per node: the step it became (`None`: a generic node, unless absorbed).
    pub kind: Vec<Option<Step>>,
    /// Per node: folded or done by another node's step.
    pub absorbed: Vec<bool>,
    pub stats: PlanStats,
    /// The fusions to make.
    pub options: PlanOptions,
}

impl Planning {
    /// Resolves `graph`'s value names to slots, and finds its caches (graph inputs `past.X` with a
    /// matching output `new.X`; a contract error when one has no static `[1, heads, slots, dim]` shape).
    pub fn new(graph: Graph, options: PlanOptions) -> Result<Planning> {
        let mut slots: HashMap<String, ValId> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut slot = |name: &str, names: &mut Vec<String>| -> ValId {
            if let Some(&s) = slots.get(name) {
                return s;
            }
            names.push(name.to_string());
            slots.insert(name.to_string(), names.len() - 1);
            names.len() - 1
        };
        let mut consts_map: Vec<(ValId, Tensor)> = Vec::new();
        for init in &graph.initializers {
            let s = slot(&init.name, &mut names);
            consts_map.push((s, Tensor::mapped(init.dtype, &init.dims, init.data.clone())));
        }
        let mut inputs = HashMap::new();
        for i in &graph.inputs {
            inputs.insert(i.name.clone(), slot(&i.name, &mut names));
        }
        let mut node_in: Vec<Vec<Option<ValId>>> = Vec::new();
        let mut node_out: Vec<Vec<ValId>> = Vec::new();
        for n in &graph.nodes {
            node_in.push(
                n.inputs
                    .iter()
                    .map(|s| (!s.is_empty()).then(|| slot(s, &mut names)))
                    .collect(),
            );
            node_out.push(n.outputs.iter().map(|s| slot(s, &mut names)).collect());
        }
        let mut outputs = HashMap::new();
        for o in &graph.outputs {
            outputs.insert(o.name.clone(), slot(&o.name, &mut names));
        }
        let nvals = names.len();
        let mut consts: Vec<Option<Tensor>> = vec![None; nvals];
        for (s, t) in consts_map {
            consts[s] = Some(t);
        }
        let mut producer: Vec<Option<usize>> = vec![None; nvals];
        for (ni, outs) in node_out.iter().enumerate() {
            for &o in outs {
                producer[o] = Some(ni);
            }
        }
        let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nvals];
        for (ni, ins) in node_in.iter().enumerate() {
            for &i in ins.iter().flatten() {
                consumers[i].push(ni);
            }
        }
        let graph_outputs: Vec<ValId> = outputs.values().copied().collect();
        let caches = caches(&graph, &inputs, &outputs)?;
        for c in &caches {
            inputs.remove(&c.input);
        }
        let nodes = graph.nodes.len();
        Ok(Planning {
            graph,
            names,
            node_in,
            node_out,
            consts,
            producer,
            consumers,
            inputs,
            outputs,
            graph_outputs,
            caches,
            kind: (0..nodes).map(|_| None).collect(),
            absorbed: vec![false; nodes],
            stats: PlanStats::default(),
            options,
        })
    }

    /// Whether node `ni` is `v`'s only reader and `v` is no graph output (so a fused step may keep
    /// it to itself).
    pub fn only_consumer(&self, v: ValId, ni: usize) -> bool {
        self.consumers[v].iter().all(|&c| c == ni) && !self.graph_outputs.contains(&v)
    }

    /// The norm writing `v` (read by node `user` only) and its input, for a step to do it (see
    /// [`Planning::norm_node`]).
    pub fn folded_norm(&self, v: ValId, user: usize) -> Option<(FoldedNorm, ValId)> {
        let ni = self.producer[v]?;
        self.norm_node(ni).filter(|_| self.only_consumer(v, user))
    }

    /// Node `ni` as a norm a fused step can do, and its input: an `RMSNormalization` over the last
    /// axis with a constant rank-1 f32 scale and f32 statistics that no pass took.
    pub fn norm_node(&self, ni: usize) -> Option<(FoldedNorm, ValId)> {
        let n = &self.graph.nodes[ni];
        let (&[Some(x), Some(scale)], true) = (&self.node_in[ni][..], self.kind[ni].is_none())
        else {
            return None;
        };
        let scale_ok = self.consts[scale]
            .as_ref()
            .is_some_and(|t| t.dtype == DType::F32 && t.rank() == 1);
        (n.op == "RMSNormalization"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && n.attr_int("axis", -1) == -1
            && n.attr_int("stash_type", 1) == 1
            && scale_ok
            && !self.absorbed[ni])
            .then(|| {
                let epsilon = n.attr_float("epsilon", 1e-5);
                let norm = FoldedNorm {
                    node: ni,
                    scale,
                    epsilon,
                };
                (norm, x)
            })
    }

    /// Per value: the nodes whose steps read it (a fused step's reads, or an unabsorbed node's inputs).
    pub fn step_readers(&self) -> Vec<Vec<usize>> {
        let mut readers = vec![Vec::new(); self.names.len()];
        for ni in 0..self.graph.nodes.len() {
            let reads: Vec<ValId> = match &self.kind[ni] {
                Some(s) => s.reads(),
                None if !self.absorbed[ni] => self.node_in[ni].iter().flatten().copied().collect(),
                None => continue,
            };
            for v in reads {
                if !readers[v].contains(&ni) {
                    readers[v].push(ni);
                }
            }
        }
        readers
    }

    /// Whether a fused step may keep `v` to itself: no graph output, or a cache's new rows (which the
    /// backends take from the step that writes them).
    pub fn private(&self, v: ValId) -> bool {
        !self.graph_outputs.contains(&v) || self.caches.iter().any(|c| c.output_val == v)
    }

    /// Whether `v` is absent (an omitted optional input) or a constant.
    pub fn is_const(&self, v: Option<ValId>) -> bool {
        v.is_none_or(|v| self.consts[v].is_some())
    }

    /// The index of the cache whose input `v` is.
    pub fn cache_of(&self, v: ValId) -> Option<usize> {
        self.caches.iter().position(|c| c.input_val == v)
    }

    /// The view of the passes over subgraphs (embedding, token choice): the nodes taken so far.
    pub fn graphs<'a>(&'a self, taken: &'a [bool]) -> embedding::Graphs<'a> {
        embedding::Graphs {
            graph: &self.graph,
            node_in: &self.node_in,
            node_out: &self.node_out,
            consts: &self.consts,
            consumers: &self.consumers,
            graph_outputs: &self.graph_outputs,
            taken,
        }
    }

    /// Per node: folded, absorbed or bound to a fused step.
    pub fn taken(&self) -> Vec<bool> {
        (0..self.graph.nodes.len())
            .map(|ni| self.absorbed[ni] || self.kind[ni].is_some())
            .collect()
    }
}

/// The caches of `graph`: inputs `past.X` with a matching output `new.X`.
fn caches(
    graph: &Graph,
    inputs: &HashMap<String, ValId>,
    outputs: &HashMap<String, ValId>,
) -> Result<Vec<CacheSlot>> {
    let mut caches = Vec::new();
    for vi in &graph.inputs {
        let Some(rest) = vi.name.strip_prefix("past.") else {
            continue;
        };
        let out_name = format!("new.{rest}");
        let Some(&ov) = outputs.get(&out_name) else {
            continue;
        };
        let shape: Option<Vec<usize>> = vi
            .shape
            .iter()
            .map(|d| match d {
                crate::graph::Dim::Known(k) => Some(*k),
                _ => None,
            })
            .collect();
        let shape = shape.filter(|s| s.len() == 4 && s[0] == 1).ok_or_else(|| {
            Error::Contract(format!(
                "cache input `{}` must have a static shape [1, heads, slots, dim]",
                vi.name
            ))
        })?;
        caches.push(CacheSlot {
            input: vi.name.clone(),
            output: out_name,
            dtype: vi.dtype,
            shape,
            input_val: inputs[&vi.name],
            output_val: ov,
        });
    }
    Ok(caches)
}
