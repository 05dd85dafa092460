//! The exported step graph runs unchanged in tract (`tract-onnx` 0.23) and gives the outputs of the
//! onestep runtime.
//!
//! Each case exports a committed tiny Hugging Face fixture with the exporter library into a temporary
//! folder, then runs the same schedule in tract and in `onestep::Model`: prefill `T = 5` at position 0,
//! six single-token steps (feeding the chosen token), then a `T = 3` chunk. tract is given the file as
//! it is; the test owns its cache the way any ONNX caller does (feeds `past.*`, writes `new.*` at
//! `position`). Asserts equal next tokens and logits within 1e-4 of the largest |logit| (1e-3 with an f16
//! cache, see [`TOLERANCE_F16_CACHE`]), and prints one summary line per model (`--nocapture`;
//! `TRACT_CHECK_VERBOSE=1` prints every step's difference).
//!
//! `tract_refuses_bf16_and_gguf_block_forms` pins what tract does not run (bf16 weights; GGUF Q8_0,
//! Q4_0 and Q4_1 kept as source), so the compatibility note in docs/GRAPH.md stays true: if a tract release
//! accepts them, that test fails and the note should be updated.

use std::path::{Path, PathBuf};

use onestep::graph::DType;
use onestep::{LoadOptions, Model, Precision, StepSampling};
use onestep_export::quant::{self, testutil, Quantize};
use onestep_export::source::{self, SourceDType, SourceModel};
use onestep_export::{export, ExportOptions, NoProgress};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::{bail, ensure, DimLike, Factoid, TractErrorContext};

/// Logits may differ by this much, relative to the largest |logit| of the step, with an f32 cache (the
/// same f32 math in both engines; measured ≤ 2e-6).
const TOLERANCE: f32 = 1e-4;
/// With an f16 cache: the engines' f32 rows differ in the last bits, so now and then an element rounds
/// to the neighbouring f16 (2^-11 relative) and stays so in the cache; one such flip moved the logits by
/// 1.4e-4 of max |logit| on tiny/llama (measured; before it, ≤ 2e-6 as with f32).
const TOLERANCE_F16_CACHE: f32 = 1e-3;
const MAX_CACHE: usize = 32;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(name)
}

/// A fresh temporary folder for one case (removed by the case when it passes).
fn workdir(case: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("onestep-tract-check-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn export_to(src: &SourceModel, dir: &Path, quantize: Quantize, kv: DType) -> PathBuf {
    let path = dir.join("model.onnx");
    let opts = ExportOptions {
        max_cache: MAX_CACHE,
        max_chunk: 8,
        kv_dtype: kv,
        quantize,
        generation: None,
    };
    export(src, &path, &opts, &mut NoProgress).expect("export");
    path
}

/// The step graph loaded in tract, with the caller-owned cache.
struct TractStep {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// `past.*` name → cache tensor `[1, kvh, MAX_CACHE, D]`.
    cache: Vec<(String, Tensor)>,
}

fn load_tract(path: &Path) -> TractResult<TractStep> {
    let im = tract_onnx::onnx().model_for_path(path)?;
    let inputs: Vec<String> = im
        .input_outlets()?
        .iter()
        .map(|o| im.node(o.node).name.clone())
        .collect();
    let outputs: Vec<String> = im
        .output_outlets()?
        .iter()
        .map(|o| {
            im.outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| im.node(o.node).name.clone())
        })
        .collect();
    // The cache inputs' shapes and dtype, as declared by the file.
    let mut cache = Vec::new();
    for (o, name) in im.input_outlets()?.iter().zip(&inputs) {
        if name.starts_with("past.") {
            let fact = im.outlet_fact(*o)?;
            let dt = fact
                .datum_type
                .concretize()
                .context("cache input without a dtype")?;
            let shape: Vec<usize> = fact
                .shape
                .concretize()
                .context("cache input without a shape")?
                .iter()
                .map(|d| d.to_usize().map_err(|e| TractError::msg(format!("{e:?}"))))
                .collect::<TractResult<_>>()?;
            // Garbage (not zeros) in the unused slots: the graph must mask them out.
            let n: usize = shape.iter().product();
            let garbage: Vec<f32> = (0..n).map(|i| ((i * 7919) % 997) as f32 - 498.0).collect();
            let t = Tensor::from_shape(&shape, &garbage)?
                .cast_to_dt(dt)?
                .into_owned();
            cache.push((name.clone(), t));
        }
    }
    let plan = im.into_optimized()?.into_runnable()?;
    Ok(TractStep {
        plan,
        inputs,
        outputs,
        cache,
    })
}

