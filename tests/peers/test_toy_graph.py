"""The spec itself under onnxruntime: step graphs built by the Python reference exporter (make_toy_graph.py)
from the tiny fixtures must reproduce transformers' logits. Needs only numpy, onnx, onnxruntime."""
import pytest

import make_toy_graph
import tiny_checks


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


def _build(toy_dir, name, kv):
    import onnx

    path = toy_dir / f"{name}.{kv}.onnx"
    if not path.exists():
        onnx.save(make_toy_graph.build(str(tiny_checks.FIXTURES + "/" + name), kv, 64, 16), str(path))
    return str(path)


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("name", tiny_checks.TINY)
def test_toy_logits(toy_dir, name, kv):
    tiny_checks.check_logits(_build(toy_dir, name, kv), name, lambda m: print("\n[toy] " + m))


@pytest.mark.parametrize("name", tiny_checks.TINY)
def test_toy_sampling(toy_dir, name):
    tiny_checks.check_sampling(_build(toy_dir, name, "f32"), name, lambda m: print("\n[toy] " + m))
