#!/usr/bin/env python3
"""A Python reference exporter: builds the step graph of docs/GRAPH.md from a Hugging Face folder.

Needs only numpy + onnx (no torch), so it runs in CI. It writes the *source* weight forms of the spec
(f32 -> Gemm, f16/bf16 -> Cast + Gemm; embeddings Gather / Cast(Gather)), rotate_half rotary
(interleaved=0), an f32 or f16 KV cache, and all metadata keys of format/src/contract.rs. It is a
cross-check of the spec (run it under onnxruntime against transformers' logits: tests/peers/test_toy_graph.py)
and a second opinion for the Rust exporter. It does not do the 64-byte payload alignment of the spec (plain
onnx.save), so it is for onnxruntime, not for onestep's mmap loader.

    python3 tests/peers/make_toy_graph.py tests/fixtures/tiny/llama out.onnx [--kv-dtype f32|f16]
        [--max-cache 64] [--max-chunk 16]

Supported: model_type llama / qwen2 (q/k/v biases), tied or untied embeddings, safetensors single or
sharded, rope scaling llama3 / linear / none, config in the classic (`rope_theta`, `rope_scaling`) or the
transformers 5 (`rope_parameters`) form.
"""
import argparse
import json
import math
import os
import struct

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 23

# --- safetensors without torch -------------------------------------------------------------------------

_ST = {"F32": (TensorProto.FLOAT, np.float32), "F16": (TensorProto.FLOAT16, np.float16),
       "BF16": (TensorProto.BFLOAT16, np.uint16)}


def read_safetensors(folder):
    """Returns {name: (onnx_dtype, np array (bf16 as raw uint16 bits))} for every safetensors file."""
    idx = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) \
        else ["model.safetensors"]
    out = {}
    for fn in files:
        raw = open(os.path.join(folder, fn), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            odt, npdt = _ST[info["dtype"]]
            a, b = info["data_offsets"]
            out[name] = (odt, np.frombuffer(raw[base + a: base + b], dtype=npdt).reshape(info["shape"]))
    return out


def to_f32(odt, arr):
    if odt == TensorProto.BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


# --- config / rope ----------------------------------------------------------------------------------------

def rope_params(cfg):
    if "rope_parameters" in cfg and cfg["rope_parameters"]:
        rp = dict(cfg["rope_parameters"])
        return float(rp.get("rope_theta", 10000.0)), rp
    return float(cfg.get("rope_theta", 10000.0)), dict(cfg.get("rope_scaling") or {})


def inv_freq(cfg, head_dim):
    theta, sc = rope_params(cfg)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} not supported by the toy exporter")
    return inv


# --- graph building ------------------------------------------------------------------------------------------

class G:
    def __init__(self):
        self.nodes, self.inits, self.names = [], [], set()

    def node(self, op, inputs, name, n_out=1, domain="", **attrs):
        assert name not in self.names, name
        self.names.add(name)
        outs = [name] if n_out == 1 else [f"{name}:{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, name, arr, odt=None):
        if odt is None:
            odt = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t = TensorProto()
        t.name, t.data_type = name, odt
        t.dims.extend(arr.shape)
        t.raw_data = np.ascontiguousarray(arr).tobytes()
        self.inits.append(t)
        return name

    def const(self, name, value, dtype=np.int64):
        return self.init(name, np.array(value, dtype=dtype))

    def const_shared(self, name, value, dtype=np.int64):
        """A constant that several builders may ask for under one name."""
        if not any(t.name == name for t in self.inits):
            self.init(name, np.array(value, dtype=dtype))
        return name


class HFWeights:
    """Source weight forms of a Hugging Face folder (f32 -> Gemm; f16/bf16 -> Cast + Gemm)."""

    NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}

    def __init__(self, folder, tied, bias):
        self.W, self.tied, self.bias, self.dtypes = read_safetensors(folder), tied, bias, set()
        self.emb = None

    def _hf(self, canon):
        if canon.startswith("blk."):
            _, i, what = canon.split(".")
            return f"model.layers.{i}.{self.NAMES[what]}"
        return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[canon]

    def _weight(self, g, canon, dst):
        odt, arr = self.W[self._hf(canon) + ".weight"]
        self.dtypes.add(odt)
        return g.init(dst, arr, odt), odt

    def norm(self, g, x, canon, dst, node, eps):
        odt, arr = self.W[self._hf(canon) + ".weight"]
        return g.node("RMSNormalization", [x, g.init(dst, to_f32(odt, arr))], node, axis=-1, epsilon=eps)

    def linear(self, g, x, canon, dst, node):
        w, odt = self._weight(g, canon, dst + ".weight")
        return self._gemm(g, x, w, odt, node, canon)

    def _gemm(self, g, x, w, odt, node, canon, out=None):
        if odt != TensorProto.FLOAT:
            w = g.node("Cast", [w], node + ".cast_w", to=TensorProto.FLOAT)
        ins = [x, w]
        hb = self._hf(canon) + ".bias"
        if self.bias and hb in self.W:
            bodt, barr = self.W[hb]
            ins.append(g.init(node + ".bias", to_f32(bodt, barr)))
        if out:
            g.nodes.append(helper.make_node("Gemm", ins, [out], name=node, transB=1))
            return out
        return g.node("Gemm", ins, node, transB=1)

    def embed(self, g, ids):
        self.emb = self._weight(g, "token_embd", "token_embd.weight")
        e, odt = self.emb
        x = g.node("Gather", [e, ids], "embed", axis=0)
        return x if odt == TensorProto.FLOAT else g.node("Cast", [x], "embed.cast", to=TensorProto.FLOAT)

    def output(self, g, hn):
        w, odt = self.emb if self.tied else self._weight(g, "output", "output.weight")
        return self._gemm(g, hn, w, odt, "output", "output", out="logits")


