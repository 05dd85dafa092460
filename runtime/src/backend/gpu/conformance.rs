//! Op and step-kind conformance on the GPU: one-node and one-pattern graphs on random inputs, each run
//! through [`run_graph`] under every kernel variant ([`Variant::Rows`], [`Variant::Lanes`],
//! [`Variant::Subgroups`] where the adapter has subgroups), against the generic CPU ops node by node
//! (the oracle). Every case must run wholly on GPU kernels (a case the GPU left to the CPU would check
//! nothing) and match within its tolerance, at each of its shapes.
//!
//! ONNX's own node cases (`runtime/tests/onnx_node.rs`) check the same kernels on ONNX's inputs; the
//! planner's pass tests (`plan/*.rs`) check the CPU's fused forms; this file checks the GPU's.

use std::sync::Arc;

use super::graph::run_graph;
use super::options::GpuOptions;
use super::testutil::max_rel;
use super::{BackendFilter, DeviceRequest, GpuContext, Variant};
use crate::graph::{Attr, DType, Dim, Graph, Initializer, Node, ValueInfo};
use crate::plan::testutil::{init, node, run_graph as oracle, token_choice};
use crate::tensor::Tensor;

/// One conformance case: a graph, its inputs, the largest error allowed (max |a − b| / (1 + |b|)),
/// and the steps that must run on GPU kernels.
struct Case {
    name: String,
    graph: Graph,
    inputs: Vec<(&'static str, Tensor)>,
    tol: f32,
    gpu: OnGpu,
}

/// What of a case must run on the GPU.
#[derive(Clone, Copy)]
enum OnGpu {
    /// Every step.
    All,
    /// The steps of these kinds ([`crate::plan::Step::label`]); the others (host-side scalar
    /// arithmetic) may stay on the CPU.
    Kinds(&'static [&'static str]),
}

/// Deterministic noise in [-1, 1) (`seed` picks it).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    super::testutil::noise(n, seed)
}

fn vi(name: &str, dtype: DType, shape: &[usize]) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        dtype,
        shape: shape.iter().map(|&d| Dim::Known(d)).collect(),
    }
}

/// A graph of `nodes` over `inputs` (name, dtype, shape) and `inits`, outputs `outputs` (f32).
fn graph(
    inputs: &[(&str, DType, &[usize])],
    outputs: &[&str],
    nodes: Vec<Node>,
    inits: Vec<Initializer>,
) -> Graph {
    Graph {
        name: "conformance".into(),
        inputs: inputs.iter().map(|(n, d, s)| vi(n, *d, s)).collect(),
        outputs: outputs.iter().map(|n| vi(n, DType::F32, &[])).collect(),
        nodes,
        initializers: inits,
        ..Default::default()
    }
}

fn f32_in(shape: &[usize], seed: u64) -> Tensor {
    Tensor::f32(shape, &noise(shape.iter().product(), seed))
}

/// `Add`, `Sub`, `Mul`, `Div`, broadcast both ways (divisors kept away from zero).
fn binary_cases() -> Vec<Case> {
    let shapes: [(&[usize], &[usize]); 4] = [
        (&[3, 5, 7], &[3, 5, 7]),
        (&[3, 5, 7], &[7]),
        (&[3, 1, 7], &[1, 5, 1]),
        (&[1, 2, 1, 33], &[2, 5, 1]),
    ];
    let mut v = Vec::new();
    for op in ["Add", "Sub", "Mul", "Div"] {
        for (i, (a, b)) in shapes.iter().enumerate() {
            let bt = f32_in(b, 2 * i as u64 + 1);
            let bt = match op {
                "Div" => Tensor::f32(
                    b,
                    &bt.typed::<f32>()
                        .iter()
                        .map(|x| 1.5 + x)
                        .collect::<Vec<_>>(),
                ),
                _ => bt,
            };
            v.push(Case {
                name: format!("{op} {a:?} {b:?}"),
                graph: graph(
                    &[("a", DType::F32, a), ("b", DType::F32, b)],
                    &["y"],
                    vec![node(op, &["a", "b"], &["y"], &[])],
                    vec![],
                ),
                inputs: vec![("a", f32_in(a, 2 * i as u64)), ("b", bt)],
                tol: 1e-6,
                gpu: OnGpu::All,
            });
        }
    }
    v
}

