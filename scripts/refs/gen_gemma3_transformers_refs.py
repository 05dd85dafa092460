#!/usr/bin/env python3
"""Generates tests/fixtures/gemma3_transformers.json: transformers' exact f32 Gemma 3 270M logits over llama.cpp's
sequences (tests/fixtures/gemma3_llamacpp.json, from `gen_llamacpp_refs.py --model gemma3`).

Dev-time script (the fixture is committed; CI never runs this). Needs torch (CPU is fine), transformers (5.x),
safetensors and gguf:

    python3 scripts/refs/gen_gemma3_transformers_refs.py [--gguf cache/gemma3/gemma-3-270m-q4_k_m.gguf]
        [--save-hf cache/gemma3/hf_f32] [--check-hf-loader]

The model is transformers' Gemma3ForCausalLM built from an explicit Gemma3TextConfig (the hyper-parameters are
checked against the GGUF metadata), attn_implementation "eager", float32. Its weights are the GGUF's,
dequantized to f32 with the gguf package (`gguf.quants.dequantize` already returns numpy [out, in], the reverse
of the GGUF shape). llama.cpp's converter stores every Gemma RMSNorm weight as (1 + w) while transformers'
Gemma3RMSNorm multiplies by (1 + w), so 1 is subtracted from every `*norm.weight`; q/k are not row-permuted
for Gemma (NEOX rope), so no de-permutation. `--check-hf-loader` also loads the GGUF with transformers' own
GGUF loader (which handles gemma3) and asserts that both state dicts are equal.

transformers' GGUF tokenizer re-tokenizes each prompt text (`tokenizer_ids_equal` per case, as for SmolLM2).
It runs ONE teacher-forced forward over each llama.cpp sequence (prompt_ids + generated). For every generated
position p it records the top-8 (id, logit) of the row predicting generated[p] (sequence position
len(prompt_ids)-1+p) and that row's stats [mean, std, min, max] over the full vocabulary -- the schema of
smollm2_transformers.json. `--save-hf DIR` also writes the dequantized model as an f32 Hugging Face folder
(config + model.safetensors + generation config + tokenizer; ~1 GB, not committed).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llamacpp_refs import MODELS, ROOT, top8  # noqa: E402

DEFAULT_GGUF = MODELS["gemma3"]["gguf"]
N_LAYERS = 18
GLOBAL_EVERY = 6  # layers 5, 11, 17 are full attention, the rest use the 512-token sliding window

# GGUF tensor name (blk.{i}. stripped) -> HF name (model.layers.{i}. added)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gemma3_config():
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        sliding_window=512,
        layer_types=["full_attention" if (i + 1) % GLOBAL_EVERY == 0 else "sliding_attention"
                     for i in range(N_LAYERS)],
        query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        max_position_embeddings=32768, final_logit_softcapping=None, attn_logit_softcapping=None,
        bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return cfg


def check_metadata(reader, cfg):
    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    want = {
        "gemma3.embedding_length": cfg.hidden_size, "gemma3.feed_forward_length": cfg.intermediate_size,
        "gemma3.block_count": cfg.num_hidden_layers, "gemma3.attention.head_count": cfg.num_attention_heads,
        "gemma3.attention.head_count_kv": cfg.num_key_value_heads, "gemma3.attention.key_length": cfg.head_dim,
        "gemma3.attention.value_length": cfg.head_dim, "gemma3.attention.sliding_window": cfg.sliding_window,
        "gemma3.context_length": cfg.max_position_embeddings,
        "gemma3.rope.freq_base": cfg.rope_parameters["full_attention"]["rope_theta"],
        "gemma3.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        "tokenizer.ggml.bos_token_id": cfg.bos_token_id,
    }
    for k, v in want.items():
        got = field(k)
        assert abs(float(got) - float(v)) <= 1e-6 * max(1.0, abs(float(v))), (k, got, v)


def load_from_gguf(path):
    """Gemma3ForCausalLM (f32, eager) with the GGUF's weights dequantized by the gguf package."""
    import gguf
    from transformers import Gemma3ForCausalLM

    reader = gguf.GGUFReader(path)
    cfg = gemma3_config()
    check_metadata(reader, cfg)
    model = Gemma3ForCausalLM(cfg).to(torch.float32)
    params = model.state_dict()
    filled = set()
    with torch.no_grad():
        for t in reader.tensors:
            name = t.name
            if name == "token_embd.weight":
                hf = "model.embed_tokens.weight"
            elif name == "output_norm.weight":
                hf = "model.norm.weight"
            elif name.startswith("blk."):
                _, i, base, kind = name.split(".")
                hf = f"model.layers.{i}.{LAYER_NAMES[base]}.{kind}"
            else:
                raise KeyError(f"unmapped GGUF tensor {name}")
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores 1 + w; Gemma3RMSNorm computes x * (1 + w)
            assert tuple(w.shape) == tuple(params[hf].shape), (name, w.shape, tuple(params[hf].shape))
            params[hf].copy_(torch.from_numpy(np.ascontiguousarray(w)))
            filled.add(hf)
    missing = set(params) - filled - {"lm_head.weight"}
    assert not missing, f"weights not filled from the GGUF: {sorted(missing)}"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    model.eval()
    return model