impl TractStep {
    /// One greedy step of `ids` at `position`: writes the new rows into the cache, returns the chosen
    /// token and the logits.
    fn step(&mut self, ids: &[u32], position: usize) -> TractResult<(u32, Vec<f32>)> {
        let t = ids.len();
        let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let mut feed: TVec<TValue> = tvec![];
        for name in &self.inputs {
            let v: Tensor = match name.as_str() {
                "input_ids" => Tensor::from_shape(&[1, t], &ids64)?,
                "position" => tensor1(&[position as i64]),
                "temperature" => tensor1(&[0f32]),
                "top_k" => tensor1(&[0i64]),
                "top_p" => tensor1(&[1f32]),
                "random_u" => tensor1(&[0f32]),
                other => self
                    .cache
                    .iter()
                    .find(|(n, _)| n == other)
                    .map(|(_, c)| c.clone())
                    .with_context(|| format!("unexpected input {other}"))?,
            };
            feed.push(v.into_tvalue());
        }
        let out = self.plan.run(feed)?;
        ensure!(out.len() == self.outputs.len(), "output count");
        let mut token = None;
        let mut logits = None;
        for (name, v) in self.outputs.iter().zip(out.iter()) {
            match name.as_str() {
                "next_token" => {
                    let v = v.cast_to::<i64>()?;
                    token = Some(v.try_as_plain_ram()?.as_slice::<i64>()?[0] as u32);
                }
                "logits" => {
                    logits = Some(v.try_as_plain_ram()?.as_slice::<f32>()?.to_vec());
                }
                n if n.starts_with("new.") => {
                    let past = format!("past.{}", &n["new.".len()..]);
                    let (_, cache) = self
                        .cache
                        .iter_mut()
                        .find(|(c, _)| *c == past)
                        .with_context(|| format!("no cache input for {n}"))?;
                    write_rows(cache, v, position)?;
                }
                other => bail!("unexpected output {other}"),
            }
        }
        Ok((
            token.context("no next_token")?,
            logits.context("no logits")?,
        ))
    }
}

/// `cache[0, :, position .. position+T, :] = rows[0, :, :, :]` (both `[1, kvh, ·, D]`, same dtype).
fn write_rows(cache: &mut Tensor, rows: &Tensor, position: usize) -> TractResult<()> {
    ensure!(
        cache.datum_type() == rows.datum_type(),
        "cache is {:?}, new rows are {:?}",
        cache.datum_type(),
        rows.datum_type()
    );
    let (cs, rs) = (cache.shape().to_vec(), rows.shape().to_vec());
    ensure!(
        cs.len() == 4 && rs.len() == 4 && cs[1] == rs[1] && cs[3] == rs[3],
        "rows {rs:?} do not fit cache {cs:?}"
    );
    let (heads, slots, t, d) = (cs[1], cs[2], rs[2], rs[3]);
    ensure!(position + t <= slots, "rows past the cache end");
    let es = cache.datum_type().size_of();
    let src = rows.try_as_plain_ram()?;
    let src = src.as_bytes();
    let mut dst = cache.try_as_plain_ram_mut()?;
    let dst = dst.as_bytes_mut();
    for h in 0..heads {
        let from = h * t * d * es;
        let to = (h * slots + position) * d * es;
        dst[to..to + t * d * es].copy_from_slice(&src[from..from + t * d * es]);
    }
    Ok(())
}

/// Runs the schedule in both engines; returns the largest relative logits difference.
fn compare(label: &str, path: &Path) -> f32 {
    // f32 activations: the math tract runs (the CPU's default, `fast`, would quantize them to 8 bits)
    let exact = LoadOptions {
        precision: Precision::Exact,
        ..LoadOptions::cpu()
    };
    let ours =
        Model::load_with(path, &exact).unwrap_or_else(|e| panic!("{label}: onestep load: {e}"));
    let tolerance = match ours.info().kv_dtype {
        DType::F32 => TOLERANCE,
        _ => TOLERANCE_F16_CACHE,
    };
    let mut state = ours.new_state().expect("state");
    let mut tract = load_tract(path).unwrap_or_else(|e| panic!("{label}: tract load: {e:?}"));
    let vocab = ours.info().vocab_size as u32;
    // fixed, spread-out token ids
    let ids = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 97 + salt * 31 + 5) % vocab)
            .collect()
    };
    let mut chunks: Vec<Vec<u32>> = vec![ids(5, 1)];
    let mut worst = 0f32;
    let mut position = 0;
    let mut step_no = 0;
    while step_no < 8 {
        let chunk = chunks.pop().expect("a chunk");
        let a = ours
            .step(&mut state, &chunk, &StepSampling::GREEDY)
            .unwrap_or_else(|e| panic!("{label}: onestep step {step_no}: {e}"));
        let (tok, logits) = tract
            .step(&chunk, position)
            .unwrap_or_else(|e| panic!("{label}: tract step {step_no}: {e:?}"));
        assert_eq!(logits.len(), a.logits.len(), "{label}: logits length");
        let scale = a.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{label}: all-zero logits");
        let diff = a
            .logits
            .iter()
            .zip(&logits)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let rel = diff / scale;
        if std::env::var_os("TRACT_CHECK_VERBOSE").is_some() {
            println!(
                "  {label} step {step_no} T={} pos {position}: rel {rel:.2e}",
                chunk.len()
            );
        }
        assert!(
            rel <= tolerance,
            "{label}: step {step_no} (T={}, position {position}): logits differ by {rel:.2e} of max |logit| {scale}",
            chunk.len()
        );
        assert_eq!(
            a.next_token, tok,
            "{label}: step {step_no}: next token differs"
        );
        worst = worst.max(rel);
        position += chunk.len();
        step_no += 1;
        // six single-token steps feeding the chosen token, then a chunk of three
        chunks.push(if step_no < 7 { vec![tok] } else { ids(3, 2) });
    }
    assert_eq!(position, 5 + 6 + 3);
    worst
}

