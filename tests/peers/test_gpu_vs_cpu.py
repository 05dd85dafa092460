"""The wgpu backend against the CPU backend on the exported SmolLM2 file (lavapipe in CI; a real GPU through
scripts/device-bench).

For every prompt of tests/fixtures/smollm2_llamacpp.json, `onestep score` prefills the prompt and continues
greedily for ONESTEP_GPU_TOKENS tokens (default 32: lavapipe decodes ~5 tok/s with its kernel variants) on
`--device cpu` and on `--device gpu`. Asserted: the greedy tokens are identical up to the first step where the CPU's own top-2
margin is below 0.05 (a near-tie that rounding may flip), top-1 equal wherever that margin exceeds 0.05, and the
logits of the CPU's top-8 ids within LOGIT_TOL[cache dtype] of the GPU's; the max-abs-diff is reported.

Both export forms run: the f32-cache one (8 tokens) holds the backends to the same f32 math in another
summation order; the f16-cache one (the default form) adds the cache's rounding, where a K/V value that differs
in its last f32 bits may round to the neighbouring f16 and the difference grows through the layers — measured
on `capital` step 4: CPU vs GPU 0.025, CPU vs onnxruntime 0.010, GPU vs onnxruntime 0.015, while the same
step with an f32 cache agrees to 5e-5 all three ways.

Runs only when a GPU adapter exists (ONESTEP_REQUIRE_GPU=1 makes a missing adapter a failure, as .ci/run does).
Also runnable as a script: `python3 tests/peers/test_gpu_vs_cpu.py BIN MODEL [TOKENS]`.
"""
import json
import os
import subprocess
import sys

import pytest

import harness

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
MARGIN = 0.05
# f32: the same math in another summation order; f16: plus one-ulp flips of the cache's rounding (see above).
LOGIT_TOL = {"f32": 1e-3, "f16": 0.05}


def score(bin_path, model, jobs, device):
    return harness.onestep_score(bin_path, model, jobs, "--top", "8", "--device", device)


def compare(bin_path, model, tokens, tol):
    """Returns (report, failures) for `tokens` greedy steps after each prompt, logits within `tol`."""
    with open(os.path.join(FIX, "smollm2_llamacpp.json")) as f:
        cases = json.load(f)["cases"]
    jobs = [{"ids": c["prompt_ids"], "start": len(c["prompt_ids"]), "generate": tokens} for c in cases]
    cpu = score(bin_path, model, jobs, "cpu")
    gpu = score(bin_path, model, jobs, "gpu")
    fails, report, worst, n, agree = [], [], 0.0, 0, 0
    for c, a, b in zip(cases, cpu, gpu):
        same = 0
        for i, (ta, tb) in enumerate(zip(a["generated"], b["generated"])):
            ra, rb = a["gen_rows"][i], b["gen_rows"][i]
            margin = ra[0][1] - ra[1][1] if len(ra) > 1 else 1e9
            n += 1
            agree += ra[0][0] == rb[0][0]
            gpu_by_id = {int(k): v for k, v in rb}
            common = [abs(v - gpu_by_id[int(k)]) for k, v in ra if int(k) in gpu_by_id]
            if common:
                worst = max(worst, max(common))
                if max(common) > tol:
                    fails.append(f"{c['name']} step {i}: top-8 logits differ by {max(common):.4f}")
            if ta != tb:
                if margin >= MARGIN:
                    fails.append(f"{c['name']} step {i}: gpu {tb} != cpu {ta} (cpu margin {margin:.3f})")
                break
            same += 1
        report.append(f"{c['name']} {same}/{len(a['generated'])}")
    text = (f"[gpu vs cpu, {os.path.basename(model)}] greedy equal: " + ", ".join(report)
            + f"; top-1 equal {agree}/{n}; max |logit diff| on the CPU's top-8 {worst:.2e} (tol {tol})")
    return text, fails


def _adapter_ok(bin_path, model):
    out = subprocess.run([bin_path, "run", model, "-p", "hi", "--max-tokens", "1", "--device", "gpu", "--json"],
                         capture_output=True, text=True)
    return out.returncode == 0, out.stderr[-500:]


BIN = os.environ.get("ONESTEP_BIN", "")
PATHS = [p for p in os.environ.get("ONESTEP_SMOLLM2_ONNX", "").split(os.pathsep) if p.strip()]


def _kv_dtype(model):
    return harness.StepSession(model).kv_dtype


@pytest.mark.skipif(not PATHS or not BIN, reason="ONESTEP_SMOLLM2_ONNX and ONESTEP_BIN are not set")
@pytest.mark.parametrize("model", PATHS or ["unset"])
def test_gpu_matches_cpu(model):
    ok, err = _adapter_ok(BIN, model)
    if not ok:
        if os.environ.get("ONESTEP_REQUIRE_GPU"):
            pytest.fail(f"ONESTEP_REQUIRE_GPU is set but the GPU run failed: {err}")
        pytest.skip(f"no usable GPU adapter: {err}")
    kv = _kv_dtype(model)
    # the default (f16) form decodes further; the f32 form is the tight check on fewer steps
    tokens = int(os.environ.get("ONESTEP_GPU_TOKENS", "32")) if kv == "f16" else 8
    text, fails = compare(BIN, model, tokens, LOGIT_TOL[kv])
    print("\n" + text)
    assert not fails, "\n".join(fails)


if __name__ == "__main__":
    t, f = compare(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 32,
                   LOGIT_TOL[_kv_dtype(sys.argv[2])])
    print(t)
    print("\n".join(f) if f else "no failures")
    sys.exit(1 if f else 0)
