//! `If` and its branches: the nodes recorded since a mark become a subgraph, and `If` chooses between
//! two of them. A branch reads the enclosing graph's values (inputs, weights) by name; its outputs are
//! values it makes itself (an `Identity` is added for one it only passes on).

use std::collections::HashSet;

use onestep_format::graph::{Attr, DType, Dim, Graph, Node, ValueInfo};

use super::{fmt_shape, to_dims, SDim, Sym, TraceError, Tracer, R};

impl Tracer {
    /// Where the next node will go: the start of a branch for [`Tracer::branch`].
    pub fn mark(&self) -> usize {
        self.graph.nodes.len()
    }

    /// Moves the nodes recorded since `from` into a subgraph called `name` whose outputs are `outs`,
    /// in order.
    pub fn branch(&mut self, name: &str, from: usize, outs: &[&Sym]) -> R<Graph> {
        if from > self.graph.nodes.len() {
            return Err(TraceError::Model(format!(
                "branch `{name}`: mark {from} is past the last node"
            )));
        }
        let mut nodes = self.graph.nodes.split_off(from);
        let made: HashSet<String> = nodes.iter().flat_map(|n| n.outputs.clone()).collect();
        let mut used = HashSet::new();
        let mut outputs = Vec::with_capacity(outs.len());
        for o in outs {
            let shape = to_dims(&o.shape).ok_or_else(|| {
                TraceError::Model(format!(
                    "branch `{name}`: output `{}` has shape {}, not representable",
                    o.name,
                    fmt_shape(&o.shape)
                ))
            })?;
            let value = if made.contains(&o.name) && used.insert(o.name.clone()) {
                o.name.clone()
            } else {
                let id = self.unique(&format!("{name}.pass"));
                nodes.push(Node {
                    name: id.clone(),
                    op: "Identity".into(),
                    domain: String::new(),
                    inputs: vec![o.name.clone()],
                    outputs: vec![id.clone()],
                    attrs: Default::default(),
                });
                id
            };
            outputs.push(ValueInfo {
                name: value,
                dtype: o.dtype,
                shape,
            });
        }
        Ok(Graph {
            name: name.to_string(),
            nodes,
            outputs,
            ..Graph::default()
        })
    }

    /// `If(cond, then_branch, else_branch)`: `cond` a one-element bool; both branches give one output
    /// per entry of `outs` with its element type. `outs` are the declared output shapes (a dim the
    /// branches disagree on is a named [`SDim::Dyn`]).
    pub fn if_(
        &mut self,
        name: &str,
        cond: &Sym,
        then_branch: Graph,
        else_branch: Graph,
        outs: Vec<(DType, Vec<SDim>)>,
    ) -> R<Vec<Sym>> {
        if cond.dtype != DType::Bool || cond.shape.iter().any(|d| *d != SDim::N(1)) {
            return Err(self.err(name, "If", "the condition must be one bool", &[cond]));
        }
        for g in [&then_branch, &else_branch] {
            let types: Vec<DType> = g.outputs.iter().map(|o| o.dtype).collect();
            let want: Vec<DType> = outs.iter().map(|o| o.0).collect();
            if types != want {
                return Err(self.err(
                    name,
                    "If",
                    format!(
                        "branch `{}` gives {types:?}, the If declares {want:?}",
                        g.name
                    ),
                    &[cond],
                ));
            }
        }
        let outs = outs.into_iter().map(|(d, s)| (d, s, None)).collect();
        Ok(self.node(
            name,
            "If",
            "",
            &[Some(cond)],
            vec![
                ("then_branch", Attr::Graph(Box::new(then_branch))),
                ("else_branch", Attr::Graph(Box::new(else_branch))),
            ],
            outs,
        ))
    }

