"""Gemma 3 270M (the Q4_K_M GGUF, exported with an f32 cache) in onestep and onnxruntime against llama.cpp and
transformers.

ONESTEP_GEMMA3_ONNX: the exported file; ONESTEP_BIN: the `onestep` binary (scripts/test sets both). The fixtures
are llama.cpp's greedy continuations of raw prompts (tests/fixtures/gemma3_llamacpp.json; one prompt is long
enough that the generated positions attend across the 512-token sliding window) and transformers' exact f32
logits over the same sequences on the same dequantized weights (tests/fixtures/gemma3_transformers.json).

- CPU, every sequence teacher-forced (`onestep score`): top-1 equal to llama.cpp's token wherever llama.cpp's
  top-2 margin exceeds 1.0, to transformers' wherever its margin exceeds 0.1, and the logits of transformers'
  top-8 ids within 0.05 of its own.
- GPU (lavapipe; slow on the 262,144-row output layer, so one short sequence): the CPU's top-1 wherever the
  CPU's margin exceeds 0.05 and the top-8 logits within 0.02 of the CPU's.
- onnxruntime (its 8-bit MatMulNBits takes ~2.5 s a step on the output layer, so one short sequence): the
  same bounds as the runtime against transformers, and top-1 equal to onestep's where its margin > 0.05.
"""
import json
import os

import numpy as np
import pytest

import harness

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
PATH = os.environ.get("ONESTEP_GEMMA3_ONNX", "")
BIN = os.environ.get("ONESTEP_BIN", "")
LLAMACPP_MARGIN = 1.0
HF_MARGIN = 0.1
HF_TOL = 0.05
GPU_TOL = 0.02
ORT_POSITIONS = 8

pytestmark = pytest.mark.skipif(not PATH or not BIN, reason="ONESTEP_GEMMA3_ONNX and ONESTEP_BIN are not set "
                                                           "(scripts/test sets them)")


def _load(name):
    with open(os.path.join(FIX, name)) as f:
        return json.load(f)


def _fixtures():
    return _load("gemma3_llamacpp.json"), _load("gemma3_transformers.json")


def _margin(top):
    """Top-2 margin of a [(id, logit), ...] list sorted best first."""
    return top[0][1] - top[1][1]


def _jobs(cases):
    return [{"ids": c["prompt_ids"] + c["generated"], "start": len(c["prompt_ids"]), "generate": 0} for c in cases]


def _check_rows(name, rows, lc_case, hf_case, fails, diffs):
    """rows[p]: our top-8 [(id, logit)] predicting generated[p]; appends failures and |logit diff|s."""
    agree_lc = agree_hf = 0
    for p, mine in enumerate(rows):
        top = int(mine[0][0])
        lc_top8 = lc_case["top8"][p]
        want = lc_case["generated"][p]
        agree_lc += top == want
        if _margin(lc_top8) > LLAMACPP_MARGIN and top != want:
            fails.append(f"{name}[{p}]: top-1 {top} != llama.cpp {want} (margin {_margin(lc_top8):.3f})")
        ht = hf_case["top8"][p]
        agree_hf += top == ht[0][0]
        if _margin(ht) > HF_MARGIN and top != ht[0][0]:
            fails.append(f"{name}[{p}]: top-1 {top} != transformers {ht[0][0]} (margin {_margin(ht):.3f})")
        by_id = {int(i): v for i, v in mine}
        common = [abs(by_id[int(i)] - v) for i, v in ht if int(i) in by_id]
        if common:
            diffs.append(max(common))
            if max(common) > HF_TOL:
                fails.append(f"{name}[{p}]: top-8 logits differ from transformers by {max(common):.4f}")
    return agree_lc, agree_hf


def test_cpu_matches_llamacpp_and_transformers():
    lc, hf = _fixtures()
    out = harness.onestep_score(BIN, PATH, _jobs(lc["cases"]), "--top", "8", "--device", "cpu")
    fails, diffs = [], []
    n = a_lc = a_hf = 0
    for c, h, o in zip(lc["cases"], hf["cases"], out):
        rows = o["rows"][: len(c["generated"])]
        x, y = _check_rows(c["name"], rows, c, h, fails, diffs)
        n, a_lc, a_hf = n + len(rows), a_lc + x, a_hf + y
    print(f"\n[gemma3 cpu] {n} positions over {len(lc['cases'])} sequences: top-1 equal to llama.cpp {a_lc}/{n}, "
          f"to transformers {a_hf}/{n}; |logit diff| vs transformers on its top-8: median {np.median(diffs):.2e}, "
          f"max {max(diffs):.2e}")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:20])


