"""KV cache paging on the wgpu backend (lavapipe in CI): SmolLM2 (real Q4_1 weights, f16 cache) with a
512-token prompt and 128 greedy tokens under three GPU cache budgets — every layer resident, half the
cache (13 layers resident, 17 streamed through the two-slot ring), and two slots only (all 30 layers
streamed). Asserted, for every budget against all-resident on the same backend:

- the 128 greedy tokens are identical, and so are the logits of every generated position (the same
  kernels read the same rows, so they must be bit-identical, not merely close);
- the residency the budget implies (layers resident / streamed, slots);
- the bytes moved, exactly: a streamed layer uploads the used prefix it lacks (the whole prefix each
  step when the ring cycles, nothing when every layer is resident), and every step reads back only its
  new rows (layers x 2 x rows x KVH x D x 2 bytes).

The CPU backend's tokens for the same prompt are printed beside them (not asserted here: near-ties may
flip between backends; tests/peers/test_gpu_vs_cpu.py checks CPU vs GPU with margins).

Needs ONESTEP_BIN and ONESTEP_SMOLLM2_LONG (an f16-cache export with >= 640 slots, max_chunk 64);
runs only when a GPU adapter exists (ONESTEP_REQUIRE_GPU=1 makes a missing adapter a failure).
Also runnable as a script: `python3 tests/peers/test_kv_paging.py BIN MODEL [NEW_TOKENS]`.
"""
import json
import os
import subprocess
import sys

import pytest

import harness

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
PROMPT = 512
# SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 cache: one layer's K + V row.
LAYERS, ROW = 30, 2 * 3 * 64 * 2
BUDGETS = [("all", 30, 0, 0), ("50%", 13, 17, 2), ("1", 0, 30, 2)]


def prompt_ids():
    """512 ids of real text: the fixture prompts, concatenated (repeated as needed)."""
    with open(os.path.join(FIX, "smollm2_llamacpp.json")) as f:
        cases = json.load(f)["cases"]
    ids = []
    while len(ids) < PROMPT:
        for c in cases:
            ids.extend(c["prompt_ids"])
    return ids[:PROMPT]


def score(bin_path, model, ids, new, device, budget="all"):
    jobs = [{"ids": ids, "start": len(ids), "generate": new}]
    return harness.onestep_score(bin_path, model, jobs, "--top", "4", "--device", device,
                                 "--gpu-cache-budget", budget, "--kv-page-rows", "16")[0]


def expected_bytes(new, chunk, streamed, slots):
    """Cache bytes up and down for a prefill in chunks of `chunk` and `new - 1` decode steps."""
    steps = [(p, min(chunk, PROMPT - p)) for p in range(0, PROMPT, chunk)]
    steps += [(PROMPT + i, 1) for i in range(new - 1)]
    up = sum(p for p, _ in steps) * ROW * streamed if streamed > slots else 0
    down = sum(t for _, t in steps) * ROW * LAYERS
    return up, down


def check(bin_path, model, new):
    ids = prompt_ids()
    base = None
    report, fails = [], []
    for budget, resident, streamed, slots in BUDGETS:
        r = score(bin_path, model, ids, new, "gpu", budget)
        kv = r["kv"]
        up, down = expected_bytes(new, 64, streamed, slots)
        got = (kv["layers_resident"], kv["layers_streamed"], kv["slots"])
        if got != (resident, streamed, slots):
            fails.append(f"budget {budget}: resident/streamed/slots {got}, expected {(resident, streamed, slots)}")
        if (kv["session_bytes_up"], kv["session_bytes_down"]) != (up, down):
            fails.append(f"budget {budget}: bytes up/down {kv['session_bytes_up']}/{kv['session_bytes_down']}, "
                         f"expected {up}/{down}")
        report.append(f"{budget}: {resident} resident, {streamed} streamed, {kv['gpu_bytes']} GPU bytes, "
                      f"{kv['session_bytes_up']} B up / {kv['session_bytes_down']} B down in "
                      f"{kv['session_steps']} steps, last step {kv['last_step_bytes_up']} B up, "
                      f"{kv['session_stalls']} stalls")
        if base is None:
            base = r
            continue
        same = sum(1 for _ in zip(r["generated"], base["generated"]))
        first = next((i for i, (a, b) in enumerate(zip(r["generated"], base["generated"])) if a != b), None)
        if first is not None or len(r["generated"]) != len(base["generated"]):
            fails.append(f"budget {budget}: greedy tokens differ from all-resident at step {first} "
                         f"(of {same})")
        elif r["gen_rows"] != base["gen_rows"]:
            fails.append(f"budget {budget}: same tokens but logits differ from all-resident")
    cpu = score(bin_path, model, ids, new, "cpu")
    agree = next((i for i, (a, b) in enumerate(zip(cpu["generated"], base["generated"])) if a != b),
                 len(base["generated"]))
    text = (f"[kv paging, {os.path.basename(model)}, prompt {PROMPT}, {new} new] tokens identical for every "
            f"budget: {not any('differ' in f for f in fails)}; CPU backend agrees for the first {agree}/"
            f"{len(base['generated'])} tokens\n  " + "\n  ".join(report))
    return text, fails


BIN = os.environ.get("ONESTEP_BIN", "")
MODEL = os.environ.get("ONESTEP_SMOLLM2_LONG", "")


def _adapter_ok():
    out = subprocess.run([BIN, "run", MODEL, "-p", "hi", "--max-tokens", "1", "--device", "gpu"],
                         capture_output=True, text=True)
    return out.returncode == 0, out.stderr[-500:]


@pytest.mark.skipif(not BIN or not MODEL, reason="ONESTEP_BIN / ONESTEP_SMOLLM2_LONG not set (scripts/test sets them)")
def test_tokens_identical_for_every_gpu_cache_budget():
    ok, why = _adapter_ok()
    if not ok:
        if os.environ.get("ONESTEP_REQUIRE_GPU"):
            pytest.fail(f"ONESTEP_REQUIRE_GPU is set but --device gpu failed: {why}")
        pytest.skip(f"no GPU adapter: {why}")
    text, fails = check(BIN, MODEL, int(os.environ.get("ONESTEP_KV_TOKENS", "128")))
    print(text)
    assert not fails, "\n".join(fails)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: test_kv_paging.py BIN MODEL [NEW_TOKENS]")
    t, f = check(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 128)
    print(t)
    print("\n".join(f) if f else "ok")
    sys.exit(1 if f else 0)