/// The unary ops: `Sigmoid`, `Neg`, `Tanh`, `Gelu` (exact and tanh); inputs over [-4, 4).
fn unary_cases() -> Vec<Case> {
    let ops: [(&str, Option<&str>, f32); 5] = [
        ("Sigmoid", None, 1e-6),
        ("Neg", None, 0.0),
        ("Tanh", None, 1e-6),
        ("Gelu", None, 1e-5),
        ("Gelu", Some("tanh"), 1e-5),
    ];
    let mut v = Vec::new();
    for (op, approx, tol) in ops {
        for shape in [&[4usize, 33][..], &[1, 3, 5, 64]] {
            let attrs: Vec<(&str, Attr)> = approx
                .map(|a| ("approximate", Attr::Str(a.into())))
                .into_iter()
                .collect();
            let x = f32_in(shape, 7);
            let x = Tensor::f32(
                shape,
                &x.typed::<f32>().iter().map(|x| 4.0 * x).collect::<Vec<_>>(),
            );
            v.push(Case {
                name: format!("{op} {approx:?} {shape:?}"),
                graph: graph(
                    &[("x", DType::F32, shape)],
                    &["y"],
                    vec![node(op, &["x"], &["y"], &attrs)],
                    vec![],
                ),
                inputs: vec![("x", x)],
                tol,
                gpu: OnGpu::All,
            });
        }
    }
    v
}

/// `Cast` f32 → f16 → f32 (two generic casts: no cache, so no round-trip step), and `Transpose`.
fn layout_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for shape in [&[5usize, 9][..], &[2, 3, 17]] {
        v.push(Case {
            name: format!("Cast f32→f16→f32 {shape:?}"),
            graph: graph(
                &[("x", DType::F32, shape)],
                &["y"],
                vec![
                    node("Cast", &["x"], &["h"], &[("to", Attr::Int(10))]),
                    node("Cast", &["h"], &["y"], &[("to", Attr::Int(1))]),
                ],
                vec![],
            ),
            inputs: vec![("x", f32_in(shape, 3))],
            tol: 0.0,
            gpu: OnGpu::All,
        });
    }
    let perms: [(&[usize], &[i64]); 3] = [
        (&[6, 9], &[1, 0]),
        (&[1, 3, 5, 8], &[0, 2, 1, 3]),
        (&[2, 3, 4, 5], &[3, 1, 0, 2]),
    ];
    for (shape, perm) in perms {
        v.push(Case {
            name: format!("Transpose {shape:?} {perm:?}"),
            graph: graph(
                &[("x", DType::F32, shape)],
                &["y"],
                vec![node(
                    "Transpose",
                    &["x"],
                    &["y"],
                    &[("perm", Attr::Ints(perm.to_vec()))],
                )],
                vec![],
            ),
            inputs: vec![("x", f32_in(shape, 5))],
            tol: 0.0,
            gpu: OnGpu::All,
        });
    }
    v
}

