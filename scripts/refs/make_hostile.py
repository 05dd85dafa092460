#!/usr/bin/env python3
"""Write the hostile-file corpus tests/fixtures/hostile/ (+ MANIFEST.json) from a micro model.

Usage: scripts/refs/make_hostile.py [--exporter target/debug/onestep-export] [--only-ct2]

Every file is a crafted or damaged model that a loader must refuse with a typed error (never a panic, an
abort, an out-of-bounds read or an allocation sized by an unchecked count). MANIFEST.json maps each file
name to the error class expected from the Rust API (the variant of `onestep::Error` for `*.onnx`, of
`onestep_export::source::SourceError` for `*.gguf` and `*.safetensors`) and says what the file is.
`*.safetensors` files are read as the only weights file of a folder holding the config and tokenizer of
tests/fixtures/tiny/llama_f16. `ct2_*.bin` files are CTranslate2 `model.bin` files, read by
`onestep_export::source::ct2::Ct2Model::open` (their error class is also a `SourceError` variant);
`--only-ct2` rewrites just those (and their MANIFEST.json entries), without running the exporter.

Bases: a micro llama GGUF (scripts/refs/make_tiny_gguf.py --micro --type q8_0, ~28 KB) and its export
(--max-cache 16 --max-chunk 4, ~42 KB), which is also written, valid, to
tests/fixtures/micro/micro_llama_q8.onnx for the soak, churn and threads tests. Deterministic; total size < 1 MB. Requires numpy, onnx, gguf,
safetensors.
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/hostile"
# The valid base export, kept for the soak/churn/threads tests (runtime/tests/soak.rs, threads.rs).
MICRO = ROOT / "tests/fixtures/micro"
manifest = {}


def put(name, data, cls, what):
    (OUT / name).write_bytes(data)
    manifest[name] = {"error": cls, "what": what}


def onnx_bytes(m):
    return m.SerializeToString()


def meta(m, key):
    return next(p for p in m.metadata_props if p.key == key)


def make_onnx(base_bytes):
    base = onnx.load_from_string(base_bytes)
    n = len(base_bytes)
    for cut in [0, 1, 7, 64, 1000, n // 2, n - 1]:
        cls = "Decode"
        put(f"onnx_truncated_{cut}.onnx", base_bytes[:cut], cls, f"the export cut to {cut} of {n} bytes")
    put("onnx_random_bytes.onnx", bytes(range(7, 250, 13)), "Decode", "not protobuf at all")
    b = bytearray(base_bytes)
    b[0] ^= 0xFF
    b[1] ^= 0x55
    put("onnx_bitflip_header.onnx", bytes(b), "Decode", "bit flips in the first field tags")

    def variant(name, cls, what, edit):
        m = onnx.ModelProto()
        m.CopyFrom(base)
        edit(m)
        put(name, onnx_bytes(m), cls, what)

    g_init = lambda m, pred: next(t for t in m.graph.initializer if pred(t))
    big = lambda t: len(t.raw_data) > 256

    def huge_dims(m):
        t = g_init(m, big)
        del t.dims[:]
        t.dims.extend([1 << 31, 1 << 31, 1 << 31])
    variant("onnx_huge_dims.onnx", "Limit", "an initializer declaring 2^93 elements", huge_dims)

    def overflow_dims(m):
        t = g_init(m, big)
        del t.dims[:]
        t.dims.extend([(1 << 62), 4, 4])
    variant("onnx_overflow_dims.onnx", "Limit", "initializer dims whose product overflows u64", overflow_dims)

    def negative_dim(m):
        t = g_init(m, big)
        t.dims[0] = -1
    variant("onnx_negative_dim.onnx", "Tensor", "an initializer with dimension -1", negative_dim)

    def size_mismatch(m):
        t = g_init(m, big)
        t.raw_data = t.raw_data[:-1]
    variant("onnx_data_size_mismatch.onnx", "Tensor", "raw_data one byte shorter than the shape needs",
            size_mismatch)

    def wrong_dtype(m):
        g_init(m, big).data_type = 99
    variant("onnx_unknown_dtype.onnx", "Tensor", "an initializer of element type 99", wrong_dtype)

    def external(m):
        t = g_init(m, big)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in [("location", "../../../../etc/passwd"), ("offset", str(1 << 40)), ("length", "4096")]:
            e = t.external_data.add()
            e.key, e.value = k, v
    variant("onnx_external_outside.onnx", "Tensor", "external data pointing outside the file", external)

    def cycle(m):
        last = m.graph.node[-1]
        m.graph.node[0].input[0] = last.output[0]
    variant("onnx_cycle.onnx", "Node", "the first node reads the last node's output (a cycle)", cycle)

    def missing_input(m):
        keep = [i for i in m.graph.input if i.name != "position"]
        del m.graph.input[:]
        m.graph.input.extend(keep)
    variant("onnx_missing_input.onnx", "Node", "graph input `position` removed", missing_input)

    def input_dtype(m):
        i = next(i for i in m.graph.input if i.name == "past.0.key")
        i.type.tensor_type.elem_type = 99
    variant("onnx_input_unknown_dtype.onnx", "Tensor", "a cache input of element type 99", input_dtype)

    def wrong_opset(m):
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = 7
    variant("onnx_wrong_opset.onnx", "Opset", "default-domain opset 7", wrong_opset)

    def unknown_op(m):
        m.graph.node[len(m.graph.node) // 2].op_type = "TotallyUnknownOp"
    variant("onnx_unknown_op.onnx", "UnsupportedOps", "a node of an unknown op type", unknown_op)

    def bad_attr(m):
        nd = next(nd for nd in m.graph.node if nd.attribute)
        nd.attribute[0].type = onnx.AttributeProto.GRAPH
    variant("onnx_bad_attribute.onnx", "Node", "an attribute of type GRAPH (not supported)", bad_attr)

    def huge_cache(m):
        for i in m.graph.input:
            if i.name.startswith("past."):
                i.type.tensor_type.shape.dim[2].dim_value = 1 << 40
        for o in m.graph.output:
            if o.name.startswith("new."):
                o.type.tensor_type.shape.dim[2].dim_value = (1 << 40) + 4
        meta(m, "onestep.max_cache").value = str(1 << 40)
    variant("onnx_huge_cache.onnx", "Limit", "a KV cache of 2^40 slots (a 10 GB+ allocation per session)",
            huge_cache)

    def wrapping_cache(m):
        for i in m.graph.input:
            if i.name.startswith("past."):
                i.type.tensor_type.shape.dim[1].dim_value = 1 << 32
                i.type.tensor_type.shape.dim[2].dim_value = 1 << 32
        meta(m, "onestep.max_cache").value = str(1 << 32)
    variant("onnx_wrapping_cache.onnx", "Limit", "cache dims whose byte count wraps 64 bits", wrapping_cache)

    def no_tokenizer(m):
        keep = [p for p in m.metadata_props if p.key != "onestep.tokenizer_json"]
        del m.metadata_props[:]
        m.metadata_props.extend(keep)
    variant("onnx_no_tokenizer.onnx", "Metadata", "metadata `onestep.tokenizer_json` missing", no_tokenizer)

    def bad_version(m):
        meta(m, "onestep.format_version").value = "999"
    variant("onnx_format_version.onnx", "Contract", "format version 999", bad_version)

    def bad_number(m):
        meta(m, "onestep.max_chunk").value = "-3"
    variant("onnx_bad_metadata_number.onnx", "Metadata", "max_chunk = -3", bad_number)

    def huge_expand(m):
        shape = helper.make_tensor("hostile_shape", TensorProto.INT64, [3], [1 << 20, 1 << 20, 1 << 20])
        one = helper.make_tensor("hostile_one", TensorProto.FLOAT, [1], [1.0])
        m.graph.initializer.extend([shape, one])
        m.graph.node.insert(0, helper.make_node("Expand", ["hostile_one", "hostile_shape"], ["hostile_big"],
                                                name="hostile_expand"))
        m.graph.output.append(helper.make_tensor_value_info("hostile_big", TensorProto.FLOAT, None))
    variant("onnx_fold_huge_expand.onnx", "Node", "a constant Expand to 2^60 elements (folded at load)",
            huge_expand)

    def huge_range(m):
        for name, v in [("hostile_start", 0), ("hostile_limit", 1 << 62), ("hostile_delta", 1)]:
            m.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [], [v]))
        m.graph.node.insert(0, helper.make_node("Range", ["hostile_start", "hostile_limit", "hostile_delta"],
                                                ["hostile_r"], name="hostile_range"))
        m.graph.output.append(helper.make_tensor_value_info("hostile_r", TensorProto.INT64, None))
    def concat_scalars(m):
        for name, v in [("hostile_a", 1), ("hostile_b", 2)]:
            m.graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [], [v]))
        m.graph.node.insert(0, helper.make_node("Concat", ["hostile_a", "hostile_b"], ["hostile_c"], axis=0,
                                                name="hostile_concat"))
        m.graph.output.append(helper.make_tensor_value_info("hostile_c", TensorProto.INT64, None))
    # Found by the onnx_load fuzz target (a Concat of rank-0 tensors indexed an empty shape).
    variant("onnx_concat_scalars.onnx", "Node", "a Concat of two scalars (no axis 0)", concat_scalars)

    variant("onnx_fold_huge_range.onnx", "Node", "a constant Range of 2^62 elements (folded at load)",
            huge_range)


# ---------------------------------------------------------------- GGUF
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_header(n_tensors, n_kv, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv_str(k, v):
    return gstr(k) + struct.pack("<I", 8) + gstr(v)


def make_gguf(base):
    n = len(base)
    for cut in [0, 3, 8, 23, 200, n // 2, n - 1]:
        put(f"gguf_truncated_{cut}.gguf", base[:cut], "Format", f"the micro GGUF cut to {cut} of {n} bytes")
    b = bytearray(base)
    b[0:4] = b"GGML"
    put("gguf_bad_magic.gguf", bytes(b), "Format", "magic GGML")
    put("gguf_version1.gguf", gguf_header(0, 0, version=1), "Unsupported", "GGUF version 1")
    put("gguf_big_endian.gguf", b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "Unsupported", "big-endian header")
    put("gguf_huge_tensor_count.gguf", gguf_header(1 << 62, 0), "Format", "2^62 tensors in a 24-byte file")
    put("gguf_huge_kv_count.gguf", gguf_header(0, (1 << 64) - 1), "Format", "2^64-1 metadata entries")
    put("gguf_huge_string.gguf", gguf_header(0, 1) + struct.pack("<Q", (1 << 64) - 1) + b"abc", "Format",
        "a key of length 2^64-1")
    put("gguf_huge_array.gguf",
        gguf_header(0, 1) + gstr("a") + struct.pack("<IIQ", 9, 0, 1 << 40) + b"\0" * 16, "Format",
        "an array of 2^40 uint8 in a 60-byte file")
    deep = gguf_header(0, 1) + gstr("deep") + struct.pack("<I", 9)
    for _ in range(8):
        deep += struct.pack("<IQ", 9, 1)
    put("gguf_nested_arrays.gguf", deep + struct.pack("<IQ", 0, 1) + b"\0", "Format",
        "arrays nested 9 deep")
    put("gguf_bad_value_type.gguf", gguf_header(0, 1) + gstr("k") + struct.pack("<I", 77) + b"\0" * 8,
        "Format", "metadata value type 77")
    put("gguf_bad_utf8.gguf", gguf_header(0, 1) + gstr("k") + struct.pack("<IQ", 8, 2) + b"\xff\xfe",
        "Format", "a string value that is not UTF-8")
    put("gguf_bad_bool.gguf", gguf_header(0, 1) + gstr("k") + struct.pack("<I", 7) + b"\x07", "Format",
        "a bool byte 7")

    def with_tensor(name, dims, ggml_type, offset, data=b""):
        hdr = gguf_header(1, 1) + kv_str("general.architecture", "llama")
        hdr += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        hdr += struct.pack("<IQ", ggml_type, offset)
        hdr += b"\0" * ((-len(hdr)) % 32)
        return hdr + data

    put("gguf_rank5.gguf", with_tensor("t", [1, 1, 1, 1, 1], 0, 0, b"\0" * 32), "Format",
        "a tensor of rank 5")
    put("gguf_dims_overflow.gguf", with_tensor("t", [1 << 40, 1 << 40], 0, 0, b"\0" * 32), "Format",
        "tensor dims whose byte size overflows")
    put("gguf_offset_outside.gguf", with_tensor("t", [8], 0, 1 << 50, b"\0" * 32), "Format",
        "tensor data offset 2^50 in a small file")
    put("gguf_data_past_end.gguf", with_tensor("t", [1024], 0, 0, b"\0" * 32), "Format",
        "tensor needs 4096 bytes, 32 present")
    put("gguf_unknown_type.gguf", with_tensor("t", [8], 200, 0, b"\0" * 32), "Format", "ggml type 200")
    put("gguf_misaligned_offset.gguf", with_tensor("t", [8], 0, 3, b"\0" * 64), "Format",
        "tensor data offset 3 (alignment 32)")
    put("gguf_not_block_multiple.gguf", with_tensor("t", [33], 8, 0, b"\0" * 64), "Format",
        "q8_0 row of 33 (block size 32)")
    def padded(b):
        return b + b"\0" * ((-len(b)) % 32)

    put("gguf_no_tensors.gguf", padded(gguf_header(0, 1) + kv_str("general.architecture", "llama")), "Key",
        "a llama with no keys and no tensors")
    put("gguf_unknown_arch.gguf", padded(gguf_header(0, 1) + kv_str("general.architecture", "mamba")),
        "Unsupported", "architecture mamba")


def patch_gguf(base, key, new_type):
    """`base` (GGUF bytes) with the value type of metadata `key` replaced by `new_type`."""
    raw = bytearray(base)
    i = raw.index(gstr(key)) + len(gstr(key))
    raw[i:i + 4] = struct.pack("<I", new_type)
    return bytes(raw)


# ---------------------------------------------------------------- safetensors
def st_file(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def make_safetensors():
    src = (ROOT / "tests/fixtures/tiny/llama_f16/model.safetensors").read_bytes()
    put("st_empty.safetensors", b"", "Format", "an empty file")
    put("st_huge_header_len.safetensors", struct.pack("<Q", (1 << 64) - 1) + b"{}", "Format",
        "header length 2^64-1")
    put("st_header_past_end.safetensors", struct.pack("<Q", 1 << 20) + b"{}", "Format",
        "header length 1 MiB in a 10-byte file")
    put("st_bad_json.safetensors", struct.pack("<Q", 5) + b"{\"a\":", "Format", "truncated header JSON")
    put("st_offsets_outside.safetensors",
        st_file({"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 1 << 40]}},
                b"\0" * 128), "Format", "data offsets end at 2^40")
    put("st_offsets_reversed.safetensors",
        st_file({"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [128, 0]}},
                b"\0" * 128), "Format", "data offsets reversed")
    put("st_shape_mismatch.safetensors",
        st_file({"model.norm.weight": {"dtype": "F16", "shape": [65], "data_offsets": [0, 128]}},
                b"\0" * 128), "Format", "shape needs 130 bytes, offsets give 128")
    put("st_shape_overflow.safetensors",
        st_file({"model.norm.weight": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 16]}},
                b"\0" * 16), "Format", "shape whose size overflows")
    put("st_unsupported_dtype.safetensors",
        st_file({"model.norm.weight": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16),
        "Unsupported", "an I64 weight")
    put("st_unknown_tensor.safetensors",
        st_file({"model.rogue.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
        "Unsupported", "a tensor with no llama counterpart")
    put("st_missing_tensors.safetensors",
        st_file({"model.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [0, 128]}},
                b"\0" * 128), "MissingTensor", "only one of the model's tensors")
    hl = struct.unpack("<Q", src[:8])[0]
    header = json.loads(src[8:8 + hl])
    header["model.norm.weight"]["shape"] = [2, 32]
    put("st_wrong_shape.safetensors", st_file(header, src[8 + hl:]), "Shape",
        "the tiny llama with model.norm.weight reshaped to [2, 32] (config: [64])")
    put("st_truncated_header.safetensors", src[: 8 + hl // 2], "Format", "the tiny llama cut mid-header")
    put("st_truncated_data.safetensors", src[: 8 + hl + 1000], "Format", "the tiny llama cut in its data")


# ---------------------------------------------------------------- CTranslate2 model.bin
def ct2_str(s):
    """A CTranslate2 string: u16 length counting the trailing NUL, the bytes, the NUL."""
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack("<H", len(b) + 1) + b + b"\0"


def ct2_var(name, dims, dtype_id, data, nbytes=None):
    out = ct2_str(name) + struct.pack("<B", len(dims)) + b"".join(struct.pack("<I", d) for d in dims)
    return out + struct.pack("<BI", dtype_id, len(data) if nbytes is None else nbytes) + data


def ct2_file(variables, aliases=(), version=6, n_vars=None):
    out = struct.pack("<I", version) + ct2_str("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables) if n_vars is None else n_vars) + b"".join(variables)
    out += struct.pack("<I", len(aliases)) + b"".join(ct2_str(a) + ct2_str(t) for a, t in aliases)
    return out


def make_ct2():
    # A valid base: an int8 flag, a float16 matrix and an alias of it (as Whisper's projection is).
    flag = ct2_var("decoder/activation", [], 1, b"\3")
    emb = ct2_var("decoder/embeddings/weight", [8, 4], 4, bytes(range(64)))
    alias = ("decoder/projection/weight", "decoder/embeddings/weight")
    base = ct2_file([flag, emb], [alias])
    alias_table = 4 + len(ct2_str(alias[0]) + ct2_str(alias[1]))
    put("ct2_truncated.bin", base[: len(base) - alias_table - 20], "Format",
        "a small model.bin cut in its float16 data")
    put("ct2_huge_var_count.bin", ct2_file([], n_vars=(1 << 32) - 1), "Format",
        "2^32-1 variables in a 30-byte file")
    put("ct2_dims_overflow.bin",
        ct2_file([ct2_var("w", [(1 << 32) - 1] * 4, 0, b"\0" * 16, nbytes=16)]), "Format",
        "dims [2^32-1] x 4 whose element count overflows")
    put("ct2_bytes_mismatch.bin", ct2_file([ct2_var("w", [4, 4], 4, b"\0" * 30)]), "Format",
        "a float16 [4, 4] variable holding 30 bytes")
    put("ct2_unknown_dtype.bin", ct2_file([ct2_var("w", [4], 9, b"\0" * 16)]), "Format", "dtype id 9")
    put("ct2_bad_utf8.bin", ct2_file([ct2_var(b"\xff\xfe", [], 1, b"\1")]), "Format",
        "a variable name that is not UTF-8")
    put("ct2_dangling_alias.bin", ct2_file([flag], [("a", "nowhere")]), "Format",
        "an alias naming no variable")
    put("ct2_version7.bin", struct.pack("<I", 7) + base[4:], "Unsupported", "binary version 7")


def only_ct2():
    """Rewrites the ct2_* files and their MANIFEST.json entries, leaving every other file as it is."""
    global manifest
    path = OUT / "MANIFEST.json"
    old = json.loads(path.read_text())
    for p in OUT.glob("ct2_*"):
        p.unlink()
    manifest = {k: v for k, v in old.items() if not k.startswith("ct2_")}
    make_ct2()
    path.write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    print(f"{sum(k.startswith('ct2_') for k in manifest)} ct2 files in {OUT}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exporter", default=str(ROOT / "target/debug/onestep-export"))
    ap.add_argument("--only-ct2", action="store_true", help="rewrite only the ct2_*.bin files")
    a = ap.parse_args()
    if a.only_ct2:
        only_ct2()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():
        p.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        g = Path(tmp) / "micro.gguf"
        o = Path(tmp) / "micro.onnx"
        subprocess.run([sys.executable, str(ROOT / "scripts/refs/make_tiny_gguf.py"), str(g), "--micro",
                        "--type", "q8_0"], check=True)
        # Run from the temp dir with a relative input: the file records its source path.
        subprocess.run([str(Path(a.exporter).resolve()), "micro.gguf", "-o", "micro.onnx", "--max-cache",
                        "16", "--max-chunk", "4", "-q"], check=True, stdout=subprocess.DEVNULL, cwd=tmp)
        gb = g.read_bytes()
        MICRO.mkdir(parents=True, exist_ok=True)
        (MICRO / "micro_llama_q8.onnx").write_bytes(o.read_bytes())
        make_onnx(o.read_bytes())
        make_gguf(gb)
        put("gguf_bad_arch_type.gguf", patch_gguf(gb, "general.architecture", 4), "Format",
            "the micro GGUF with general.architecture typed uint32 (its string bytes then misparse)")
    make_safetensors()
    make_ct2()
    (OUT / "MANIFEST.json").write_text(json.dumps(dict(sorted(manifest.items())), indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(manifest)} files, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
