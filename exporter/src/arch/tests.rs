//! Unit tests of the architecture builders: each family's step graph from a tiny config and f32
//! weights — the contract's inputs and outputs, and per layer the ops the family's blocks make.
//! (Numerics are the exporter's end-to-end tests': `tests/synthetic.rs`, the tiny checkpoints against
//! transformers.)

use std::collections::BTreeMap;

use bytes::Bytes;
use onestep_format::contract;
use onestep_format::graph::{DType, Dim, Graph};

use super::{build, ArchOptions, Weights, ARCHS};
use crate::quant::{Form, Matrix};
use crate::source::ModelConfig;
use crate::trace::TraceError;

/// Hidden size, MLP size, layers, query heads, KV heads, head size, vocabulary, cache slots.
const H: usize = 32;
const F: usize = 48;
const L: usize = 3;
const NH: usize = 4;
const KVH: usize = 2;
const D: usize = 8;
const V: usize = 40;
const S: usize = 16;

/// A tiny config of `arch`, with the family's own features on.
pub(crate) fn config(arch: &str) -> ModelConfig {
    let gemma = arch.starts_with("gemma");
    let gemma2 = arch == "gemma2";
    ModelConfig {
        architecture: arch.into(),
        hidden_size: H,
        intermediate_size: F,
        num_layers: L,
        num_heads: NH,
        num_kv_heads: KVH,
        head_dim: D,
        vocab_size: V,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 1024,
        tie_word_embeddings: gemma,
        attention_bias: arch == "qwen2",
        rope_interleaved: false,
        qk_norm: matches!(arch, "qwen3" | "gemma3"),
        no_rope_layers: if arch == "smollm3" {
            vec![1]
        } else {
            Vec::new()
        },
        sliding_window: matches!(arch, "mistral" | "gemma2" | "gemma3").then_some(8),
        global_layers: if gemma { vec![2] } else { Vec::new() },
        local_rope_theta: gemma.then_some(10_000.0),
        norm_offset: if gemma { 1.0 } else { 0.0 },
        attn_scale: gemma.then_some(0.25),
        attn_softcap: gemma2.then_some(50.0),
        final_softcap: gemma2.then_some(30.0),
    }
}

/// f32 values in (-0.5, 0.5), deterministic.
fn values(n: usize, seed: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i * 2_654_435_761 + seed * 40_503) % 1000) as f32 / 1000.0 - 0.5;
            x.to_le_bytes()
        })
        .collect()
}

/// The shape a canonical weight name has in `cfg`: `[N, K]` for a matrix, `[N]` for a vector.
fn shape_of(name: &str) -> Vec<usize> {
    let part = name.rsplit('.').nth(1).unwrap_or(name);
    let vector = name.ends_with(".bias") || part.contains("norm");
    let rows = match part {
        "attn_q" => NH * D,
        "attn_k" | "attn_v" => KVH * D,
        "attn_q_norm" | "attn_k_norm" => D,
        "ffn_gate" | "ffn_up" => F,
        "token_embd" | "output" => V,
        _ => H,
    };
    if vector {
        return vec![rows];
    }
    let cols = match part {
        "attn_output" => NH * D,
        "ffn_down" => F,
        _ => H,
    };
    vec![rows, cols]
}

/// `build(cfg)` with f32 weights made as it names the ones it lacks (each build stops at the first).
fn built(cfg: &ModelConfig) -> Graph {
    let opts = ArchOptions {
        max_cache: S,
        kv_dtype: DType::F16,
    };
    let mut w = Weights {
        matrices: BTreeMap::new(),
        vectors: BTreeMap::new(),
    };
    for _ in 0..200 {
        match build(cfg, &w, &opts) {
            Ok(g) => return g,
            Err(TraceError::Model(m)) if m.starts_with("missing weight `") => {
                let name = m.split('`').nth(1).unwrap().to_string();
                let shape = shape_of(&name);
                let n: usize = shape.iter().product();
                let bytes = Bytes::from(values(n, w.matrices.len() + w.vectors.len()));
                if let [rows, cols] = shape[..] {
                    let form = Form::F32(bytes);
                    w.matrices.insert(
                        name,
                        Matrix {
                            n: rows,
                            k: cols,
                            form,
                        },
                    );
                } else {
                    w.vectors.insert(name, bytes);
                }
            }
            Err(e) => panic!("{}: {e}", cfg.architecture),
        }
    }
    panic!("{}: no graph after 200 weights", cfg.architecture)
}

