"""Reads a CTranslate2 model.bin (binary versions 5 and 6, the layout exporter/src/source/ct2.rs documents) into
numpy arrays: `spec, variables = read_ct2(path)`. Needs only numpy; shared by
scripts/refs/gen_whisper_transformers_refs.py and scripts/whisper_ggml.py.
"""
import struct
from pathlib import Path

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}


def read_ct2(path):
    """(spec name, {variable name: array in the file's dtype, bfloat16 widened to float32})."""
    b = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal pos
        (n,) = take("H")
        s = b[pos:pos + n - 1].decode()
        pos += n
        return s

    (version,) = take("I")
    assert version >= 5, f"binary version {version}"
    spec = string()
    take("I")
    (count,) = take("I")
    out = {}
    for _ in range(count):
        name = string()
        (rank,) = take("B")
        dims = take("I" * rank) if rank else ()
        dt, nbytes = take("BI")
        raw = b[pos:pos + nbytes]
        pos += nbytes
        if DTYPES[dt] is None:  # bfloat16
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, DTYPES[dt])
        out[name] = a.reshape(dims)
    return spec, out
