"""onestep's own runtime on the exported SmolLM2 file vs onnxruntime on the same file (and vs transformers).

ONESTEP_SMOLLM2_ONNX: exported file(s) (os.pathsep-separated); ONESTEP_BIN: the `onestep` binary (scripts/test
sets both). For every llama.cpp sequence of tests/fixtures/smollm2_llamacpp.json the runtime teacher-forces
prompt + generated ids (`onestep score`: prompt prefilled in max_chunk chunks, then one token per step) and
greedily continues the prompt; onnxruntime does the same through tests/peers/harness.py. Asserted:
- teacher-forced top-1 equal to onnxruntime's wherever onnxruntime's top-2 margin > 0.05;
- the logits of the runtime's top-8 ids within 1e-3 (f32 cache) / 0.05 (f16 cache) of onnxruntime's
  (max-abs-diff reported);
- greedy continuations identical up to the first step where onnxruntime's margin is < 0.05;
- and against transformers (exact math): top-1 equal where its margin > 0.1, top-8 logits within the same
  tolerance as the onnxruntime export test.
"""
import json
import os

import numpy as np
import pytest

import harness

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
PATHS = [p for p in os.environ.get("ONESTEP_SMOLLM2_ONNX", "").split(os.pathsep) if p.strip()]
BIN = os.environ.get("ONESTEP_BIN", "")
MARGIN = 0.05
# f32 cache: both compute the same f32 math (measured max 4e-5). f16 cache: one-ulp differences in the rounded
# cache rows move logits by up to ~0.012 (measured); the contract itself only requires top-1 agreement.
LOGIT_TOL = {"f32": 1e-3, "f16": 0.05}
HF_MARGIN = 0.1
HF_TOL = {"f32": 0.05, "f16": 0.1}
GREEDY_N = 16

pytestmark = pytest.mark.skipif(not PATHS or not BIN, reason="ONESTEP_SMOLLM2_ONNX and ONESTEP_BIN are not set "
                                                             "(scripts/test sets them)")


def _load(name):
    with open(os.path.join(FIX, name)) as f:
        return json.load(f)


def _score(path, jobs):
    return harness.onestep_score(BIN, path, jobs, "--top", "8")


def _margin(row):
    a = np.partition(row, -2)[-2:]
    return float(a[1] - a[0])


@pytest.mark.parametrize("path", PATHS or ["unset"])
def test_runtime_matches_onnxruntime(path):
    lc, hf = _load("smollm2_llamacpp.json"), _load("smollm2_transformers.json")
    jobs = []
    for c in lc["cases"]:
        ids = c["prompt_ids"] + c["generated"]
        jobs.append({"ids": ids, "start": len(c["prompt_ids"]), "generate": 0})
        jobs.append({"ids": c["prompt_ids"], "start": len(c["prompt_ids"]), "generate": GREEDY_N})
    ours = _score(path, jobs)
    s = harness.StepSession(path)
    n = agree = agree_hf = 0
    diffs, hf_diffs, fails, greedy_report = [], [], [], []
    for k, (c, h) in enumerate(zip(lc["cases"], hf["cases"])):
        ids, gen = c["prompt_ids"], c["generated"]
        ort_rows = harness.teacher_force(s, ids + gen, len(ids), s.max_chunk)[: len(gen)]
        mine = ours[2 * k]["rows"][: len(gen)]
        for p, (orow, top8) in enumerate(zip(ort_rows, mine)):
            n += 1
            o_top = int(np.argmax(orow))
            m_top = top8[0][0]
            agree += o_top == m_top
            if _margin(orow) > MARGIN and o_top != m_top:
                fails.append(f"{c['name']}[{p}]: runtime top-1 {m_top} != onnxruntime {o_top} (margin {_margin(orow):.3f})")
            d = max(abs(float(orow[i]) - v) for i, v in top8)
            diffs.append(d)
            if d > LOGIT_TOL[s.kv_dtype]:
                fails.append(f"{c['name']}[{p}]: top-8 logits differ from onnxruntime by {d:.4f}")
            ht = h["top8"][p]
            agree_hf += m_top == ht[0][0]
            hm = ht[0][1] - ht[1][1]
            if hm > HF_MARGIN and m_top != ht[0][0]:
                fails.append(f"{c['name']}[{p}]: runtime top-1 {m_top} != transformers {ht[0][0]} (margin {hm:.3f})")
            mine_by_id = dict((int(i), v) for i, v in top8)
            common = [abs(mine_by_id[i] - v) for i, v in ht if i in mine_by_id]
            if common:
                hf_diffs.append(max(common))
        # Greedy: identical until onnxruntime's own choice is a near-tie.
        ort_gen, ort_rows_g = harness.greedy(s, ids, GREEDY_N)
        my_gen = ours[2 * k + 1]["generated"]
        same = 0
        for a, b, row in zip(ort_gen, my_gen, ort_rows_g):
            if a != b:
                if _margin(row) >= MARGIN:
                    fails.append(f"{c['name']}: greedy step {same}: runtime {b} != onnxruntime {a} "
                                 f"(margin {_margin(row):.3f})")
                break
            same += 1
        greedy_report.append(f"{c['name']} {same}/{len(ort_gen)}")
    diffs, hf_diffs = np.array(diffs), np.array(hf_diffs)
    tol = HF_TOL[s.kv_dtype]
    if hf_diffs.max() > tol:
        fails.append(f"top-8 logits differ from transformers by up to {hf_diffs.max():.4f} > {tol}")
    print(f"\n[runtime vs onnxruntime, {os.path.basename(path)}, {s.kv_dtype} cache] {n} positions: top-1 equal "
          f"{agree}/{n}; |logit diff| on the runtime's top-8: median {np.median(diffs):.2e}, max {diffs.max():.2e}; "
          f"vs transformers: top-1 {agree_hf}/{n}, max top-8 diff {hf_diffs.max():.4f}; greedy equal: "
          + ", ".join(greedy_report))
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:20])
