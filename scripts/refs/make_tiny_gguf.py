#!/usr/bin/env python3
"""Write a tiny llama GGUF from tests/fixtures/tiny/llama_f16 (the HF checkpoint) with the `gguf` package.

Usage: make_tiny_gguf.py OUT.gguf [--type f16|q8_0|q4_0] [--micro]

--micro replaces the checkpoint's weights by seeded random ones of a smaller model (1 layer, hidden 32,
2/1 heads, ffn 64; same tokenizer): a ~30 KB file for the committed hostile corpus.

Tensors take llama.cpp's names and its q/k row permutation (adjacent-pair RoPE); the tokenizer is the
checkpoint's byte-level BPE written as `tokenizer.ggml.*` (model gpt2, pre smollm). The result is a
valid, exportable model of a few hundred KB: the seed of the GGUF fuzz target and the base of the
hostile GGUF files (scripts/refs/make_hostile.py). Requires: numpy, safetensors, gguf.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import gguf
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests/fixtures/tiny/llama_f16"


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--micro", action="store_true")
    a = ap.parse_args()
    cfg = json.loads((SRC / "config.json").read_text())
    tc = json.loads((SRC / "tokenizer_config.json").read_text())
    tok = json.loads((SRC / "tokenizer.json").read_text())
    st = load_file(str(SRC / "model.safetensors"))
    if a.micro:
        cfg.update(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=16, intermediate_size=64)
        rng = np.random.default_rng(7)
        h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        kv = cfg["num_key_value_heads"] * cfg["head_dim"]
        p = "model.layers.0."
        shapes = {
            "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
        st = {k: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s))
              .astype(np.float32) for k, s in shapes.items()}

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("onestep tiny llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])

    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for t in tok["added_tokens"]:
        types[t["id"]] = gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tc["bos_token"]])
    w.add_eos_token_id(vocab[tc["eos_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(tc["chat_template"])

    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[a.type]
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        names.update({
            p + "input_layernorm.weight": b + "attn_norm.weight",
            p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
            p + "self_attn.q_proj.weight": b + "attn_q.weight",
            p + "self_attn.k_proj.weight": b + "attn_k.weight",
            p + "self_attn.v_proj.weight": b + "attn_v.weight",
            p + "self_attn.o_proj.weight": b + "attn_output.weight",
            p + "mlp.gate_proj.weight": b + "ffn_gate.weight",
            p + "mlp.up_proj.weight": b + "ffn_up.weight",
            p + "mlp.down_proj.weight": b + "ffn_down.weight",
        })
    for hf_name in sorted(st):
        data = st[hf_name].astype(np.float32)
        name = names[hf_name]
        if name.endswith("attn_q.weight"):
            data = permute(data, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            data = permute(data, cfg["num_key_value_heads"])
        if data.ndim == 1:
            w.add_tensor(name, data)  # norms stay f32, as llama.cpp writes them
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
