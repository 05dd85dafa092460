//! A transcription model's two phases. Its file holds one graph whose work is one `If` on the
//! `encode` input (docs/GRAPH.md, "Transcription models"): the then-branch is the encoder phase (one
//! window of audio → `encoded.*`), the else-branch the decoder step (the text models' step, reading
//! `cross.*`). [`split`] makes each phase a plain graph — the branch's nodes inlined, its outputs
//! named as the `If`'s, the inputs it does not read left out — so the planner and the backends see
//! the same kind of graph as a text model's step. A graph without an `encode` input is one phase.

use std::collections::HashSet;

use crate::contract;
use crate::error::{Error, Result};
use crate::graph::{Attr, Graph, Node};

/// The graphs a file's phases run.
pub(crate) struct Phases {
    /// The decoder step (a text model's whole graph).
    pub step: Graph,
    /// The encoder phase, for a transcription model.
    pub encoder: Option<Graph>,
}

/// Splits `graph` into its phases.
pub(crate) fn split(graph: Graph) -> Result<Phases> {
    if !graph.inputs.iter().any(|v| v.name == contract::ENCODE) {
        return Ok(Phases {
            step: graph,
            encoder: None,
        });
    }
    let readers: Vec<&Node> = graph
        .nodes
        .iter()
        .filter(|n| n.inputs.iter().any(|i| i == contract::ENCODE))
        .collect();
    let [switch] = readers[..] else {
        return Err(Error::Contract(format!(
            "input `{}` must be read by one `If` (the phase switch), not by {} nodes",
            contract::ENCODE,
            readers.len()
        )));
    };
    if switch.op != "If" || switch.input(0) != Some(contract::ENCODE) || switch.inputs.len() != 1 {
        return Err(Error::node(
            &switch.name,
            &switch.op,
            format!("`{}` must be the condition of an `If`", contract::ENCODE),
        ));
    }
    let switch = switch.name.clone();
    let mut encoder = inline(&graph, &switch, "then_branch", |o| {
        o.starts_with("encoded.")
    })?;
    // The step's graph keeps the file's metadata; the encoder's plan needs none of the tokenizer.
    encoder.metadata.remove(contract::meta::TOKENIZER_JSON);
    let step = inline(&graph, &switch, "else_branch", |o| {
        !o.starts_with("encoded.")
    })?;
    Ok(Phases {
        step,
        encoder: Some(encoder),
    })
}

