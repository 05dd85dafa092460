//! End-to-end exports of small random llama/qwen2 models in every weight form.
//!
//! `exports_every_variant` checks the written files in Rust (contract names, metadata, alignment).
//! `onnxruntime_matches_numpy_reference` also dumps the reference weights and runs
//! `scripts/ort_run_step.py`, which compares onnxruntime's steps against a NumPy forward pass; it needs
//! python3 with onnxruntime and numpy (scripts/setup installs them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use half::{bf16, f16};
use onestep::contract;
use onestep::gpu::DeviceRequest;
use onestep::graph::DType;
use onestep::onnx::proto;
use onestep_export::quant::{self, testutil, Quantize};
use onestep_export::source::{
    canonical, ModelConfig, RopeScaling, SourceDType, SourceModel, SourceTensor, TokenizerData,
};
use onestep_export::{export, ExportOptions, NoProgress};
use prost::Message;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 64;
const FFN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const VOCAB: usize = 96;
const MAX_CACHE: usize = 32;

#[derive(Clone)]
struct Case {
    name: &'static str,
    arch: &'static str,
    tied: bool,
    linear: SourceDType,
    embd: SourceDType,
    output: SourceDType,
    quantize: Quantize,
    kv: DType,
    interleaved: bool,
    scaling: Option<RopeScaling>,
    /// Hidden size (`HIDDEN` unless a case needs an odd number of blocks per row).
    hidden: usize,
}

fn cases() -> Vec<Case> {
    use SourceDType::*;
    let base = Case {
        name: "",
        arch: "llama",
        tied: false,
        linear: F32,
        embd: F32,
        output: F32,
        quantize: Quantize::Keep,
        kv: DType::F16,
        interleaved: true,
        scaling: None,
        hidden: HIDDEN,
    };
    vec![
        Case {
            name: "f32_untied_kvf16",
            ..base.clone()
        },
        Case {
            name: "f32_tied_kvf32",
            tied: true,
            kv: DType::F32,
            interleaved: false,
            ..base.clone()
        },
        Case {
            name: "q4_0_q8emb_tied",
            tied: true,
            linear: Q4_0,
            embd: Q8_0,
            ..base.clone()
        },
        Case {
            name: "q4_1_f16emb_q8out",
            linear: Q4_1,
            embd: F16,
            output: Q8_0,
            ..base.clone()
        },
        Case {
            name: "q4_1_q4_1emb_tied",
            tied: true,
            linear: Q4_1,
            embd: Q4_1,
            kv: DType::F32,
            ..base.clone()
        },
        Case {
            name: "qwen2_bf16_bias",
            arch: "qwen2",
            linear: BF16,
            embd: BF16,
            output: BF16,
            interleaved: false,
            ..base.clone()
        },
        Case {
            name: "int8_tied",
            tied: true,
            quantize: Quantize::Int8,
            ..base.clone()
        },
        Case {
            name: "int4_from_q8",
            linear: Q8_0,
            quantize: Quantize::Int4,
            ..base.clone()
        },
        Case {
            // hidden 96: three blocks per row, so each row's packed zero points end in a padding
            // nibble (the tied table's embedding path drops it)
            name: "int4_tied_odd_blocks",
            tied: true,
            quantize: Quantize::Int4,
            kv: DType::F32,
            interleaved: false,
            hidden: 96,
            ..base.clone()
        },
        Case {
            name: "f16_from_q4_0",
            linear: Q4_0,
            quantize: Quantize::F16,
            ..base.clone()
        },
        // GGUF K-quants and Q5 (rows of 256; the 64- and 128-wide inputs of attn_output and ffn_down
        // fall back to Q5_0, as llama.cpp's quantizer does for rows that are not whole super-blocks)
        Case {
            name: "q4_k_q6_k_emb_tied",
            tied: true,
            linear: Q4_K,
            embd: Q6_K,
            kv: DType::F32,
            hidden: 256,
            ..base.clone()
        },
        Case {
            name: "q5_k_q5_1_emb_q6_k_out",
            linear: Q5_K,
            embd: Q5_1,
            output: Q6_K,
            hidden: 256,
            ..base.clone()
        },
        Case {
            name: "q5_1_q4_k_emb_q5_0_out",
            linear: Q5_1,
            embd: Q4_K,
            output: Q5_0,
            interleaved: false,
            hidden: 256,
            ..base.clone()
        },
        Case {
            name: "int4_from_q6_k",
            linear: Q6_K,
            quantize: Quantize::Int4,
            hidden: 256,
            ..base.clone()
        },
        Case {
            name: "llama3_scaling",
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8,
            }),
            ..base.clone()
        },
        Case {
            name: "linear_scaling",
            scaling: Some(RopeScaling::Linear { factor: 2.0 }),
            interleaved: false,
            ..base
        },
    ]
}

