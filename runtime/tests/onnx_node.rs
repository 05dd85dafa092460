//! ONNX's own backend node tests — written by no one here: `scripts/onnx-node-cases` exports them from the
//! pinned `onnx` package — run through the runtime's generic CPU ops
//! ((`onestep::testing::run_node`), the oracle every kernel and fusion is checked against),
//! every case whose nodes are all in the supported list.
//!
//! A case that cannot pass is listed in `tests/onnx_node_skips.txt` (a name or a `*` pattern, then the
//! reason); a listed case that passes, or a line that matches no case, fails the test, so the list stays
//! true. The per-op table (passed / skipped / failed) is printed.
//!
//! The same cases run on the GPU (lavapipe in CI) through `onestep::testing::run_graph`:
//! every step a kernel takes on the GPU, the rest on the CPU. Each case the CPU passes must pass there
//! too, unless `tests/onnx_node_gpu_skips.txt` lists it with the reason (kept true the same way); the
//! table says per op how many ran a GPU kernel and how many the GPU left to the CPU. They run under
//! every kernel variant the adapter has (`Rows`, `Lanes`, `Subgroups`), one table each.
//!
//! `ONESTEP_ONNX_NODE_DIR` names the cases' folder (scripts/test writes it under `cache/`); without it
//! the tests say so and run nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use onestep::graph::DType;
use onestep::onnx::{proto, read};
use onestep::tensor::Tensor;
use onestep::testing::run_node;
use prost::Message;

mod common;

/// Relative and absolute tolerance of float outputs (onnx's backend test defaults); bf16 outputs get one
/// unit in the last place of their 8-bit mantissa (2^-7) relative, since a reference that rounds its
/// intermediates to bf16 and one that rounds only the result differ by that much.
const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-7;
const RTOL_BF16: f64 = 1.0 / 128.0;

fn skips() -> Vec<(String, String)> {
    skip_list("tests/onnx_node_skips.txt")
}

/// A skip list: a name or `*` pattern per line, then the reason.
fn skip_list(file: &str) -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (p, why) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            assert!(!why.trim().is_empty(), "skip `{p}` has no reason");
            (p.to_string(), why.trim().to_string())
        })
        .collect()
}

/// `*` matches any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len()).any(|i| glob(rest, &name[head.len() + i..]))
        }
    }
}

fn tensor(path: &Path) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = proto::TensorProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    let init = read::convert_tensor(&t).map_err(|e| e.to_string())?;
    Ok(Tensor::mapped(init.dtype, &init.dims, init.data))
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    match t.dtype {
        DType::F32 => t.typed::<f32>().iter().map(|&v| v as f64).collect(),
        DType::F16 => t
            .typed::<u16>()
            .iter()
            .map(|&v| half::f16::from_bits(v).to_f64())
            .collect(),
        DType::BF16 => t
            .typed::<u16>()
            .iter()
            .map(|&v| half::bf16::from_bits(v).to_f64())
            .collect(),
        _ => unreachable!("floats only"),
    }
}

/// Whether `got` equals `want`: same dtype and shape; floats within [`RTOL`] ([`RTOL_BF16`]) and [`ATOL`]
/// (NaN matching NaN, infinities exactly), other types bit for bit.
fn compare(name: &str, got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dtype != want.dtype || got.shape != want.shape {
        return Err(format!(
            "`{name}`: {} {:?}, expected {} {:?}",
            got.dtype, got.shape, want.dtype, want.shape
        ));
    }
    if matches!(want.dtype, DType::F32 | DType::F16 | DType::BF16) {
        let rtol = if want.dtype == DType::BF16 {
            RTOL_BF16
        } else {
            RTOL
        };
        for (i, (a, b)) in as_f64(got).iter().zip(as_f64(want)).enumerate() {
            let ok =
                (a.is_nan() && b.is_nan()) || a == &b || (a - b).abs() <= ATOL + rtol * b.abs();
            if !ok {
                return Err(format!("`{name}`[{i}]: {a}, expected {b}"));
            }
        }
        Ok(())
    } else if got.bytes() != want.bytes() {
        Err(format!("`{name}`: values differ"))
    } else {
        Ok(())
    }
}