/// `Gather` of rows of a constant table by host ids (negative ones included), the token embedding,
/// and `RMSNormalization` with a constant or an input scale.
fn table_and_norm_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (rows, width, ids) in [
        (50usize, 16usize, vec![3i64, 0, 49, -1, 7]),
        (9, 5, vec![8, 2]),
    ] {
        let table = noise(rows * width, 11);
        let n = ids.len();
        v.push(Case {
            name: format!("Gather [{rows}, {width}] by {n} ids"),
            graph: graph(
                &[("ids", DType::I64, &[1, n])],
                &["y"],
                vec![node("Gather", &["table", "ids"], &["y"], &[])],
                vec![init("table", DType::F32, &[rows, width], &table)],
            ),
            inputs: vec![("ids", Tensor::from_slice(DType::I64, &[1, n], &ids))],
            tol: 0.0,
            gpu: OnGpu::All,
        });
    }
    // The token embedding (`Step::Embedding`: a gather by the graph's `input_ids` from a table in a
    // linear layer's encoding), f32 and f16.
    for dtype in [DType::F32, DType::F16] {
        let (rows, width) = (40usize, 64usize);
        let t = noise(rows * width, 12);
        let table = match dtype {
            DType::F16 => {
                let h: Vec<half::f16> = t.iter().map(|x| half::f16::from_f32(*x)).collect();
                init("table", dtype, &[rows, width], &h)
            }
            _ => init("table", dtype, &[rows, width], &t),
        };
        let ids = [5i64, 39, 0, 17];
        v.push(Case {
            name: format!("embedding [{rows}, {width}] {dtype}"),
            graph: graph(
                &[("input_ids", DType::I64, &[1, ids.len()])],
                &["y"],
                vec![node("Gather", &["table", "input_ids"], &["y"], &[])],
                vec![table],
            ),
            inputs: vec![(
                "input_ids",
                Tensor::from_slice(DType::I64, &[1, ids.len()], &ids),
            )],
            tol: 0.0,
            gpu: OnGpu::All,
        });
    }
    for (shape, constant) in [
        (&[2usize, 64][..], true),
        (&[3, 5, 48], false),
        (&[1, 1, 576], true),
    ] {
        let k = *shape.last().unwrap();
        let scale = noise(k, 13);
        let attrs = [("epsilon", Attr::Float(1e-5)), ("axis", Attr::Int(-1))];
        let kk = [k];
        let (inputs, inits, scale_in): (Vec<(&str, DType, &[usize])>, _, _) = if constant {
            (
                vec![("x", DType::F32, shape)],
                vec![init("scale", DType::F32, &[k], &scale)],
                vec![],
            )
        } else {
            (
                vec![("x", DType::F32, shape), ("scale", DType::F32, &kk[..])],
                vec![],
                vec![("scale", Tensor::f32(&[k], &scale))],
            )
        };
        let mut ins = vec![("x", f32_in(shape, 17))];
        ins.extend(scale_in);
        v.push(Case {
            name: format!("RMSNormalization {shape:?}, constant scale {constant}"),
            graph: graph(
                &inputs,
                &["y"],
                vec![node("RMSNormalization", &["x", "scale"], &["y"], &attrs)],
                inits,
            ),
            inputs: ins,
            tol: 1e-5,
            gpu: OnGpu::All,
        });
    }
    // LayerNormalization (Whisper's), with and without the bias, rows offset from zero.
    for (rows, h, bias) in [(3usize, 384usize, true), (1, 64, false), (2, 1000, true)] {
        let mut inits = vec![init("scale", DType::F32, &[h], &noise(h, 19))];
        let mut ins = vec!["x", "scale"];
        if bias {
            inits.push(init("bias", DType::F32, &[h], &noise(h, 23)));
            ins.push("bias");
        }
        let x: Vec<f32> = noise(rows * h, 29).iter().map(|v| 20.0 + 4.0 * v).collect();
        v.push(Case {
            name: format!("LayerNormalization [{rows}, {h}], bias {bias}"),
            graph: graph(
                &[("x", DType::F32, &[rows, h])],
                &["y"],
                vec![node(
                    "LayerNormalization",
                    &ins,
                    &["y"],
                    &[("epsilon", Attr::Float(1e-5))],
                )],
                inits,
            ),
            inputs: vec![("x", Tensor::f32(&[rows, h], &x))],
            tol: 1e-5,
            gpu: OnGpu::All,
        });
    }
    v
}

