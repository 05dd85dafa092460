"""Exported tiny models under onnxruntime, and under onestep's runtime, vs transformers' logits
(tests/fixtures/tiny/*/reference.json).

ONESTEP_TINY_DIR must hold `<name>.onnx` for every name in tiny_checks.EXPORTED (exported from
tests/fixtures/tiny/<name>; scripts/test does it); ONESTEP_BIN is the `onestep` binary. Tolerance: 1e-4 of
max |logit| with an f32 cache (5e-3 with an f16 cache)."""
import json
import os
import subprocess

import numpy as np
import pytest

import harness
import tiny_checks

TINY_DIR = harness.env_path("ONESTEP_TINY_DIR")
BIN = os.environ.get("ONESTEP_BIN", "")


def _path(name):
    if TINY_DIR is None:
        pytest.skip("ONESTEP_TINY_DIR is not set (directory with the exported tiny <name>.onnx files)")
    p = os.path.join(TINY_DIR, f"{name}.onnx")
    if not os.path.exists(p):
        pytest.fail(f"ONESTEP_TINY_DIR={TINY_DIR} has no {name}.onnx")
    return p


@pytest.mark.parametrize("name", tiny_checks.EXPORTED)
def test_tiny_logits(name):
    tiny_checks.check_logits(_path(name), name, lambda m: print("\n[tiny] " + m))


@pytest.mark.parametrize("name", tiny_checks.EXPORTED)
def test_tiny_sampling(name):
    tiny_checks.check_sampling(_path(name), name, lambda m: print("\n[tiny] " + m))


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("name", tiny_checks.EXPORTED)
def test_tiny_runtime(name, device):
    """onestep teacher-forces the reference ids (`onestep score`) and continues greedily: the runtime's
    top-8 logits at every position within the tolerance of transformers', greedy ids identical."""
    path = _path(name)
    if not BIN:
        pytest.skip("ONESTEP_BIN is not set (scripts/test sets it)")
    if device == "gpu" and not os.environ.get("ONESTEP_REQUIRE_GPU"):
        pytest.skip("GPU runs are checked where ONESTEP_REQUIRE_GPU is set (CI: lavapipe)")
    ref = tiny_checks.reference(name)
    ids, want = ref["ids"], np.array(ref["logits"], np.float32)
    greedy = ref["greedy"]
    jobs = [{"ids": ids, "start": 1, "generate": 0}, {"ids": ids, "start": len(ids), "generate": len(greedy)}]
    forced, gen = harness.onestep_score(BIN, path, jobs, "--top", "8", "--device", device)
    scale = float(np.max(np.abs(want)))
    tol = tiny_checks.REL_TOL[harness.StepSession(path).kv_dtype]
    rows = forced["rows"]  # rows[p]: the logits after ids[:p + 1] (positions start - 1 .. end)
    assert len(rows) == len(ids), len(rows)
    worst = max(abs(v - float(want[p][i])) for p, top8 in enumerate(rows) for i, v in top8) / scale
    assert worst <= tol, f"{name} on {device}: top-8 logits differ from transformers by {worst:.3g} of max|logit|"
    assert [top8[0][0] for top8 in rows] == list(np.argmax(want, -1))
    assert gen["generated"] == greedy, f"{name} on {device}: greedy {gen['generated']} != transformers {greedy}"
    print(f"\n[tiny] {name} on onestep {device}: top-8 max rel diff {worst:.2e} (tol {tol}), greedy == transformers")


@pytest.mark.parametrize("name", tiny_checks.EXPORTED)
def test_tiny_plan(name):
    """Every architecture's step graph takes the CPU planner's fused paths: each layer's attention reads
    the cache in place, each linear layer is bound to its weights (the o- and down-projections adding the
    residual in their epilogue, the others in groups with their norm), each MLP gate is fused, the embedding
    and the token choice are single steps (`onestep bench --json`'s plan)."""
    path = _path(name)
    if not BIN:
        pytest.skip("ONESTEP_BIN is not set (scripts/test sets it)")
    out = subprocess.run([BIN, "bench", path, "--prompt-tokens", "8", "--new-tokens", "2", "--repeat", "1",
                          "--warmup", "0", "--device", "cpu", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, f"onestep bench failed: {out.stderr[-2000:]}"
    plan = json.loads(out.stdout)["plan"]
    layers = json.load(open(os.path.join(tiny_checks.FIXTURES, name, "config.json")))["num_hidden_layers"]
    # q/k/v and gate/up are linear groups with the norm before them folded in, the SiLU gate too; the
    # output layer is a group of one after the final norm.
    want = {"cache_attention": layers, "silu_gate": layers, "linear": 7 * layers + 1, "embedding": 1,
            "token_choice": 1, "residual": 2 * layers, "linear_groups": 2 * layers + 1,
            "group_norms": 2 * layers + 1, "group_gates": layers, "norm_residual": 0}
    # Each attention reads its projections (rotaries, transposes and Qwen3's and Gemma 3's per-head q/k
    # norms taken in) where it rotates: not in SmolLM3's layers without rotary (its config's
    # `no_rope_layers` zeros). Each rotary it takes in was first a transposed rotary (q and k).
    cfg = json.load(open(os.path.join(tiny_checks.FIXTURES, name, "config.json")))
    want["attention_inputs"] = sum(cfg.get("no_rope_layers", [1] * layers))
    want["transpose_rope"] = 2 * want["attention_inputs"]
    if name.startswith("gemma"):
        # Gemma's residual adds follow a norm: the norm's step adds them (no linear epilogue); its gate
        # is GELU-tanh, in the gate/up group as SiLU is.
        want.update(silu_gate=0, gelu_gate=layers, residual=0, norm_residual=2 * layers)
    assert {k: plan[k] for k in want} == want, f"{name}: {plan}"
    print(f"\n[tiny] {name} plan: {plan}")