fn check(label: &str, fixture_name: &str, quantize: Quantize, kv: DType) {
    let src = source::open(&fixture(fixture_name)).expect("fixture");
    let dir = workdir(label);
    let path = export_to(&src, &dir, quantize, kv);
    let worst = compare(label, &path);
    let tolerance = if kv == DType::F32 {
        TOLERANCE
    } else {
        TOLERANCE_F16_CACHE
    };
    println!("tract-check {label}: max rel logits diff {worst:.2e} over 8 steps (tolerance {tolerance:.0e})");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn llama_f32_kv_f16() {
    check("llama_f32_kvf16", "llama", Quantize::Keep, DType::F16);
}

#[test]
fn llama_f32_kv_f32() {
    check("llama_f32_kvf32", "llama", Quantize::Keep, DType::F32);
}

#[test]
fn qwen2_f16_tied_bias() {
    // tiny/qwen2 is bf16, which tract does not read (see the refusal test): run it as f16
    check("qwen2_f16_kvf16", "qwen2", Quantize::F16, DType::F16);
    check("qwen2_f16_kvf32", "qwen2", Quantize::F16, DType::F32);
}

#[test]
fn llama_int4() {
    check("llama_int4_kvf16", "llama", Quantize::Int4, DType::F16);
}

#[test]
fn qwen2_int4_tied_embedding() {
    // the tied int4 table also feeds the embedding's Gather path (packed zero points unpacked in-graph)
    check("qwen2_int4_kvf32", "qwen2", Quantize::Int4, DType::F32);
}

#[test]
fn llama_int8() {
    check("llama_int8_kvf32", "llama", Quantize::Int8, DType::F32);
}

#[test]
fn llama_f16() {
    check("llama_f16_kvf32", "llama", Quantize::F16, DType::F32);
}

/// tiny/llama with every matrix re-encoded as GGUF `dtype` blocks (what a GGUF file holds).
fn as_gguf_blocks(dtype: SourceDType) -> SourceModel {
    let mut src = source::open(&fixture("llama")).expect("fixture");
    for (name, t) in src.tensors.iter_mut() {
        if t.shape.len() == 2 {
            let v = quant::dequantize_source(name, t).expect("dequantize");
            let data = match dtype {
                SourceDType::Q8_0 => testutil::make_q8_0(&v),
                SourceDType::Q4_1 => testutil::make_q4_1(&v),
                SourceDType::Q4_0 => testutil::make_q4_0(&v),
                _ => unreachable!("block dtypes only"),
            };
            t.dtype = dtype;
            t.data = data.into();
        }
    }
    src
}

#[test]
fn tract_refuses_bf16_and_gguf_block_forms() {
    for (dtype, label, reason) in [
        (
            SourceDType::Q8_0,
            "q8_0",
            "only bits=4 and bits=2 are supported",
        ),
        (SourceDType::Q4_1, "q4_1", "accessed as U8"),
        (SourceDType::Q4_0, "q4_0", "accessed as U8"),
        // bf16 weights (kept from a bf16 source such as tiny/qwen2): tract has no bf16 tensors
        (SourceDType::BF16, "bf16", "Unknown DatumType Bfloat16"),
    ] {
        let dir = workdir(label);
        let src = if dtype == SourceDType::BF16 {
            source::open(&fixture("qwen2")).expect("fixture")
        } else {
            as_gguf_blocks(dtype)
        };
        let path = export_to(&src, &dir, Quantize::Keep, DType::F16);
        // our runtime runs it ...
        let ours = Model::load(&path).expect("onestep loads the GGUF forms");
        let mut state = ours.new_state().expect("state");
        ours.step(&mut state, &[3, 4, 5], &StepSampling::GREEDY)
            .expect("onestep runs the GGUF forms");
        // ... tract does not, for the stated reason
        let err = match load_tract(&path) {
            Ok(_) => panic!(
                "{label}: tract now accepts this form: update docs/GRAPH.md's compatibility note and this test"
            ),
            Err(e) => format!("{e:?}"),
        };
        assert!(
            err.contains(reason),
            "{label}: tract refused for another reason than {reason:?}: {err}"
        );
        println!("tract-check {label}: refused by tract as expected ({reason})");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