/// Cos/sin tables of `rows` positions for head size `d` (rotating all of it).
fn rope_tables(rows: usize, d: usize) -> Vec<Initializer> {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..rows {
        for i in 0..d / 2 {
            let a = p as f32 / 10000f32.powf(2.0 * i as f32 / d as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    vec![
        init("cos", DType::F32, &[rows, d / 2], &cos),
        init("sin", DType::F32, &[rows, d / 2], &sin),
    ]
}

/// `RotaryEmbedding` on `[1, H, T, D]` (both pairings), and the planner's `Transpose` → rotary
/// (`Step::Rope`) on `[1, T, H, D]`, with and without a head norm between (QK-norm).
fn rope_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (h, t, d) in [(4usize, 3usize, 16usize), (2, 1, 64), (3, 7, 8)] {
        let pos: Vec<i64> = (0..t as i64).map(|i| 5 + 3 * i).collect();
        let pos_t = || Tensor::from_slice(DType::I64, &[1, t], &pos);
        for interleaved in [0, 1] {
            v.push(Case {
                name: format!("RotaryEmbedding [1, {h}, {t}, {d}] interleaved {interleaved}"),
                graph: graph(
                    &[
                        ("x", DType::F32, &[1, h, t, d]),
                        ("pos", DType::I64, &[1, t]),
                    ],
                    &["y"],
                    vec![node(
                        "RotaryEmbedding",
                        &["x", "cos", "sin", "pos"],
                        &["y"],
                        &[("interleaved", Attr::Int(interleaved))],
                    )],
                    rope_tables(64, d),
                ),
                inputs: vec![("x", f32_in(&[1, h, t, d], 19)), ("pos", pos_t())],
                tol: 1e-5,
                gpu: OnGpu::All,
            });
        }
        // The planner's transposed rotary, and with a head norm between (QK-norm).
        for norm in [false, true] {
            let transpose = node(
                "Transpose",
                &["x"],
                &["xt"],
                &[("perm", Attr::Ints(vec![0, 2, 1, 3]))],
            );
            let mut nodes = vec![transpose];
            let mut tables = rope_tables(64, d);
            let mut r_in = "xt";
            if norm {
                let eps = ("epsilon", Attr::Float(1e-6));
                nodes.push(node("RMSNormalization", &["xt", "scale"], &["xn"], &[eps]));
                tables.push(init("scale", DType::F32, &[d], &noise(d, 29)));
                r_in = "xn";
            }
            nodes.push(node(
                "RotaryEmbedding",
                &[r_in, "cos", "sin", "pos"],
                &["y"],
                &[],
            ));
            let what = if norm { " → head RMS norm" } else { "" };
            v.push(Case {
                name: format!("Transpose{what} → RotaryEmbedding [1, {t}, {h}, {d}]"),
                graph: graph(
                    &[
                        ("x", DType::F32, &[1, t, h, d]),
                        ("pos", DType::I64, &[1, t]),
                    ],
                    &["y"],
                    nodes,
                    tables,
                ),
                inputs: vec![("x", f32_in(&[1, t, h, d], 23)), ("pos", pos_t())],
                tol: 1e-5,
                gpu: OnGpu::All,
            });
        }
    }
    v
}

/// `TopK` over the last axis: the one- and two-candidate kernels (several rows) and the sort (one row).
fn top_k_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (rows, len, k) in [
        (3usize, 257usize, 1i64),
        (2, 100, 2),
        (1, 1000, 40),
        (1, 5, 5),
    ] {
        v.push(Case {
            name: format!("TopK [{rows}, {len}] k {k}"),
            graph: graph(
                &[("x", DType::F32, &[rows, len])],
                &["vals", "idx"],
                vec![node(
                    "TopK",
                    &["x", "k"],
                    &["vals", "idx"],
                    &[("axis", Attr::Int(-1))],
                )],
                vec![init("k", DType::I64, &[1], &[k])],
            ),
            inputs: vec![("x", f32_in(&[rows, len], 29))],
            tol: 0.0,
            gpu: OnGpu::All,
        });
    }
    v
}

fn gemm(x: &str, w: &str, y: &str) -> Node {
    node("Gemm", &[x, w], &[y], &[("transB", Attr::Int(1))])
}

/// The planner's linear steps over f32 weights (the kernels' other encodings are checked per variant
/// in `linear.rs`): a layer with its bias and its residual `Add` in the epilogue; q/k/v under their
/// RMS norm (`Step::LinearGroup`); gate/up with the SiLU or the GELU-tanh gate (a group, or under the
/// rows variant the layers and `Step::Gate`); a norm with the residual after it; the GELU gate on its
/// own.
fn linear_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (t, k, n) in [(1usize, 64usize, 24usize), (5, 96, 40)] {
        v.push(Case {
            name: format!("Gemm + bias + residual, {t} × {k} → {n}"),
            graph: graph(
                &[("x", DType::F32, &[t, k]), ("r", DType::F32, &[t, n])],
                &["y"],
                vec![
                    node(
                        "Gemm",
                        &["x", "w", "bias"],
                        &["l"],
                        &[("transB", Attr::Int(1))],
                    ),
                    node("Add", &["l", "r"], &["y"], &[]),
                ],
                vec![
                    init("w", DType::F32, &[n, k], &noise(n * k, 31)),
                    init("bias", DType::F32, &[n], &noise(n, 37)),
                ],
            ),
            inputs: vec![("x", f32_in(&[t, k], 41)), ("r", f32_in(&[t, n], 43))],
            tol: 1e-5,
            gpu: OnGpu::All,
        });
        let norm = node(
            "RMSNormalization",
            &["x", "scale"],
            &["nx"],
            &[("epsilon", Attr::Float(1e-5))],
        );
        let mut inits = vec![init("scale", DType::F32, &[k], &noise(k, 47))];
        for (i, (w, rows)) in [("wq", n), ("wk", n / 2), ("wv", n / 2)]
            .into_iter()
            .enumerate()
        {
            inits.push(init(
                w,
                DType::F32,
                &[rows, k],
                &noise(rows * k, 53 + i as u64),
            ));
        }
        v.push(Case {
            name: format!("RMS norm → q/k/v, {t} × {k}"),
            graph: graph(
                &[("x", DType::F32, &[t, k])],
                &["q", "kk", "vv"],
                vec![
                    norm.clone(),
                    gemm("nx", "wq", "q"),
                    gemm("nx", "wk", "kk"),
                    gemm("nx", "wv", "vv"),
                ],
                inits,
            ),
            inputs: vec![("x", f32_in(&[t, k], 59))],
            tol: 1e-5,
            gpu: OnGpu::All,
        });
        let silu = vec![
            node("Sigmoid", &["g"], &["sg"], &[]),
            node("Mul", &["g", "sg"], &["act"], &[]),
        ];
        let gelu = vec![node(
            "Gelu",
            &["g"],
            &["act"],
            &[("approximate", Attr::Str("tanh".into()))],
        )];
        for (name, act) in [("SiLU", silu), ("GELU-tanh", gelu)] {
            let mut nodes = vec![norm.clone(), gemm("nx", "wu", "up"), gemm("nx", "wg", "g")];
            nodes.extend(act);
            nodes.push(node("Mul", &["act", "up"], &["y"], &[]));
            v.push(Case {
                name: format!("RMS norm → gate/up → {name} gate, {t} × {k} → {n}"),
                graph: graph(
                    &[("x", DType::F32, &[t, k])],
                    &["y"],
                    nodes,
                    vec![
                        init("scale", DType::F32, &[k], &noise(k, 61)),
                        init("wu", DType::F32, &[n, k], &noise(n * k, 67)),
                        init("wg", DType::F32, &[n, k], &noise(n * k, 71)),
                    ],
                ),
                inputs: vec![("x", f32_in(&[t, k], 73))],
                tol: 1e-5,
                gpu: OnGpu::All,
            });
        }
        v.push(Case {
            name: format!("RMS norm → residual Add (Step::NormResidual) [{t}, {k}]"),
            graph: graph(
                &[("x", DType::F32, &[t, k]), ("h", DType::F32, &[t, k])],
                &["y"],
                vec![
                    node(
                        "RMSNormalization",
                        &["x", "scale"],
                        &["xn"],
                        &[("epsilon", Attr::Float(1e-6))],
                    ),
                    node("Add", &["h", "xn"], &["y"], &[]),
                ],
                vec![init("scale", DType::F32, &[k], &noise(k, 97))],
            ),
            inputs: vec![("x", f32_in(&[t, k], 101)), ("h", f32_in(&[t, k], 103))],
            tol: 1e-5,
            gpu: OnGpu::All,
        });
        v.push(Case {
            name: format!("GELU gate [{t}, {n}]"),
            graph: graph(
                &[("g", DType::F32, &[t, n]), ("u", DType::F32, &[t, n])],
                &["y"],
                vec![
                    node(
                        "Gelu",
                        &["g"],
                        &["gg"],
                        &[("approximate", Attr::Str("tanh".into()))],
                    ),
                    node("Mul", &["gg", "u"], &["y"], &[]),
                ],
                vec![],
            ),
            inputs: vec![("g", f32_in(&[t, n], 79)), ("u", f32_in(&[t, n], 83))],
            tol: 1e-5,
            gpu: OnGpu::All,
        });
    }
    v
}

