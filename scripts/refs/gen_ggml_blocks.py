#!/usr/bin/env python3
"""Write tests/fixtures/ggml/blocks.json: random blocks of every GGUF block type the exporter reads,
with llama.cpp's dequantization of each as computed by gguf-py (`gguf.quants.dequantize`, the NumPy port
of ggml's `dequantize_row_*` that llama.cpp's own conversion scripts use).

Usage: gen_ggml_blocks.py [OUT]   (default tests/fixtures/ggml/blocks.json; needs numpy and gguf==0.19.0)

Each type gets 3 blocks of random bytes whose f16 scale fields are replaced by finite values (every
other byte pattern is a valid block), plus one block with a zero scale. Values are stored as the hex of
their f32 bits so the Rust test (exporter/src/quant/ggml.rs) can demand bit equality.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[2]
# byte offsets of each type's f16 fields (d, and dmin/m where the type has one)
F16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/ggml/blocks.json"
    rng = np.random.default_rng(20261203)
    cases = {}
    for ty, fields in F16_FIELDS.items():
        _, size = GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
        for b in range(4):
            for i, at in enumerate(fields):
                v = 0.0 if (b == 3 and i == 0) else rng.normal(0, 0.02)
                raw[b, at : at + 2] = np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)
        vals = dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(-1)
        cases[ty.name] = {
            "blocks": raw.reshape(-1).tobytes().hex(),
            "values": vals.view(np.uint32).tolist(),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cases, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