    /// Takes back the graph outputs declared so far (by blocks shared with the text models, inside a
    /// branch), renaming each value to `{prefix}{name}` so that the `If` can give the name.
    pub fn take_outputs(&mut self, prefix: &str) -> R<Vec<Sym>> {
        let outs = std::mem::take(&mut self.graph.outputs);
        let mut syms = Vec::with_capacity(outs.len());
        for o in outs {
            let new = format!("{prefix}{}", o.name);
            self.claim(&new)?;
            self.names.remove(&o.name);
            for n in &mut self.graph.nodes {
                for v in n.outputs.iter_mut().chain(n.inputs.iter_mut()) {
                    if *v == o.name {
                        *v = new.clone();
                    }
                }
            }
            let shape = o
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Known(n) => SDim::N(*n),
                    Dim::Sym(s) if s == onestep_format::contract::CHUNK_DIM => SDim::T(0),
                    Dim::Sym(s) => SDim::Dyn(s.clone()),
                })
                .collect();
            syms.push(Sym {
                name: new,
                dtype: o.dtype,
                shape,
                value: None,
            });
        }
        Ok(syms)
    }

    /// An empty constant of `dtype` and `dims` (one of them 0): a branch's placeholder for an output
    /// only the other branch computes.
    pub fn const_empty(&mut self, dtype: DType, dims: &[usize]) -> R<Sym> {
        if dims.iter().product::<usize>() != 0 {
            return Err(TraceError::Model(format!(
                "empty constant of shape {dims:?} is not empty"
            )));
        }
        let hint = format!(
            "empty.{}.{}",
            dtype.name(),
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x")
        );
        Ok(self.constant(&hint, dtype, dims, Vec::new(), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onestep_format::graph::Attr;

    /// Two branches over one outer input: each keeps its nodes, an outer value it only passes on gets
    /// an Identity, and the If declares what the caller asked; the file written and read back holds
    /// the same subgraphs.
    #[test]
    fn if_branches_survive_the_writer_and_the_reader() {
        let mut t = Tracer::new("g");
        let c = t.input("c", DType::Bool, vec![SDim::N(1)]).unwrap();
        let x = t.input("x", DType::F32, vec![SDim::N(2)]).unwrap();
        let m = t.mark();
        let one = t.const_f32(1.0);
        let y = t.add("plus", &x, &one).unwrap();
        let then_g = t.branch("then", m, &[&y, &x]).unwrap();
        assert_eq!(then_g.nodes.len(), 2, "the Add and an Identity for x");
        let m = t.mark();
        let two = t.const_f32(2.0);
        let z = t.mul("times", &x, &two).unwrap();
        let else_g = t.branch("else", m, &[&z, &z]).unwrap();
        assert_eq!(else_g.outputs[0].name, "times");
        assert_ne!(
            else_g.outputs[1].name, "times",
            "a value given twice is passed on once more"
        );
        let ys = t
            .if_(
                "phase",
                &c,
                then_g,
                else_g,
                vec![(DType::F32, vec![SDim::N(2)]); 2],
            )
            .unwrap();
        t.output(&ys[0], "a").unwrap();
        t.output(&ys[1], "b").unwrap();
        let g = t.finish();
        assert_eq!(g.nodes.len(), 1);
        let dir = std::env::temp_dir().join(format!("onestep-if-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("if.onnx");
        crate::write::write_model(&g, &path, None, &mut |_, _| {}).unwrap();
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        let back = onestep_format::onnx::read::decode_model(bytes, "if.onnx").unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let n = &back.nodes[0];
        assert_eq!(n.op, "If");
        for (key, want) in [("then_branch", &g.nodes[0]), ("else_branch", &g.nodes[0])] {
            let (Some(Attr::Graph(got)), Some(Attr::Graph(w))) =
                (n.attrs.get(key), want.attrs.get(key))
            else {
                panic!("{key} missing");
            };
            assert_eq!(got.nodes, w.nodes, "{key}");
            assert_eq!(got.outputs, w.outputs, "{key}");
        }
    }

    /// A branch whose outputs' types differ from the If's declaration is refused, naming the If.
    #[test]
    fn branches_of_other_types_are_refused() {
        let mut t = Tracer::new("g");
        let c = t.input("c", DType::Bool, vec![SDim::N(1)]).unwrap();
        let x = t.input("x", DType::F32, vec![SDim::N(2)]).unwrap();
        let m = t.mark();
        let y = t.cast("to_i64", &x, DType::I64).unwrap();
        let a = t.branch("then", m, &[&y]).unwrap();
        let m = t.mark();
        let z = t.cast("to_f16", &x, DType::F16).unwrap();
        let b = t.branch("else", m, &[&z]).unwrap();
        let e = t
            .if_("phase", &c, a, b, vec![(DType::I64, vec![SDim::N(2)])])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("phase") && e.contains("If") && e.contains("else"),
            "{e}"
        );
    }
}