/// The contract's token choice (`Step::TokenChoice` after the `TopK`): greedy, and sampled with top-k,
/// top-p and a draw.
fn token_choice_cases() -> Vec<Case> {
    let scalar = |x: f32| Tensor::f32(&[1], &[x]);
    let settings: [(f32, i64, f32, f32); 3] = [
        (0.0, 0, 1.0, 0.5),
        (0.7, 40, 0.9, 0.37),
        (1.3, 5, 0.5, 0.99),
    ];
    settings
        .into_iter()
        .enumerate()
        .map(|(i, (temp, k, p, u))| {
            let logits = Tensor::f32(
                &[1, 100],
                &noise(100, 89 + i as u64)
                    .iter()
                    .map(|x| 3.0 * x)
                    .collect::<Vec<_>>(),
            );
            Case {
                name: format!("token choice: temperature {temp}, top_k {k}, top_p {p}, u {u}"),
                graph: token_choice("before"),
                inputs: vec![
                    ("logits", logits),
                    ("temperature", scalar(temp)),
                    ("top_k", Tensor::from_slice(DType::I64, &[1], &[k])),
                    ("top_p", scalar(p)),
                    ("random_u", scalar(u)),
                ],
                tol: 0.0,
                gpu: OnGpu::Kinds(&["Div", "TopK", "[token choice]"]),
            }
        })
        .collect()
}