/// Runs one case's every data set through the generic ops, node by node: `Ok` when every output matches.
fn run_case(dir: &Path) -> Result<(), String> {
    if let Ok(why) = std::fs::read_to_string(dir.join("unexported.txt")) {
        return Err(format!("not exportable as tensors: {}", why.trim()));
    }
    let (graph, sets) = case_data(dir)?;
    let opset = graph.opsets.get("").copied().unwrap_or(0);
    if !(13..=onestep::load::MAX_OPSET).contains(&opset) {
        return Err(format!(
            "opset {opset}: the loader accepts 13..={}",
            onestep::load::MAX_OPSET
        ));
    }
    for (inputs, want) in sets {
        // (an input named like an initializer overrides it)
        let mut env: HashMap<String, Tensor> = graph
            .initializers
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    Tensor::mapped(i.dtype, &i.dims, i.data.clone()),
                )
            })
            .collect();
        env.extend(inputs);
        for node in &graph.nodes {
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|n| if n.is_empty() { None } else { env.get(n) })
                .collect();
            let outs =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_node(node, &ins)))
                    .map_err(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        format!("PANIC in `{}` ({}): {msg}", node.name, node.op)
                    })?
                    .map_err(|e| e.to_string())?;
            for (name, t) in node.outputs.iter().zip(outs) {
                if !name.is_empty() {
                    env.insert(name.clone(), t);
                }
            }
        }
        for (output, w) in graph.outputs.iter().zip(&want) {
            let got = env
                .get(&output.name)
                .ok_or_else(|| format!("`{}` was not computed", output.name))?;
            compare(&output.name, got, w)?;
        }
    }
    Ok(())
}

/// One case's graph and data sets (inputs by name, expected outputs in order).
type Sets = Vec<(Vec<(String, Tensor)>, Vec<Tensor>)>;

fn case_data(dir: &Path) -> Result<(onestep::graph::Graph, Sets), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let graph = read::decode_model(bytes.into(), "model.onnx").map_err(|e| e.to_string())?;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut sets = Vec::new();
    for set in dirs {
        let mut inputs = Vec::new();
        for (j, input) in graph.inputs.iter().enumerate() {
            let p = set.join(format!("input_{j}.pb"));
            if p.exists() {
                inputs.push((input.name.clone(), tensor(&p)?));
            }
        }
        let outputs = (0..graph.outputs.len())
            .map(|j| tensor(&set.join(format!("output_{j}.pb"))))
            .collect::<Result<_, _>>()?;
        sets.push((inputs, outputs));
    }
    Ok((graph, sets))
}

/// Runs one case's every data set on the GPU: `Ok(true)` when every output matches and a GPU kernel
/// ran, `Ok(false)` when they match and the GPU left every step to the CPU.
#[cfg(feature = "gpu")]
fn run_case_gpu(
    dir: &Path,
    ctx: &std::sync::Arc<onestep::testing::GpuContext>,
) -> Result<bool, String> {
    use onestep::testing::run_graph;
    let (graph, sets) = case_data(dir)?;
    let mut on_gpu = false;
    for (inputs, want) in sets {
        let named: Vec<(&str, Tensor)> = inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_graph(ctx, graph.clone(), &named)
        }))
        .map_err(|_| "PANIC".to_string())?
        .map_err(|e| e.to_string())?;
        on_gpu |= r.gpu_steps() > 0;
        for (output, w) in graph.outputs.iter().zip(&want) {
            let got = r
                .outputs
                .get(&output.name)
                .ok_or_else(|| format!("`{}` was not computed", output.name))?;
            compare(&output.name, got, w)?;
        }
    }
    Ok(on_gpu)
}

/// The op a case tests: its node's, or `expanded` for a function's expansion into several nodes.
fn op_of(dir: &Path) -> String {
    let bytes = std::fs::read(dir.join("model.onnx")).unwrap_or_default();
    match proto::ModelProto::decode(bytes.as_slice()).map(|m| m.graph.unwrap_or_default().node) {
        Ok(nodes) if nodes.len() == 1 => nodes[0].op_type.clone().unwrap_or_default(),
        Ok(_) => "(expanded functions)".into(),
        Err(_) => "(undecodable)".into(),
    }
}

/// The case folders under `root`, in name order.
fn cases(root: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").exists())
        .collect();
    cases.sort();
    cases
}

