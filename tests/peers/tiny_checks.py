"""Checks shared by test_tiny_ort.py (exported files) and test_toy_graph.py (Python reference exporter)."""
import json
import os

import numpy as np

import harness

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tiny")
# The models tests/peers/make_toy_graph.py (the Python reference exporter) writes, and those the exporter
# takes (scripts/test exports each one).
TINY = ["llama", "qwen2", "llama_f16"]
EXPORTED = TINY + ["qwen3", "smollm3", "mistral", "phi3", "gemma3", "gemma2"]
# Relative tolerance (of max |logit|) against transformers' f32 logits, by cache dtype: an f32 cache is
# exact math (measured ~1e-6 with onnxruntime); an f16 cache rounds K/V to 11 bits.
REL_TOL = {"f32": 1e-4, "f16": 5e-3}


def reference(name):
    with open(os.path.join(FIXTURES, name, "reference.json")) as f:
        return json.load(f)


def check_logits(path, name, report):
    ref = reference(name)
    ids = ref["ids"]
    want = np.array(ref["logits"], np.float32)
    scale = float(np.max(np.abs(want)))
    s = harness.StepSession(path)
    tol = REL_TOL[s.kv_dtype]
    worst = 0.0
    # token by token (rows 0..11), then chunked prefills of several sizes (rows start-1 .. 11).
    for start, chunk in [(1, 1), (len(ids), 5), (7, 3), (len(ids), s.max_chunk)]:
        rows = np.stack(harness.teacher_force(s, ids, start, min(chunk, s.max_chunk)))
        d = float(np.max(np.abs(rows - want[start - 1:]))) / scale
        worst = max(worst, d)
        assert d <= tol, f"{name}: start {start} chunk {chunk}: max |diff| {d:.3g} of max|logit| > {tol}"
        assert list(np.argmax(rows, -1)) == list(np.argmax(want[start - 1:], -1)) or s.kv_dtype == "f16"
    gen, grows = harness.greedy(s, ids, len(ref["greedy"]))
    dg = float(np.max(np.abs(np.stack(grows) - np.array(ref["greedy_logits"], np.float32)))) / scale
    worst = max(worst, dg)
    report(f"{name} ({s.kv_dtype} cache): logits max rel diff {worst:.2e} (tol {tol}), greedy "
           f"{'==' if gen == ref['greedy'] else '!='} transformers {gen}")
    assert dg <= tol
    if s.kv_dtype == "f32" or ref["greedy_min_margin"] > 0.5:
        assert gen == ref["greedy"], f"{name}: greedy {gen} != transformers {ref['greedy']}"


def check_sampling(path, name, report, ids=None):
    """In-graph token choice: top_k=1 / tiny top_p give the arg-max; top_k=5 stays within the top 5;
    every choice equals the numpy model of the spec (harness.sample_reference). The prefix is `ids` (default:
    the tiny fixture's first 6 ids); all but its last token are prefilled in one chunk."""
    if ids is None:
        ids = reference(name)["ids"][:6]
    s = harness.StepSession(path)
    rng = np.random.default_rng(7)
    prefix = list(ids)[: s.max_chunk + 1]
    checked = 0
    late = []
    for temperature, top_k, top_p, us in [
        (0.8, 1, 1.0, [0.0, 0.5, 0.999]),        # top_k = 1 -> arg-max
        (1.5, 0, 1e-9, [0.0, 0.5, 0.999]),       # top_p tiny -> arg-max
        (0.0, 5, 0.5, [0.999]),                  # greedy ignores k/p/u
        (3.0, 5, 1.0, [0.999, 0.9999, 0.97]),    # u near 1: a late candidate, still within top 5
        (1.0, 0, 0.9, list(rng.random(6))),      # nucleus
        (0.7, 40, 0.95, list(rng.random(6))),    # k and p together
        (2.0, 400, 1.0, list(rng.random(6))),    # k >= vocab -> no limit
        (1.0, -3, 2.0, list(rng.random(6))),     # k <= 0, p >= 1 -> no limit
    ]:
        for u in us:
            s.reset()
            s.step(prefix[:-1])
            tok, logits = s.step([prefix[-1]], temperature, top_k, top_p, float(u))
            am = int(np.argmax(logits))
            if top_k == 1 or top_p <= 1e-6 or temperature <= 0:
                assert tok == am, f"{name}: T={temperature} k={top_k} p={top_p} u={u}: {tok} != argmax {am}"
            if 0 < top_k < s.vocab:
                top = set(np.argsort(-logits, kind="stable")[:top_k].tolist())
                assert tok in top, f"{name}: k={top_k}: token {tok} not in the top {top_k}"
            want = harness.sample_reference(logits, temperature, top_k, top_p, float(u))
            assert tok == want or _near_boundary(logits, temperature, top_k, top_p, float(u)), \
                f"{name}: T={temperature} k={top_k} p={top_p} u={u}: graph {tok}, spec model {want}"
            if temperature == 3.0 and u >= 0.999:
                late.append(tok != am)
            checked += 1
    # u near 1 with a hot temperature and k = 5 picks a later candidate, not the arg-max.
    assert any(late), f"{name}: u near 1, T=3, k=5 always gave the arg-max"
    report(f"{name}: {checked} sampling checks ok")


def _near_boundary(logits, temperature, top_k, top_p, u, eps=1e-4):
    """True when u*total or top_p sits within eps of a cumulative boundary (float-order dependent)."""
    V = logits.shape[-1]
    k = top_k if 0 < top_k < V else V
    scaled = logits.astype(np.float64) / max(temperature, 1e-6)
    vals = np.sort(scaled)[::-1][:k]
    p = np.exp(vals - vals.max())
    p /= p.sum()
    c = np.cumsum(p)
    return bool(np.any(np.abs(c - p - top_p) < eps) or np.any(np.abs(c - u * c[-1]) < eps))