def test_fast_is_as_faithful_as_llamacpp():
    """The CLI's default precision (`fast`: 8-bit activations, and on CPUs whose integer kernels read them the
    packed weights of backend/cpu/repack.rs) against transformers' exact logits, beside llama.cpp's on the same
    positions: top-1 agreement at least llama.cpp's, median |logit diff| over transformers' top-8 at most its."""
    lc, hf = _fixtures()
    out = harness.onestep_score(BIN, PATH, _jobs(lc["cases"]), "--top", "8", "--device", "cpu", precision=None)
    ours, theirs = [], []
    n = a_ours = a_lc = 0
    for c, h, o in zip(lc["cases"], hf["cases"], out):
        for p, mine in enumerate(o["rows"][: len(c["generated"])]):
            ht = h["top8"][p]
            n += 1
            a_ours += int(mine[0][0]) == int(ht[0][0])
            a_lc += int(c["top8"][p][0][0]) == int(ht[0][0])
            for row, diffs in ((mine, ours), (c["top8"][p], theirs)):
                by_id = {int(i): v for i, v in row}
                common = [abs(by_id[int(i)] - v) for i, v in ht if int(i) in by_id]
                if common:
                    diffs.append(float(np.median(common)))
    print(f"\n[gemma3 fast] {n} positions: top-1 equal to transformers {a_ours}/{n} (llama.cpp {a_lc}/{n}); "
          f"median |logit diff| over its top-8 {np.median(ours):.4f} (llama.cpp {np.median(theirs):.4f})")
    assert a_ours >= a_lc, f"top-1 agreement {a_ours} < llama.cpp's {a_lc}"
    assert np.median(ours) <= np.median(theirs), f"median |diff| {np.median(ours)} > llama.cpp's {np.median(theirs)}"


def _short_case(lc, hf, positions):
    """The shortest sequence, cut to its first `positions` generated tokens."""
    k = min(range(len(lc["cases"])), key=lambda i: len(lc["cases"][i]["prompt_ids"]))
    c = dict(lc["cases"][k])
    c["generated"] = c["generated"][:positions]
    return c, hf["cases"][k]


def test_gpu_matches_cpu():
    lc, hf = _fixtures()
    c, _ = _short_case(lc, hf, ORT_POSITIONS)
    cpu = harness.onestep_score(BIN, PATH, _jobs([c]), "--top", "8", "--device", "cpu")[0]["rows"]
    gpu = harness.onestep_score(BIN, PATH, _jobs([c]), "--top", "8", "--device", "gpu")[0]["rows"]
    fails, worst = [], 0.0
    for p, (a, b) in enumerate(zip(cpu, gpu)):
        if a[0][0] != b[0][0] and _margin(a) > 0.05:
            fails.append(f"[{p}]: gpu top-1 {b[0][0]} != cpu {a[0][0]} (margin {_margin(a):.3f})")
        by_id = {int(i): v for i, v in b}
        d = max(abs(by_id[int(i)] - v) for i, v in a if int(i) in by_id)
        worst = max(worst, d)
        if d > GPU_TOL:
            fails.append(f"[{p}]: top-8 logits differ from the cpu's by {d:.4f}")
    print(f"\n[gemma3 gpu vs cpu] {c['name']}: {len(cpu)} positions, max top-8 |logit diff| {worst:.2e}")
    assert len(gpu) == len(cpu) == len(c["generated"]) + 1
    assert not fails, "\n".join(fails)


def test_onnxruntime_runs_the_file():
    lc, hf = _fixtures()
    c, h = _short_case(lc, hf, ORT_POSITIONS)
    s = harness.StepSession(PATH)
    ids = c["prompt_ids"] + c["generated"]
    ort_rows = harness.teacher_force(s, ids, len(c["prompt_ids"]))[: len(c["generated"])]
    tops = []
    for row in ort_rows:
        order = np.argsort(-row)[:8]
        tops.append([(int(i), float(row[i])) for i in order])
    fails, diffs = [], []
    a_lc, a_hf = _check_rows(c["name"], tops, c, h, fails, diffs)
    ours = harness.onestep_score(BIN, PATH, _jobs([c]), "--top", "8", "--device", "cpu")[0]["rows"]
    for p, (o, m) in enumerate(zip(tops, ours)):
        if o[0][0] != m[0][0] and _margin(o) > 0.05:
            fails.append(f"[{p}]: onestep top-1 {m[0][0]} != onnxruntime {o[0][0]} (margin {_margin(o):.3f})")
    n = len(tops)
    print(f"\n[gemma3 onnxruntime] {c['name']}: {n} positions, top-1 equal to llama.cpp {a_lc}/{n}, to transformers "
          f"{a_hf}/{n}, max top-8 |logit diff| vs transformers {max(diffs):.2e}")
    assert not fails, "\n".join(fails)