#[test]
fn onnx_backend_node_tests() {
    let Some(root) = std::env::var_os("ONESTEP_ONNX_NODE_DIR").map(PathBuf::from) else {
        eprintln!(
            "note: ONESTEP_ONNX_NODE_DIR is not set (scripts/onnx-node-cases writes the cases): not run"
        );
        return;
    };
    let skips = skips();
    let cases = cases(&root);
    assert!(
        cases.len() > 400,
        "only {} cases in {}",
        cases.len(),
        root.display()
    );
    // op → (passed, skipped, failed)
    let mut table: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let mut used = vec![false; skips.len()];
    let mut wrong = Vec::new();
    for dir in &cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let skip = skips.iter().position(|(p, _)| glob(p, &name));
        let row = table.entry(op_of(dir)).or_default();
        match (run_case(dir), skip) {
            (Ok(()), None) => row.0 += 1,
            (Ok(()), Some(k)) => {
                wrong.push(format!(
                    "{name}: passes, but `{}` skips it ({})",
                    skips[k].0, skips[k].1
                ));
                row.0 += 1;
            }
            (Err(e), Some(k)) => {
                used[k] = true;
                row.1 += 1;
                if e.contains("PANIC") {
                    wrong.push(format!("{name}: skipped, but it panics: {e}"));
                }
            }
            (Err(e), None) => {
                wrong.push(format!("{name}: {e}"));
                row.2 += 1;
            }
        }
    }
    println!(
        "{:<28} {:>7} {:>8} {:>7}",
        "op", "passed", "skipped", "failed"
    );
    let mut total = (0, 0, 0);
    for (op, (p, s, f)) in &table {
        println!("{op:<28} {p:>7} {s:>8} {f:>7}");
        total = (total.0 + p, total.1 + s, total.2 + f);
    }
    println!("{:<28} {:>7} {:>8} {:>7}", "all", total.0, total.1, total.2);
    for (k, (p, why)) in skips.iter().enumerate() {
        if !used[k] {
            wrong.push(format!("skip `{p}` ({why}) matches no failing case"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// ONNX's node cases on the GPU: every case the CPU passes, through the GPU kernels where they take
/// it, under every kernel variant the adapter runs (rows; lanes; subgroups where it has them).
#[cfg(feature = "gpu")]
#[test]
fn onnx_backend_node_tests_on_the_gpu() {
    use onestep::gpu::{BackendFilter, DeviceRequest, GpuOptions, Variant};
    use onestep::testing::GpuContext;
    let Some(root) = std::env::var_os("ONESTEP_ONNX_NODE_DIR").map(PathBuf::from) else {
        eprintln!("note: ONESTEP_ONNX_NODE_DIR is not set: not run");
        return;
    };
    let Some(base) = common::gpu("ONNX's node cases") else {
        return;
    };
    let mut variants = vec![Variant::Rows, Variant::Lanes];
    if base.subgroup_min > 0 {
        variants.push(Variant::Subgroups);
    }
    let (cpu_skips, skips) = (skips(), skip_list("tests/onnx_node_gpu_skips.txt"));
    let cases = cases(&root);
    let mut used = vec![false; skips.len()];
    let mut wrong = Vec::new();
    for variant in variants {
        let options = GpuOptions {
            variant: Some(variant),
            ..GpuOptions::default()
        };
        let ctx = GpuContext::with_options(
            &DeviceRequest::Gpu(None),
            BackendFilter::Any,
            options,
            false,
        )
        .expect("the adapter opened once opens again");
        // op → (passed on a GPU kernel, passed on the CPU only, skipped, failed)
        let mut table: BTreeMap<String, (usize, usize, usize, usize)> = BTreeMap::new();
        for dir in &cases {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            if cpu_skips.iter().any(|(p, _)| glob(p, &name)) {
                continue;
            }
            let skip = skips.iter().position(|(p, _)| glob(p, &name));
            let row = table.entry(op_of(dir)).or_default();
            match (run_case_gpu(dir, &ctx), skip) {
                (Ok(true), None) => row.0 += 1,
                (Ok(false), None) => row.1 += 1,
                (Ok(_), Some(k)) => {
                    wrong.push(format!(
                        "{variant:?}: {name}: passes on the GPU, but `{}` skips it ({})",
                        skips[k].0, skips[k].1
                    ));
                    row.0 += 1;
                }
                (Err(_), Some(k)) => {
                    used[k] = true;
                    row.2 += 1;
                }
                (Err(e), None) => {
                    wrong.push(format!("{variant:?}: {name}: {e}"));
                    row.3 += 1;
                }
            }
        }
        print_gpu_table(&format!("{variant:?}"), &table);
    }
    for (k, (p, why)) in skips.iter().enumerate() {
        if !used[k] {
            wrong.push(format!("GPU skip `{p}` ({why}) matches no failing case"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The GPU table of one variant: per op, the cases passed on a GPU kernel, on the CPU only, skipped,
/// failed (ops the GPU never took left out).
#[cfg(feature = "gpu")]
fn print_gpu_table(variant: &str, table: &BTreeMap<String, (usize, usize, usize, usize)>) {
    println!(
        "{:<28} {:>7} {:>9} {:>8} {:>7}",
        format!("op ({variant})"),
        "gpu",
        "cpu only",
        "skipped",
        "failed"
    );
    let mut total = (0, 0, 0, 0);
    for (op, (g, c, s, f)) in table {
        if g + s + f > 0 {
            println!("{op:<28} {g:>7} {c:>9} {s:>8} {f:>7}");
        }
        total = (total.0 + g, total.1 + c, total.2 + s, total.3 + f);
    }
    println!(
        "{:<28} {:>7} {:>9} {:>8} {:>7}",
        "all", total.0, total.1, total.2, total.3
    );
}