def _ggml_blocks(t, block_bytes):
    n = int(t.shape[1]) if len(t.shape) > 1 else 1
    k = int(t.shape[0])
    raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n, k // 32, block_bytes)
    return n, k, raw


class GGUFWeights:
    """Block forms of docs/GRAPH.md for a GGUF (Q4_0, Q4_1, Q8_0 -> MatMulNBits; F32/F16 -> Gemm)."""

    def __init__(self, reader):
        self.t = {t.name: t for t in reader.tensors}
        self.dtypes = set()
        self.emb = None

    def _blocks(self, g, canon, dst):
        """Initializers B, S, Z for a block-quantized tensor; returns (names, bits, N, K)."""
        from gguf import GGMLQuantizationType as Q

        t = self.t[canon + ".weight"]
        self.dtypes.add(t.tensor_type.name)
        if t.tensor_type in (Q.Q4_0, Q.Q4_1):
            bb = 18 if t.tensor_type == Q.Q4_0 else 20
            n, k, raw = _ggml_blocks(t, bb)
            d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
            if t.tensor_type == Q.Q4_0:
                z = np.full_like(d, 8.0)
                qs = raw[:, :, 2:18]
            else:
                m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
                with np.errstate(divide="ignore", invalid="ignore"):
                    z = np.where(d == 0, 0.0, -m / d).astype(np.float32)
                qs = raw[:, :, 4:20]
            # ggml: element j in the low nibble of byte j, element j+16 in the high nibble;
            # MatMulNBits: element 2j low, 2j+1 high.
            q = np.concatenate([qs & 15, qs >> 4], axis=-1)          # [n, k/32, 32] in element order
            packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
            names = (g.init(dst + ".weight", packed), g.init(dst + ".scales", d), g.init(dst + ".zero_points", z))
            return names, 4, n, k
        if t.tensor_type == Q.Q8_0:
            n, k, raw = _ggml_blocks(t, 34)
            d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
            q = (raw[:, :, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            z = np.full(d.shape, 128, np.uint8)
            names = (g.init(dst + ".weight", q), g.init(dst + ".scales", d), g.init(dst + ".zero_points", z))
            return names, 8, n, k
        raise ValueError(f"{canon}: tensor type {t.tensor_type.name} not supported by the toy exporter")

    def _plain(self, canon):
        t = self.t[canon + ".weight"]
        shape = [int(s) for s in reversed(t.shape)]
        return np.asarray(t.data).reshape(shape)

    def norm(self, g, x, canon, dst, node, eps):
        w = g.init(dst, self._plain(canon).astype(np.float32))
        return g.node("RMSNormalization", [x, w], node, axis=-1, epsilon=eps)

    def _nbits(self, g, x, blocks, node, out=None):
        (b, s, z), bits, n, k = blocks
        flat = g.const_shared("c.flat", [-1])
        s2 = g.node("Reshape", [s, flat], node + ".scales_flat")
        z2 = g.node("Reshape", [z, flat], node + ".zeros_flat")
        attrs = dict(K=k, N=n, bits=bits, block_size=32, domain="com.microsoft")
        if out:
            g.nodes.append(helper.make_node("MatMulNBits", [x, b, s2, z2], [out], name=node, **attrs))
            return out
        return g.node("MatMulNBits", [x, b, s2, z2], node, **attrs)

    def linear(self, g, x, canon, dst, node):
        t = self.t[canon + ".weight"]
        if t.tensor_type.name in ("F32", "F16"):
            w = g.init(dst + ".weight", self._plain(canon))
            if t.tensor_type.name == "F16":
                w = g.node("Cast", [w], node + ".cast_w", to=TensorProto.FLOAT)
            return g.node("Gemm", [x, w], node, transB=1)
        return self._nbits(g, x, self._blocks(g, canon, dst), node)

    def embed(self, g, ids):
        self.emb = self._blocks(g, "token_embd", "token_embd")
        (b, s, z), bits, n, k = self.emb
        rows = g.node("Gather", [b, ids], "embed.rows", axis=0)
        if bits == 4:
            lo = g.node("Unsqueeze", [g.node("BitwiseAnd", [rows, g.const("c.u8_15", 15, np.uint8)], "embed.lo"),
                                      g.const_shared("c.axes_m1", [-1])], "embed.lo1")
            hi = g.node("Unsqueeze", [g.node("BitShift", [rows, g.const("c.u8_4", 4, np.uint8)], "embed.hi",
                                             direction="RIGHT"), g.const_shared("c.axes_m1", [-1])], "embed.hi1")
            q = g.node("Reshape", [g.node("Concat", [lo, hi], "embed.nib", axis=-1),
                                   g.const("c.shape_q32", [-1, k // 32, 32])], "embed.q")
        else:
            q = rows
        zf = g.node("Unsqueeze", [g.node("Cast", [g.node("Gather", [z, ids], "embed.z", axis=0)], "embed.zf",
                                         to=TensorProto.FLOAT), g.const_shared("c.axes_m1", [-1])], "embed.z1")
        sf = g.node("Unsqueeze", [g.node("Gather", [s, ids], "embed.s", axis=0), g.const_shared("c.axes_m1", [-1])],
                    "embed.s1")
        v = g.node("Mul", [g.node("Sub", [g.node("Cast", [q], "embed.qf", to=TensorProto.FLOAT), zf], "embed.centered"),
                           sf], "embed.deq")
        return g.node("Reshape", [v, g.const("c.shape_H", [-1, k])], "embed")

    def output(self, g, hn):
        if "output.weight" in self.t:
            t = self.t["output.weight"]
            if t.tensor_type.name in ("F32", "F16"):
                w = g.init("output.weight", self._plain("output"))
                if t.tensor_type.name == "F16":
                    w = g.node("Cast", [w], "output.cast_w", to=TensorProto.FLOAT)
                g.nodes.append(helper.make_node("Gemm", [hn, w], ["logits"], name="output", transB=1))
                return "logits"
            return self._nbits(g, hn, self._blocks(g, "output", "output"), "output", out="logits")
        return self._nbits(g, hn, self.emb, "output", out="logits")


def hf_spec(folder):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    arch = cfg["model_type"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"architecture {arch!r} not supported")
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    D = cfg.get("head_dim") or H // nh
    tied = bool(cfg.get("tie_word_embeddings", False))
    bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
    spec = dict(arch=arch, H=H, L=cfg["num_hidden_layers"], nh=nh, kvh=cfg.get("num_key_value_heads", nh), D=D,
                V=cfg["vocab_size"], eps=float(cfg.get("rms_norm_eps", 1e-6)), interleaved=0,
                inv=inv_freq(cfg, D), source="hf safetensors")
    tcfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    template = tcfg.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        template = open(jinja).read()
    gen_path = os.path.join(folder, "generation_config.json")
    gcfg = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    eos = gcfg.get("eos_token_id", cfg.get("eos_token_id"))
    spec.update(eos=eos if isinstance(eos, list) else [eos], bos=gcfg.get("bos_token_id", cfg.get("bos_token_id")),
                add_bos=bool(tcfg.get("add_bos_token", False)), template=template,
                tokenizer_json=open(os.path.join(folder, "tokenizer.json")).read(),
                max_new_tokens=int(gcfg.get("max_new_tokens", 256)))
    return spec, HFWeights(folder, tied, bias)


def gguf_spec(path):
    """llama GGUF (q/k in llama.cpp's adjacent-pair rotary layout -> interleaved=1). No tokenizer.json is made."""
    from gguf import GGUFReader

    r = GGUFReader(path)

    def f(key, default=None):
        fld = r.fields.get(key)
        return fld.contents() if fld is not None else default

    arch = f("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"architecture {arch!r} not supported")
    H, nh = int(f(f"{arch}.embedding_length")), int(f(f"{arch}.attention.head_count"))
    D = H // nh
    V = int(f(f"{arch}.vocab_size", 0)) or len(f("tokenizer.ggml.tokens"))
    cfg = {"rope_theta": float(f(f"{arch}.rope.freq_base", 10000.0))}
    spec = dict(arch=arch, H=H, L=int(f(f"{arch}.block_count")), nh=nh,
                kvh=int(f(f"{arch}.attention.head_count_kv", nh)), D=D, V=V,
                eps=float(f(f"{arch}.attention.layer_norm_rms_epsilon")),
                interleaved=1 if arch == "llama" else 0, inv=inv_freq(cfg, D), source="gguf",
                eos=[int(f("tokenizer.ggml.eos_token_id"))], bos=f("tokenizer.ggml.bos_token_id"),
                add_bos=bool(f("tokenizer.ggml.add_bos_token", False)), template=f("tokenizer.chat_template"),
                tokenizer_json="", max_new_tokens=256)
    return spec, GGUFWeights(r)


def build(src, kv_dtype="f32", max_cache=64, max_chunk=16):
    """Builds the step graph for a Hugging Face folder or a .gguf file."""
    spec, Wt = gguf_spec(src) if src.endswith(".gguf") else hf_spec(src)
    H, L, nh, kvh, D, V, eps = (spec[k] for k in ("H", "L", "nh", "kvh", "D", "V", "eps"))
    kv_t = TensorProto.FLOAT16 if kv_dtype == "f16" else TensorProto.FLOAT
    g = G()

    # constants
    c0, c1 = g.const("c.zero", 0), g.const("c.one", 1)
    c_S = g.const("c.max_cache", max_cache)
    c_V = g.const("c.vocab", [V])
    c_one1 = g.const("c.one_1", [1])
    ax0, ax1, axm1 = g.const("c.axes0", [0]), g.const("c.axes1", [1]), g.const_shared("c.axes_m1", [-1])

    # positions and mask
    ids = g.node("Reshape", ["input_ids", g.const("c.shape_m1", [-1])], "ids")
    tn1 = g.node("Shape", ["input_ids"], "T.shape", start=1, end=2)
    tn = g.node("Squeeze", [tn1], "T")
    pos = g.node("Squeeze", ["position"], "pos")
    r_t = g.node("Range", [c0, tn, c1], "range_T")
    pos_ids = g.node("Unsqueeze", [g.node("Add", [r_t, pos], "pos_ids.add"), ax0], "pos_ids")
    r_s = g.node("Range", [c0, c_S, c1], "range_S")
    past_ok = g.node("Unsqueeze", [g.node("Less", [r_s, pos], "mask.past_lt"), ax0], "mask.past_row")
    shape_ts = g.node("Concat", [tn1, g.const("c.S_1", [max_cache])], "mask.shape", axis=0)
    past_m = g.node("Expand", [past_ok, shape_ts], "mask.past")
    causal = g.node("LessOrEqual", [g.node("Unsqueeze", [r_t, ax0], "mask.cols"),
                                    g.node("Unsqueeze", [r_t, ax1], "mask.rows")], "mask.causal")
    mask = g.node("Concat", [past_m, causal], "mask", axis=1)

    # rope caches
    ang = np.arange(max_cache, dtype=np.float64)[:, None] * spec["inv"][None, :]
    cos = g.init("rope.cos", np.cos(ang).astype(np.float32))
    sin = g.init("rope.sin", np.sin(ang).astype(np.float32))

    x = Wt.embed(g, ids)
    shape_q = g.const("c.shape_q", [1, -1, nh, D])
    shape_kv = g.const("c.shape_kv", [1, -1, kvh, D])
    shape_o = g.const("c.shape_o", [-1, nh * D])
    inputs, outputs = [], []
    for i in range(L):
        b, n = f"blk.{i}.", f"l{i}."
        h = Wt.norm(g, x, b + "attn_norm", n + "attn_norm.weight", n + "attn_norm", eps)
        q = Wt.linear(g, h, b + "attn_q", n + "attn.q_proj", n + "attn.q_proj")
        k = Wt.linear(g, h, b + "attn_k", n + "attn.k_proj", n + "attn.k_proj")
        v = Wt.linear(g, h, b + "attn_v", n + "attn.v_proj", n + "attn.v_proj")
        q4 = g.node("Transpose", [g.node("Reshape", [q, shape_q], n + "attn.q4r")], n + "attn.q4", perm=[0, 2, 1, 3])
        k4 = g.node("Transpose", [g.node("Reshape", [k, shape_kv], n + "attn.k4r")], n + "attn.k4", perm=[0, 2, 1, 3])
        v4 = g.node("Transpose", [g.node("Reshape", [v, shape_kv], n + "attn.v4r")], n + "attn.v4", perm=[0, 2, 1, 3])
        qr = g.node("RotaryEmbedding", [q4, cos, sin, pos_ids], n + "attn.q_rope", interleaved=spec["interleaved"])
        kr = g.node("RotaryEmbedding", [k4, cos, sin, pos_ids], n + "attn.k_rope", interleaved=spec["interleaved"])
        pk, pv, nk, nv = f"past.{i}.key", f"past.{i}.value", f"new.{i}.key", f"new.{i}.value"
        inputs += [helper.make_tensor_value_info(pk, kv_t, [1, kvh, max_cache, D]),
                   helper.make_tensor_value_info(pv, kv_t, [1, kvh, max_cache, D])]
        outputs += [helper.make_tensor_value_info(nk, kv_t, [1, kvh, "T", D]),
                    helper.make_tensor_value_info(nv, kv_t, [1, kvh, "T", D])]
        if kv_dtype == "f16":
            g.nodes.append(helper.make_node("Cast", [kr], [nk], name=n + "attn.new_key", to=kv_t))
            g.nodes.append(helper.make_node("Cast", [v4], [nv], name=n + "attn.new_value", to=kv_t))
            K = g.node("Concat", [g.node("Cast", [pk], n + "attn.past_k32", to=TensorProto.FLOAT),
                                  g.node("Cast", [nk], n + "attn.new_k32", to=TensorProto.FLOAT)], n + "attn.K", axis=2)
            Vv = g.node("Concat", [g.node("Cast", [pv], n + "attn.past_v32", to=TensorProto.FLOAT),
                                   g.node("Cast", [nv], n + "attn.new_v32", to=TensorProto.FLOAT)], n + "attn.V", axis=2)
        else:
            g.nodes.append(helper.make_node("Identity", [kr], [nk], name=n + "attn.new_key"))
            g.nodes.append(helper.make_node("Identity", [v4], [nv], name=n + "attn.new_value"))
            K = g.node("Concat", [pk, nk], n + "attn.K", axis=2)
            Vv = g.node("Concat", [pv, nv], n + "attn.V", axis=2)
        a = g.node("Attention", [qr, K, Vv, mask], n + "attn.sdpa")
        a2 = g.node("Reshape", [g.node("Transpose", [a], n + "attn.out_t", perm=[0, 2, 1, 3]), shape_o], n + "attn.out")
        x = g.node("Add", [x, Wt.linear(g, a2, b + "attn_output", n + "attn.o_proj", n + "attn.o_proj")],
                   n + "attn.residual")
        h2 = Wt.norm(g, x, b + "ffn_norm", n + "ffn_norm.weight", n + "ffn_norm", eps)
        gt = Wt.linear(g, h2, b + "ffn_gate", n + "mlp.gate", n + "mlp.gate")
        up = Wt.linear(g, h2, b + "ffn_up", n + "mlp.up", n + "mlp.up")
        act = g.node("Mul", [g.node("Mul", [gt, g.node("Sigmoid", [gt], n + "mlp.sigmoid")], n + "mlp.silu"), up],
                     n + "mlp.act")
        x = g.node("Add", [x, Wt.linear(g, act, b + "ffn_down", n + "mlp.down", n + "mlp.down")], n + "mlp.residual")

    last = g.node("Unsqueeze", [g.node("Gather", [x, g.node("Sub", [tn, c1], "last.idx")], "last.gather", axis=0),
                                ax0], "last")
    hn = Wt.norm(g, last, "output_norm", "output_norm.weight", "final_norm", eps)
    Wt.output(g, hn)

    # token choice
    greedy = g.node("LessOrEqual", ["temperature", g.const("c.zero_f", [0.0], np.float32)], "sample.greedy")
    kpos = g.node("And", [g.node("Greater", ["top_k", g.const("c.zero_1", [0])], "sample.k_gt0"),
                          g.node("Less", ["top_k", c_V], "sample.k_ltV")], "sample.k_valid")
    kk = g.node("Where", [kpos, "top_k", c_V], "sample.kk")
    kq = g.node("Where", [greedy, c_one1, kk], "sample.k")
    temp = g.node("Max", ["temperature", g.const("c.eps_t", [1e-6], np.float32)], "sample.temp")
    scaled = g.node("Div", ["logits", temp], "sample.scaled")
    vals, idx = g.node("TopK", [scaled, kq], "sample.topk", n_out=2, axis=-1, largest=1, sorted=1)
    pr = g.node("Softmax", [vals], "sample.softmax", axis=-1)
    cum = g.node("CumSum", [pr, g.const("c.axis_m1", -1)], "sample.cumsum")
    keep = g.node("Less", [g.node("Sub", [cum, pr], "sample.cum_excl"),
                           g.node("Max", ["top_p", g.const("c.eps_p", [1e-6], np.float32)], "sample.top_p")],
                  "sample.keep")
    pk_ = g.node("Mul", [pr, g.node("Cast", [keep], "sample.keep_f", to=TensorProto.FLOAT)], "sample.pk")
    total = g.node("ReduceSum", [pk_, axm1], "sample.total", keepdims=1)
    ck = g.node("CumSum", [pk_, g.const("c.axis_m1b", -1)], "sample.ck")
    below = g.node("Cast", [g.node("LessOrEqual", [ck, g.node("Mul", ["random_u", total], "sample.u_total")],
                                   "sample.le")], "sample.le_i", to=TensorProto.INT64)
    j = g.node("Min", [g.node("ReduceSum", [below, axm1], "sample.count", keepdims=0),
                       g.node("Sub", [kq, c1], "sample.k_m1")], "sample.j")
    ge = g.node("GatherElements", [idx, g.node("Unsqueeze", [j, ax1], "sample.j2")], "sample.pick", axis=1)
    g.nodes.append(helper.make_node("Reshape", [ge, g.const("c.shape_1", [1])], ["next_token"],
                                    name="sample.next_token"))

    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"]),
        helper.make_tensor_value_info("position", TensorProto.INT64, [1]),
    ] + inputs + [
        helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("top_k", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("top_p", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("random_u", TensorProto.FLOAT, [1]),
    ]
    graph_outputs = [
        helper.make_tensor_value_info("next_token", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V]),
    ] + outputs
    graph = helper.make_graph(g.nodes, "onestep_step", graph_inputs, graph_outputs, initializer=g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(nd.domain == "com.microsoft" for nd in g.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onestep-toy-exporter (python)")
    model.ir_version = 10

    names = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.BFLOAT16: "bf16"}
    enc = sorted(names.get(d, str(d)) if isinstance(d, int) else d for d in Wt.dtypes)
    meta = {
        "onestep.format_version": "1",
        "onestep.architecture": spec["arch"],
        "onestep.source": f"{os.path.basename(os.path.abspath(src))} ({spec['source']}, python toy exporter)",
        "onestep.num_layers": str(L),
        "onestep.hidden_size": str(H),
        "onestep.num_heads": str(nh),
        "onestep.num_kv_heads": str(kvh),
        "onestep.head_dim": str(D),
        "onestep.vocab_size": str(V),
        "onestep.max_cache": str(max_cache),
        "onestep.max_chunk": str(max_chunk),
        "onestep.kv_dtype": kv_dtype,
        "onestep.weight_encoding": "source:" + ",".join(enc),
        "onestep.add_bos": "true" if spec["add_bos"] else "false",
        "onestep.eos_id": str(spec["eos"][0]),
        "onestep.stop_ids": ",".join(str(e) for e in spec["eos"]),
        "onestep.tokenizer_json": spec["tokenizer_json"],
        "onestep.generation": json.dumps({"temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                          "max_new_tokens": spec["max_new_tokens"]}),
    }
    if spec["bos"] is not None:
        meta["onestep.bos_id"] = str(spec["bos"])
    if spec["template"] is not None:
        meta["onestep.chat_template"] = spec["template"]
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", help="Hugging Face folder or .gguf file")
    ap.add_argument("out")
    ap.add_argument("--kv-dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--max-cache", type=int, default=64)
    ap.add_argument("--max-chunk", type=int, default=16)
    a = ap.parse_args()
    m = build(a.src, a.kv_dtype, a.max_cache, a.max_chunk)
    onnx.save(m, a.out)
    print(f"wrote {a.out}: {len(m.graph.node)} nodes, {os.path.getsize(a.out)} bytes")


if __name__ == "__main__":
    main()
