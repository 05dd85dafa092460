"""Exported tiny models under onnxruntime vs transformers' logits (tests/fixtures/tiny/*/reference.json).

ONESTEP_TINY_DIR must hold `<name>.onnx` for name in llama, qwen2, llama_f16 (exported from
tests/fixtures/tiny/<name>; scripts/test does it). Tolerance: 1e-4 of max |logit| with an f32 cache
(5e-3 with an f16 cache)."""
import os

import pytest

import harness
import tiny_checks

TINY_DIR = harness.env_path("ONESTEP_TINY_DIR")


def _path(name):
    if TINY_DIR is None:
        pytest.skip("ONESTEP_TINY_DIR is not set (directory with the exported tiny <name>.onnx files)")
    p = os.path.join(TINY_DIR, f"{name}.onnx")
    if not os.path.exists(p):
        pytest.fail(f"ONESTEP_TINY_DIR={TINY_DIR} has no {name}.onnx")
    return p


@pytest.mark.parametrize("name", tiny_checks.TINY)
def test_tiny_logits(name):
    tiny_checks.check_logits(_path(name), name, lambda m: print("\n[tiny] " + m))


@pytest.mark.parametrize("name", tiny_checks.TINY)
def test_tiny_sampling(name):
    tiny_checks.check_sampling(_path(name), name, lambda m: print("\n[tiny] " + m))