def check_hf_loader(model, path):
    """transformers' own GGUF loader must give the same weights (it also subtracts 1 from the norms)."""
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(os.path.abspath(path))
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).state_dict()
    mine = model.state_dict()
    assert set(ref) == set(mine), (set(ref) ^ set(mine))
    worst = max(float((ref[k].float() - mine[k]).abs().max()) for k in mine)
    print(f"transformers' GGUF loader agrees with the gguf-package fill: max |diff| {worst:g}", file=sys.stderr)
    assert worst == 0.0


def save_hf(model, tok, out):
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--llamacpp", default=os.path.join(ROOT, "tests", "fixtures", "gemma3_llamacpp.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "gemma3_transformers.json"))
    ap.add_argument("--save-hf", default=None)
    ap.add_argument("--check-hf-loader", action="store_true")
    args = ap.parse_args()

    import transformers
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    t0 = time.time()
    model = load_from_gguf(args.gguf)
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)  # transformers' GGUF -> SentencePiece-style tokenizer
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    if args.check_hf_loader:
        check_hf_loader(model, args.gguf)
    if args.save_hf:
        save_hf(model, tok, args.save_hf)
        print(f"saved dequantized f32 HF folder to {args.save_hf}", file=sys.stderr)

    ref = json.load(open(args.llamacpp))
    cases = []
    tot = agree = agree_gen = 0
    all_diffs, disagree_margins, confident_disagreements = [], [], []
    for c in ref["cases"]:
        ids, gen = c["prompt_ids"], c["generated"]
        t1 = time.time()
        hf_ids = tok(c["text"])["input_ids"]  # adds BOS, as llama.cpp did
        with torch.no_grad():
            # the last len(gen)+1 rows; the final one predicts past the sequence and is dropped
            logits = model(torch.tensor([ids + gen]), logits_to_keep=len(gen) + 1).logits[0].float().numpy()
        rows = logits[:-1]
        assert len(rows) == len(gen)
        tops = [top8(r) for r in rows]
        stats = [[round(float(r.mean()), 4), round(float(r.std()), 4), round(float(r.min()), 4),
                  round(float(r.max()), 4)] for r in rows]
        a = ag = 0
        for p, (lt, r, g) in enumerate(zip(c["top8"], rows, gen)):
            hf_top = int(np.argmax(r))
            margin = c["top2_margin"][p]
            ag += hf_top == g
            same = hf_top == lt[0][0]
            a += same
            if not same:
                disagree_margins.append(margin)
                if margin > 1.0:
                    confident_disagreements.append([c["name"], p, margin])
            for i, v in lt:
                all_diffs.append(abs(float(r[i]) - v))
        tot += len(rows)
        agree += a
        agree_gen += ag
        cases.append({"name": c["name"], "tokenizer_ids_equal": hf_ids == ids, "top8": tops, "stats": stats})
        print(f"{c['name']}: {len(ids)}+{len(gen)} tokens; hf tokenizer ids {'==' if hf_ids == ids else '!='} "
              f"llama.cpp; top-1 agrees with llama.cpp's batched top-1 at "
              f"{a}/{len(rows)}, with its generated token at {ag}/{len(rows)}  ({time.time() - t1:.1f}s)",
              file=sys.stderr)

    diffs = np.array(all_diffs)
    summary = {
        "positions": tot,
        "top1_agree_with_llamacpp": agree,
        "top1_agree_with_llamacpp_generated": agree_gen,
        "llamacpp_margin_at_disagreements": [round(m, 4) for m in sorted(disagree_margins)],
        "disagreements_where_llamacpp_margin_gt_1": confident_disagreements,
        "abs_diff_on_llamacpp_top8": {"median": round(float(np.median(diffs)), 4),
                                      "p90": round(float(np.percentile(diffs, 90)), 4),
                                      "max": round(float(diffs.max()), 4)},
    }
    out = {
        "model": os.path.basename(args.gguf),
        "peer": f"transformers {transformers.__version__}, torch {torch.__version__}, Gemma3ForCausalLM (eager), "
                "GGUF dequantized to f32 by the gguf package, f32 compute",
        "logits_source": "one teacher-forced forward over llama.cpp's prompt_ids+generated; top8[p] predicts "
                         "generated[p]; stats[p] = [mean, std, min, max] of that full row",
        "sequences": os.path.basename(args.llamacpp),
        "summary_vs_llamacpp": summary,
        "cases": cases,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
        fh.write("\n")
    print(json.dumps(summary, indent=1), file=sys.stderr)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