fn encode(dtype: SourceDType, v: &[f32]) -> Vec<u8> {
    match dtype {
        SourceDType::F32 => bytemuck::cast_slice::<f32, u8>(v).to_vec(),
        SourceDType::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        SourceDType::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        block => testutil::make_blocks(block, v),
    }
}

fn source(case: &Case, seed: u64) -> SourceModel {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    let mut add = |r: &mut rand::rngs::StdRng,
                   name: String,
                   dtype: SourceDType,
                   shape: Vec<usize>,
                   center: f32,
                   spread: f32| {
        let n: usize = shape.iter().product();
        let dtype = if shape[shape.len() - 1].is_multiple_of(dtype.block_elems()) {
            dtype
        } else {
            SourceDType::Q5_0
        };
        let v: Vec<f32> = (0..n)
            .map(|_| center + r.random_range(-spread..spread))
            .collect();
        tensors.insert(
            name,
            SourceTensor {
                dtype,
                shape,
                data: Bytes::from(encode(dtype, &v)),
            },
        );
    };
    let lin = case.linear;
    let ws = |k: usize| 1.7 / (k as f32).sqrt();
    add(
        &mut r,
        canonical::TOKEN_EMBD.into(),
        case.embd,
        vec![VOCAB, case.hidden],
        0.0,
        1.0,
    );
    add(
        &mut r,
        canonical::OUTPUT_NORM.into(),
        SourceDType::F32,
        vec![case.hidden],
        1.0,
        0.3,
    );
    if !case.tied {
        add(
            &mut r,
            canonical::OUTPUT.into(),
            case.output,
            vec![VOCAB, case.hidden],
            0.0,
            ws(case.hidden) * 3.0,
        );
    }
    for i in 0..LAYERS {
        let b = |s: &str| canonical::blk(i, s);
        // norms in f32 and (for one) f16, as GGUF/HF may store them
        add(
            &mut r,
            b("attn_norm.weight"),
            SourceDType::F32,
            vec![case.hidden],
            1.0,
            0.3,
        );
        add(
            &mut r,
            b("ffn_norm.weight"),
            SourceDType::F16,
            vec![case.hidden],
            1.0,
            0.3,
        );
        add(
            &mut r,
            b("attn_q.weight"),
            lin,
            vec![HEADS * HEAD_DIM, case.hidden],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("attn_k.weight"),
            lin,
            vec![KV_HEADS * HEAD_DIM, case.hidden],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("attn_v.weight"),
            lin,
            vec![KV_HEADS * HEAD_DIM, case.hidden],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("attn_output.weight"),
            lin,
            vec![case.hidden, HEADS * HEAD_DIM],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("ffn_gate.weight"),
            lin,
            vec![FFN, case.hidden],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("ffn_up.weight"),
            lin,
            vec![FFN, case.hidden],
            0.0,
            ws(case.hidden),
        );
        add(
            &mut r,
            b("ffn_down.weight"),
            lin,
            vec![case.hidden, FFN],
            0.0,
            ws(FFN),
        );
        if case.arch == "qwen2" {
            add(
                &mut r,
                b("attn_q.bias"),
                SourceDType::F32,
                vec![HEADS * HEAD_DIM],
                0.0,
                0.5,
            );
            add(
                &mut r,
                b("attn_k.bias"),
                SourceDType::BF16,
                vec![KV_HEADS * HEAD_DIM],
                0.0,
                0.5,
            );
            add(
                &mut r,
                b("attn_v.bias"),
                SourceDType::F32,
                vec![KV_HEADS * HEAD_DIM],
                0.0,
                0.5,
            );
        }
    }
    SourceModel {
        origin: format!("synthetic-{}", case.name),
        config: ModelConfig {
            architecture: case.arch.into(),
            hidden_size: case.hidden,
            intermediate_size: FFN,
            num_layers: LAYERS,
            num_heads: HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            vocab_size: VOCAB,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: case.scaling.clone(),
            max_position_embeddings: 1024,
            tie_word_embeddings: case.tied,
            attention_bias: case.arch == "qwen2",
            rope_interleaved: case.interleaved,
            qk_norm: false,
            no_rope_layers: Vec::new(),
            sliding_window: None,
            ..ModelConfig::default()
        },
        tensors,
        tokenizer: TokenizerData {
            tokenizer_json: r#"{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}"#
                .into(),
            chat_template: Some("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            bos_id: Some(0),
            add_bos: false,
            eos_id: 1,
            stop_ids: vec![1, 2],
        },
        generation: None,
    }
}

fn options(case: &Case) -> ExportOptions {
    ExportOptions {
        max_cache: MAX_CACHE,
        max_chunk: 8,
        kv_dtype: case.kv,
        quantize: case.quantize,
        generation: None,
    }
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("onestep-synth-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes what the NumPy reference needs: config and the f32 values each weight stands for.
fn dump_reference(case: &Case, src: &SourceModel, dir: &Path) {
    let wdir = dir.join("w");
    std::fs::create_dir_all(&wdir).unwrap();
    let mut shapes = serde_json::Map::new();
    for (name, t) in &src.tensors {
        let v = if t.shape.len() == 2 && case.quantize != Quantize::Keep {
            // requantized: the reference uses the values the new form stands for (its error bounds are
            // unit-tested in quant/)
            quant::dequantize(&quant::encode_matrix(name, t, case.quantize).unwrap())
        } else {
            quant::dequantize_source(name, t).unwrap()
        };
        std::fs::write(
            wdir.join(format!("{name}.bin")),
            bytemuck::cast_slice::<f32, u8>(&v),
        )
        .unwrap();
        shapes.insert(name.clone(), serde_json::json!(t.shape));
    }
    let (scaling, factor, lo, hi, orig) = match &case.scaling {
        None => ("none", 1.0, 0.0, 0.0, 0),
        Some(RopeScaling::Linear { factor }) => ("linear", *factor, 0.0, 0.0, 0),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => (
            "llama3",
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings,
        ),
        Some(RopeScaling::LongRope { .. }) => unreachable!("no synthetic case uses LongRoPE"),
    };
    let c = &src.config;
    let j = serde_json::json!({
        "name": case.name, "model": "model.onnx", "hidden": c.hidden_size, "layers": c.num_layers,
        "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab": c.vocab_size,
        "eps": c.rms_eps, "theta": c.rope_theta, "interleaved": c.rope_interleaved, "tied": c.tie_word_embeddings,
        "bias": c.attention_bias, "kv_dtype": if case.kv == DType::F16 { "f16" } else { "f32" },
        "max_cache": MAX_CACHE, "scaling": scaling, "factor": factor, "low_freq_factor": lo,
        "high_freq_factor": hi, "original_max": orig, "shapes": shapes,
    });
    std::fs::write(
        dir.join("case.json"),
        serde_json::to_string_pretty(&j).unwrap(),
    )
    .unwrap();
}

#[test]
fn exports_every_variant() {
    for (i, case) in cases().iter().enumerate() {
        let src = source(case, 100 + i as u64);
        let dir = workdir(case.name);
        let out = dir.join("model.onnx");
        let s = export(&src, &out, &options(case), &mut NoProgress)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let file = Bytes::from(std::fs::read(&out).unwrap());
        assert_eq!(file.len() as u64, s.file_bytes);
        let m = proto::ModelProto::decode(file.clone()).unwrap();
        let g = m.graph.unwrap();
        let names = |v: &[proto::ValueInfoProto]| {
            v.iter()
                .map(|x| x.name.clone().unwrap())
                .collect::<Vec<_>>()
        };
        let ins = names(&g.input);
        let outs = names(&g.output);
        for n in [
            contract::INPUT_IDS,
            contract::POSITION,
            contract::TEMPERATURE,
            contract::TOP_K,
            contract::TOP_P,
            contract::RANDOM_U,
        ] {
            assert!(ins.contains(&n.to_string()), "{}: input {n}", case.name);
        }
        for l in 0..LAYERS {
            assert!(ins.contains(&contract::past_key(l)) && ins.contains(&contract::past_value(l)));
            assert!(outs.contains(&contract::new_key(l)) && outs.contains(&contract::new_value(l)));
        }
        assert!(
            outs.contains(&contract::LOGITS.to_string())
                && outs.contains(&contract::NEXT_TOKEN.to_string())
        );
        // every payload 64-byte aligned, names unique
        let mut seen = std::collections::HashSet::new();
        for t in &g.initializer {
            let raw = t.raw_data.as_ref().unwrap();
            assert_eq!((raw.as_ptr() as usize - file.as_ptr() as usize) % 64, 0);
            assert!(seen.insert(t.name.clone().unwrap()));
        }
        // node names unique and readable
        let mut nn = std::collections::HashSet::new();
        for n in &g.node {
            assert!(nn.insert(n.name.clone().unwrap()));
        }
        assert!(
            nn.contains("l1.attn.q_proj")
                && nn.contains("final_norm")
                && nn.contains("sample.topk")
        );
        // metadata round-trips through the runtime's reader
        let meta: BTreeMap<String, String> = m
            .metadata_props
            .iter()
            .map(|e| (e.key.clone().unwrap(), e.value.clone().unwrap()))
            .collect();
        let info = onestep::ModelInfo::from_metadata(&meta).unwrap();
        assert_eq!(
            (
                info.num_layers,
                info.vocab_size,
                info.max_cache,
                info.kv_dtype
            ),
            (LAYERS, VOCAB, MAX_CACHE, case.kv)
        );
        assert_eq!(info.stop_ids, vec![1, 2]);
        assert!(meta[contract::meta::TOKENIZER_JSON].contains("BPE"));
        // tied: one copy of the table
        if case.tied {
            assert!(
                !seen.iter().any(|n| n.starts_with("output.")),
                "{}: tied output must reuse the embedding",
                case.name
            );
        }
        assert!(
            s.unused_tensors.is_empty(),
            "{}: unused {:?}",
            case.name,
            s.unused_tensors
        );
        if case.linear == SourceDType::Q4_0 && case.quantize == Quantize::Keep {
            assert!(s.op_histogram.contains_key("com.microsoft::MatMulNBits"));
        }
        // The runtime binds the embedding of every table form to one step over its table, shared
        // with the output layer when tied, and the token choice's tail after its TopK to one step.
        let model = onestep::Model::load(&out).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let ps = model.plan_stats();
        assert_eq!(
            (ps.embedding, ps.embedding_tied, ps.token_choice),
            (1, usize::from(case.tied), 1),
            "{}: {ps:?}",
            case.name
        );
        drop(model);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn shape_mismatch_names_tensor_and_node() {
    let case = &cases()[0];
    let mut src = source(case, 1);
    let t = src
        .tensors
        .get_mut(&canonical::blk(1, "attn_k.weight"))
        .unwrap();
    t.shape = vec![KV_HEADS * HEAD_DIM / 2, HIDDEN * 2];
    let dir = workdir("bad");
    let e = export(&src, &dir.join("m.onnx"), &options(case), &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("l1.attn.k_proj") && e.contains("[16, 128]"),
        "{e}"
    );
    assert!(!dir.join("m.onnx").exists() && !dir.join("m.onnx.tmp").exists());
    let mut src = source(case, 1);
    src.tensors.remove(&canonical::blk(0, "ffn_up.weight"));
    let e = export(&src, &dir.join("m.onnx"), &options(case), &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.ffn_up.weight"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn onnxruntime_matches_numpy_reference() {
    // ONESTEP_SYNTH_DIR=dir keeps the exported cases there (for re-running the script by hand)
    let keep = std::env::var_os("ONESTEP_SYNTH_DIR").map(PathBuf::from);
    let root = keep.clone().unwrap_or_else(|| workdir("ort"));
    for (i, case) in cases().iter().enumerate() {
        let src = source(case, 100 + i as u64);
        let dir = root.join(case.name);
        std::fs::create_dir_all(&dir).unwrap();
        export(
            &src,
            &dir.join("model.onnx"),
            &options(case),
            &mut NoProgress,
        )
        .unwrap();
        dump_reference(case, &src, &dir);
    }
    // the same graph with its weights in external data (`<out>.data`), as models of 2 GiB or more are
    let case = &cases()[2];
    let src = source(case, 102);
    let dir = root.join("external_q4_0");
    std::fs::create_dir_all(&dir).unwrap();
    let w = onestep_export::export::encode_weights(&src, case.quantize, &mut NoProgress).unwrap();
    let opts = onestep_export::arch::ArchOptions {
        max_cache: MAX_CACHE,
        kv_dtype: case.kv,
    };
    let g = onestep_export::arch::build(&src.config, &w, &opts).unwrap();
    onestep_export::write::write_model_with(&g, &dir.join("model.onnx"), None, &mut |_, _| {}, 0)
        .unwrap();
    assert!(dir.join("model.onnx.data").exists());
    dump_reference(case, &src, &dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ort_run_step.py");
    let st = std::process::Command::new("python3")
        .arg(&script)
        .arg(&root)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "{} failed on {}",
        script.display(),
        root.display()
    );
    if keep.is_none() {
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// The same source with every block-form matrix replaced by its f32 values.
fn as_f32(src: &SourceModel) -> SourceModel {
    let mut out = src.clone();
    for (name, t) in out.tensors.iter_mut() {
        if t.dtype.block_elems() > 1 {
            let v = quant::dequantize_source(name, t).unwrap();
            *t = SourceTensor {
                dtype: SourceDType::F32,
                shape: t.shape.clone(),
                data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&v).to_vec()),
            };
        }
    }
    out
}

/// Logits of a 5-token prefill and three decode steps on `device`, with f32 activations on the CPU
/// (the GPU kernels' math).
fn logits_on(path: &Path, device: DeviceRequest) -> Vec<Vec<f32>> {
    let opts = onestep::LoadOptions {
        device,
        precision: onestep::Precision::Exact,
        ..Default::default()
    };
    let model = onestep::Model::load_with(path, &opts)
        .unwrap_or_else(|e| panic!("{} on {device:?}: {e}", path.display()));
    let mut state = model.new_state().unwrap();
    let greedy = onestep::StepSampling::GREEDY;
    let mut out = vec![model
        .step(&mut state, &[3, 17, 42, 5, 88], &greedy)
        .unwrap()];
    for id in [7, 60, 11] {
        out.push(model.step(&mut state, &[id], &greedy).unwrap());
    }
    out.into_iter().map(|o| o.logits).collect()
}

/// The CPU, and a GPU where wgpu finds one (required when `ONESTEP_REQUIRE_GPU` is set, as in CI).
fn devices() -> Vec<DeviceRequest> {
    let gpu = !onestep::gpu::list_adapters(Default::default()).is_empty();
    if std::env::var_os("ONESTEP_REQUIRE_GPU").is_some() {
        assert!(gpu, "ONESTEP_REQUIRE_GPU is set and wgpu finds no adapter");
    }
    let mut d = vec![DeviceRequest::Cpu];
    if gpu {
        d.push(DeviceRequest::Gpu(None));
    }
    d
}

#[test]
fn onestep_runs_every_block_form_as_its_f32_values() {
    // Each GGUF block form through the runtime's kernels (CPU and GPU) against the same model with the
    // dequantized weights in f32 on the CPU (the path checked against onnxruntime everywhere else).
    for (i, case) in cases().iter().enumerate() {
        let blocks = [case.linear, case.embd, case.output]
            .iter()
            .any(|d| d.block_elems() > 1);
        if !blocks || case.quantize != Quantize::Keep {
            continue;
        }
        let src = source(case, 100 + i as u64);
        let dir = workdir(&format!("{}_vs_f32", case.name));
        let (a, b) = (dir.join("blocks.onnx"), dir.join("f32.onnx"));
        export(&src, &a, &options(case), &mut NoProgress).unwrap();
        export(&as_f32(&src), &b, &options(case), &mut NoProgress).unwrap();
        let tol = if case.kv == DType::F16 { 1e-3 } else { 1e-4 };
        let want = logits_on(&b, DeviceRequest::Cpu);
        for device in devices() {
            for (step, (x, y)) in logits_on(&a, device).iter().zip(&want).enumerate() {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    err <= tol * scale,
                    "{} on {device:?} step {step}: max |Δlogit| {err} (scale {scale})",
                    case.name
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