/// `graph` with the `If` node `switch` replaced by its branch `which`, keeping the outputs `keep`
/// names, and the inputs its nodes read.
fn inline(graph: &Graph, switch: &str, which: &str, keep: impl Fn(&str) -> bool) -> Result<Graph> {
    let mut g = Graph {
        name: format!("{}.{which}", graph.name),
        metadata: graph.metadata.clone(),
        opsets: graph.opsets.clone(),
        initializers: graph.initializers.clone(),
        ..Graph::default()
    };
    for n in &graph.nodes {
        if n.name != switch {
            g.nodes.push(n.clone());
            continue;
        }
        let b = n.attr_graph(which).ok_or_else(|| {
            Error::node(&n.name, &n.op, format!("attribute `{which}` is missing"))
        })?;
        if b.outputs.len() != n.outputs.len() {
            return Err(Error::node(
                &n.name,
                &n.op,
                format!(
                    "`{which}` gives {} outputs, the If {}",
                    b.outputs.len(),
                    n.outputs.len()
                ),
            ));
        }
        let mut nodes = b.nodes.clone();
        if nodes
            .iter()
            .any(|m| m.attrs.values().any(|a| matches!(a, Attr::Graph(_))))
        {
            return Err(Error::node(
                &n.name,
                &n.op,
                format!("`{which}` holds a subgraph of its own: not supported"),
            ));
        }
        // Each branch output takes the If's output name: renamed where the branch makes it, passed
        // through an Identity where it reads an outer value.
        for (bo, name) in b.outputs.iter().zip(&n.outputs) {
            if nodes.iter().any(|m| m.outputs.contains(&bo.name)) {
                for m in &mut nodes {
                    for v in m.inputs.iter_mut().chain(m.outputs.iter_mut()) {
                        if *v == bo.name {
                            *v = name.clone();
                        }
                    }
                }
            } else {
                nodes.push(Node {
                    name: format!("{}.{name}", n.name),
                    op: "Identity".into(),
                    domain: String::new(),
                    inputs: vec![bo.name.clone()],
                    outputs: vec![name.clone()],
                    attrs: Default::default(),
                });
            }
        }
        g.nodes.extend(nodes);
        g.initializers.extend(b.initializers.iter().cloned());
    }
    g.outputs = graph
        .outputs
        .iter()
        .filter(|o| keep(&o.name))
        .cloned()
        .collect();
    // The nodes and inputs the kept outputs depend on.
    let mut live: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut used = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| live.contains(o)) {
            used[i] = true;
            live.extend(n.inputs.iter().cloned());
        }
    }
    let mut used = used.into_iter();
    g.nodes.retain(|_| used.next().unwrap_or(false));
    g.inputs = graph
        .inputs
        .iter()
        .filter(|v| v.name != contract::ENCODE && live.contains(&v.name))
        .cloned()
        .collect();
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{DType, Dim, ValueInfo};
    use crate::plan::testutil::run_graph;
    use crate::tensor::Tensor;

    fn node(name: &str, op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op: op.into(),
            domain: String::new(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attrs: Default::default(),
        }
    }

    fn vi(name: &str, dtype: DType) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            dtype,
            shape: vec![Dim::Known(2)],
        }
    }

    /// `If(encode)`: then = `encoded.0.key = a + a` (and an empty `logits`), else = `logits = b·b`
    /// (and `encoded.0.key` passed through from `a`, an outer value).
    fn two_phase() -> Graph {
        let then_g = Graph {
            name: "then".into(),
            nodes: vec![
                node("double", "Add", &["a", "a"], &["d"]),
                node("none", "Identity", &["a"], &["z"]),
            ],
            outputs: vec![vi("d", DType::F32), vi("z", DType::F32)],
            ..Graph::default()
        };
        let else_g = Graph {
            name: "else".into(),
            nodes: vec![node("square", "Mul", &["b", "b"], &["s"])],
            outputs: vec![vi("a", DType::F32), vi("s", DType::F32)],
            ..Graph::default()
        };
        let mut sw = node("phase", "If", &["encode"], &["encoded.0.key", "logits"]);
        sw.attrs
            .insert("then_branch".into(), Attr::Graph(Box::new(then_g)));
        sw.attrs
            .insert("else_branch".into(), Attr::Graph(Box::new(else_g)));
        Graph {
            name: "g".into(),
            inputs: vec![
                vi("encode", DType::Bool),
                vi("a", DType::F32),
                vi("b", DType::F32),
            ],
            outputs: vec![vi("encoded.0.key", DType::F32), vi("logits", DType::F32)],
            nodes: vec![sw],
            ..Graph::default()
        }
    }

    #[test]
    fn each_phase_is_its_branch_inlined_with_its_own_inputs_and_outputs() {
        let p = split(two_phase()).unwrap();
        let enc = p.encoder.unwrap();
        let names = |g: &Graph| g.inputs.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&enc), ["a"]);
        assert_eq!(enc.outputs.len(), 1);
        assert_eq!(names(&p.step), ["b"]);
        assert_eq!(p.step.outputs[0].name, "logits");
        let a = Tensor::f32(&[2], &[1.0, 2.0]);
        let b = Tensor::f32(&[2], &[3.0, -4.0]);
        let e = run_graph(&enc, &[("a", a)]);
        assert_eq!(e["encoded.0.key"].to_f32_vec("e").unwrap(), [2.0, 4.0]);
        let s = run_graph(&p.step, &[("b", b)]);
        assert_eq!(s["logits"].to_f32_vec("s").unwrap(), [9.0, 16.0]);
    }

    #[test]
    fn a_graph_without_the_switch_is_one_phase_and_a_misused_switch_is_refused() {
        let mut g = two_phase();
        g.inputs.retain(|v| v.name != contract::ENCODE);
        g.nodes.clear();
        assert!(split(g).unwrap().encoder.is_none());
        let mut g = two_phase();
        g.nodes.push(node("peek", "Not", &["encode"], &["n"]));
        let e = split(g).err().unwrap().to_string();
        assert!(e.contains("encode") && e.contains("2 nodes"), "{e}");
        let mut g = two_phase();
        g.nodes[0].attrs.remove("else_branch");
        let e = split(g).err().unwrap().to_string();
        assert!(e.contains("else_branch"), "{e}");
    }
}