fn count(g: &Graph, op: &str) -> usize {
    g.nodes.iter().filter(|n| n.op == op).count()
}

fn shape(dims: &[Dim]) -> Vec<Option<usize>> {
    dims.iter()
        .map(|d| match d {
            Dim::Known(k) => Some(*k),
            _ => None,
        })
        .collect()
}

/// Every family: the contract's inputs and outputs, one cache pair a layer of `[1, KVH, S, D]`, and
/// per layer one attention, seven linear layers, the rotaries, norms and gate its blocks make.
#[test]
fn every_family_builds_its_blocks_over_the_contract() {
    for arch in ARCHS.iter().map(|a| a.name()) {
        let cfg = config(arch);
        let g = built(&cfg);
        let names = |vs: &[onestep_format::graph::ValueInfo]| -> Vec<String> {
            vs.iter().map(|v| v.name.clone()).collect()
        };
        let (ins, outs) = (names(&g.inputs), names(&g.outputs));
        for want in [
            contract::INPUT_IDS,
            contract::POSITION,
            contract::TOP_P,
            contract::RANDOM_U,
        ] {
            assert!(
                ins.iter().any(|n| n == want),
                "{arch}: input {want}: {ins:?}"
            );
        }
        for want in [contract::LOGITS, contract::NEXT_TOKEN] {
            assert!(
                outs.iter().any(|n| n == want),
                "{arch}: output {want}: {outs:?}"
            );
        }
        for i in 0..L {
            for kv in ["key", "value"] {
                let past = g.inputs.iter().find(|v| v.name == format!("past.{i}.{kv}"));
                let past = past.unwrap_or_else(|| panic!("{arch}: no past.{i}.{kv}"));
                assert_eq!(past.dtype, DType::F16, "{arch}");
                assert_eq!(shape(&past.shape), [1, KVH, S, D].map(Some), "{arch}");
                assert!(
                    outs.contains(&format!("new.{i}.{kv}")),
                    "{arch}: new.{i}.{kv}"
                );
            }
        }
        let roped = L - cfg.no_rope_layers.len();
        let qk = usize::from(cfg.qk_norm);
        let gemma = arch.starts_with("gemma");
        let norms = match gemma {
            true => 4 * L + 1 + 2 * qk * L,
            false => 2 * L + 1 + 2 * qk * L,
        };
        assert_eq!(count(&g, "Attention"), L, "{arch}: attentions");
        assert_eq!(count(&g, "Gemm"), 7 * L + 1, "{arch}: linear layers");
        assert_eq!(count(&g, "RotaryEmbedding"), 2 * roped, "{arch}: rotaries");
        assert_eq!(count(&g, "RMSNormalization"), norms, "{arch}: norms");
        assert_eq!(count(&g, "TopK"), 1, "{arch}: the token choice's TopK");
        let gelu = gemma;
        assert_eq!(count(&g, "Gelu"), if gelu { L } else { 0 }, "{arch}: GELU");
        assert_eq!(
            count(&g, "Sigmoid"),
            if gelu { 0 } else { L },
            "{arch}: SiLU"
        );
        // Gemma 2 caps the scores in its attentions and the logits with a tanh.
        let capped = g
            .nodes
            .iter()
            .filter(|n| n.op == "Attention" && n.attrs.contains_key("softcap"))
            .count();
        let gemma2 = arch == "gemma2";
        assert_eq!(capped, if gemma2 { L } else { 0 }, "{arch}: soft caps");
        assert_eq!(count(&g, "Tanh") > 0, gemma2, "{arch}: final soft cap");
    }
}

/// An architecture the builders do not know is an error listing the ones they do; a missing weight
/// names it.
#[test]
fn unknown_architectures_and_missing_weights_are_named() {
    let opts = ArchOptions {
        max_cache: S,
        kv_dtype: DType::F32,
    };
    let e = build(&config("gpt2"), &Weights::default(), &opts).unwrap_err();
    assert!(
        e.to_string().contains("gpt2") && e.to_string().contains("llama"),
        "{e}"
    );
    let e = build(&config("llama"), &Weights::default(), &opts).unwrap_err();
    assert!(e.to_string().contains("token_embd.weight"), "{e}");
}