fn all_cases() -> Vec<Case> {
    [
        binary_cases(),
        unary_cases(),
        layout_cases(),
        table_and_norm_cases(),
        rope_cases(),
        top_k_cases(),
        linear_cases(),
        token_choice_cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The variants this adapter runs (subgroups only where it has them).
fn variants() -> Vec<Variant> {
    let Some(base) = super::testutil::ctx() else {
        return Vec::new();
    };
    let mut v = vec![Variant::Rows, Variant::Lanes];
    if base.subgroup_min > 0 {
        v.push(Variant::Subgroups);
    }
    v
}

/// `t`'s elements as f32 (f32, f16 or i64 outputs).
fn floats(t: &Tensor) -> Vec<f32> {
    match t.dtype {
        DType::F16 => t.typed::<half::f16>().iter().map(|x| x.to_f32()).collect(),
        DType::I64 => t.typed::<i64>().iter().map(|&x| x as f32).collect(),
        _ => t.typed::<f32>().to_vec(),
    }
}

/// Runs `c` on `ctx`: the kinds of its steps, or what differs, or that a step stayed on the CPU.
fn check(ctx: &Arc<GpuContext>, c: &Case) -> Result<Vec<String>, String> {
    let want = oracle(&c.graph, &c.inputs);
    let r = run_graph(ctx, c.graph.clone(), &c.inputs).map_err(|e| e.to_string())?;
    let on_cpu: Vec<&str> = r
        .kinds
        .iter()
        .filter(|(kind, gpu)| {
            !gpu && match c.gpu {
                OnGpu::All => true,
                OnGpu::Kinds(k) => k.contains(&kind.as_str()),
            }
        })
        .map(|(kind, _)| kind.as_str())
        .collect();
    if !on_cpu.is_empty() {
        return Err(format!(
            "{} of {} steps on the GPU; {on_cpu:?} on the CPU",
            r.gpu_steps(),
            r.kinds.len()
        ));
    }
    for (name, w) in &want {
        let got = r.outputs.get(name).ok_or(format!("no output `{name}`"))?;
        if got.shape != w.shape {
            return Err(format!(
                "`{name}`: shape {:?}, want {:?}",
                got.shape, w.shape
            ));
        }
        if got.dtype != w.dtype {
            return Err(format!("`{name}`: {}, want {}", got.dtype, w.dtype));
        }
        let e = max_rel(&floats(got), &floats(w));
        if e > c.tol {
            return Err(format!("`{name}`: error {e:.2e} over {:.0e}", c.tol));
        }
    }
    Ok(r.kinds.into_iter().map(|(kind, _)| kind).collect())
}

/// The step kinds the cases must reach (all but the two that need a KV cache — the cache attention and
/// the f16 round trip of its rows — which `runtime/tests/step_graphs.rs` runs per variant).
const KINDS: &[&str] = &[
    "[embedding]",
    "[linear]",
    "[linear group]",
    "[silu gate]",
    "[gelu gate]",
    "[transposed rotary]",
    "[token choice]",
];

/// Every case under every variant, on GPU kernels, matches the generic CPU ops.
#[test]
fn every_gpu_op_and_step_kind_matches_the_cpu_ops_under_every_variant() {
    let variants = variants();
    if variants.is_empty() {
        return;
    }
    let cases = all_cases();
    let mut wrong = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for variant in &variants {
        let options = GpuOptions {
            variant: Some(*variant),
            ..GpuOptions::default()
        };
        let ctx = GpuContext::with_options(
            &DeviceRequest::Gpu(None),
            BackendFilter::Any,
            options,
            false,
        )
        .expect("the adapter testutil::ctx opened");
        for c in &cases {
            match check(&ctx, c) {
                Ok(labels) => kinds.extend(labels),
                Err(e) => wrong.push(format!("{variant:?}: {}: {e}", c.name)),
            }
        }
    }
    println!(
        "{} cases × {} variants ({variants:?}); step kinds: {kinds:?}",
        cases.len(),
        variants.len()
    );
    for k in KINDS {
        if !kinds.contains(*k) {
            wrong.push(format!("no case reached the step kind {k}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The check can fail: an error over the tolerance is reported (a tolerance no result meets), and so is
/// a case the GPU leaves to the CPU.
#[test]
fn a_wrong_result_or_a_cpu_step_is_reported() {
    let Some(ctx) = super::testutil::ctx() else {
        return;
    };
    let mut c = unary_cases().remove(0);
    c.tol = -1.0;
    assert!(check(&ctx, &c).unwrap_err().contains("error"));
    let cpu_only = Case {
        name: "Softmax".into(),
        graph: graph(
            &[("x", DType::F32, &[2, 8])],
            &["y"],
            vec![node("Softmax", &["x"], &["y"], &[("axis", Attr::Int(-1))])],
            vec![],
        ),
        inputs: vec![("x", f32_in(&[2, 8], 1))],
        tol: 1e-6,
        gpu: OnGpu::All,
    };
    assert!(check(&ctx, &cpu_only)
        .unwrap_err()
        .contains("steps on the GPU"));
}
