#!/usr/bin/env python3
"""A Python reference exporter: builds the step graph of docs/GRAPH.md from a Hugging Face folder.

Needs only numpy + onnx (no torch), so it runs in CI. It writes the *source* weight forms of the spec
(f32 -> Gemm, f16/bf16 -> Cast + Gemm; embeddings Gather / Cast(Gather)), rotate_half rotary
(interleaved=0), an f32 or f16 KV cache, and all metadata keys of runtime/src/contract.rs. It is a
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


def build(folder, kv_dtype="f32", max_cache=64, max_chunk=16):
    cfg = json.load(open(os.path.join(folder, "config.json")))
    arch = cfg["model_type"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"architecture {arch!r} not supported")
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or H // nh
    V, eps = cfg["vocab_size"], float(cfg.get("rms_norm_eps", 1e-6))
    tied = bool(cfg.get("tie_word_embeddings", False))
    bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
    W = read_safetensors(folder)
    kv_t = TensorProto.FLOAT16 if kv_dtype == "f16" else TensorProto.FLOAT
    g = G()
    dtypes = set()

    def weight(src, dst):
        odt, arr = W[src]
        dtypes.add(odt)
        return g.init(dst, arr, odt), odt

    def linear(x, src, dst, node, has_bias=False):
        w, odt = weight(src + ".weight", dst + ".weight")
        if odt != TensorProto.FLOAT:
            w = g.node("Cast", [w], node + ".cast_w", to=TensorProto.FLOAT)
        ins = [x, w]
        if has_bias:
            bodt, barr = W[src + ".bias"]
            ins.append(g.init(dst + ".bias", to_f32(bodt, barr)))
        return g.node("Gemm", ins, node, transB=1)

    def rmsnorm(x, src, dst, node):
        odt, arr = W[src]
        return g.node("RMSNormalization", [x, g.init(dst, to_f32(odt, arr))], node, axis=-1, epsilon=eps)

    # constants
    c0, c1 = g.const("c.zero", 0), g.const("c.one", 1)
    c_S = g.const("c.max_cache", max_cache)
    c_V = g.const("c.vocab", [V])
    c_one1 = g.const("c.one_1", [1])
    ax0, ax1, axm1 = g.const("c.axes0", [0]), g.const("c.axes1", [1]), g.const("c.axes_m1", [-1])

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
    inv = inv_freq(cfg, D)
    ang = np.arange(max_cache, dtype=np.float64)[:, None] * inv[None, :]
    cos = g.init("rope.cos", np.cos(ang).astype(np.float32))
    sin = g.init("rope.sin", np.sin(ang).astype(np.float32))

    # embedding
    emb, emb_dt = weight("model.embed_tokens.weight", "token_embd.weight")
    x = g.node("Gather", [emb, ids], "embed", axis=0)
    if emb_dt != TensorProto.FLOAT:
        x = g.node("Cast", [x], "embed.cast", to=TensorProto.FLOAT)

    shape_q = g.const("c.shape_q", [1, -1, nh, D])
    shape_kv = g.const("c.shape_kv", [1, -1, kvh, D])
    shape_o = g.const("c.shape_o", [-1, nh * D])
    inputs, outputs = [], []
    for i in range(L):
        p, n = f"model.layers.{i}.", f"l{i}."
        h = rmsnorm(x, p + "input_layernorm.weight", n + "attn_norm.weight", n + "attn_norm")
        q = linear(h, p + "self_attn.q_proj", n + "attn.q_proj", n + "attn.q_proj", bias)
        k = linear(h, p + "self_attn.k_proj", n + "attn.k_proj", n + "attn.k_proj", bias)
        v = linear(h, p + "self_attn.v_proj", n + "attn.v_proj", n + "attn.v_proj", bias)
        q4 = g.node("Transpose", [g.node("Reshape", [q, shape_q], n + "attn.q4r")], n + "attn.q4", perm=[0, 2, 1, 3])
        k4 = g.node("Transpose", [g.node("Reshape", [k, shape_kv], n + "attn.k4r")], n + "attn.k4", perm=[0, 2, 1, 3])
        v4 = g.node("Transpose", [g.node("Reshape", [v, shape_kv], n + "attn.v4r")], n + "attn.v4", perm=[0, 2, 1, 3])
        qr = g.node("RotaryEmbedding", [q4, cos, sin, pos_ids], n + "attn.q_rope", interleaved=0)
        kr = g.node("RotaryEmbedding", [k4, cos, sin, pos_ids], n + "attn.k_rope", interleaved=0)
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
        x = g.node("Add", [x, linear(a2, p + "self_attn.o_proj", n + "attn.o_proj", n + "attn.o_proj")], n + "attn.residual")
        h2 = rmsnorm(x, p + "post_attention_layernorm.weight", n + "ffn_norm.weight", n + "ffn_norm")
        gt = linear(h2, p + "mlp.gate_proj", n + "mlp.gate", n + "mlp.gate")
        up = linear(h2, p + "mlp.up_proj", n + "mlp.up", n + "mlp.up")
        act = g.node("Mul", [g.node("Mul", [gt, g.node("Sigmoid", [gt], n + "mlp.sigmoid")], n + "mlp.silu"), up], n + "mlp.act")
        x = g.node("Add", [x, linear(act, p + "mlp.down_proj", n + "mlp.down", n + "mlp.down")], n + "mlp.residual")

    last = g.node("Unsqueeze", [g.node("Gather", [x, g.node("Sub", [tn, c1], "last.idx")], "last.gather", axis=0), ax0], "last")
    hn = rmsnorm(last, "model.norm.weight", "output_norm.weight", "final_norm")
    if tied:
        w = emb if emb_dt == TensorProto.FLOAT else g.node("Cast", [emb], "output.cast_w", to=TensorProto.FLOAT)
        g.nodes.append(helper.make_node("Gemm", [hn, w], ["logits"], name="output", transB=1))
    else:
        w, odt = weight("lm_head.weight", "output.weight")
        if odt != TensorProto.FLOAT:
            w = g.node("Cast", [w], "output.cast_w", to=TensorProto.FLOAT)
        g.nodes.append(helper.make_node("Gemm", [hn, w], ["logits"], name="output", transB=1))

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
                           g.node("Max", ["top_p", g.const("c.eps_p", [1e-6], np.float32)], "sample.top_p")], "sample.keep")
    pk_ = g.node("Mul", [pr, g.node("Cast", [keep], "sample.keep_f", to=TensorProto.FLOAT)], "sample.pk")
    total = g.node("ReduceSum", [pk_, axm1], "sample.total", keepdims=1)
    ck = g.node("CumSum", [pk_, g.const("c.axis_m1b", -1)], "sample.ck")
    below = g.node("Cast", [g.node("LessOrEqual", [ck, g.node("Mul", ["random_u", total], "sample.u_total")], "sample.le")],
                   "sample.le_i", to=TensorProto.INT64)
    j = g.node("Min", [g.node("ReduceSum", [below, axm1], "sample.count", keepdims=0),
                       g.node("Sub", [kq, c1], "sample.k_m1")], "sample.j")
    ge = g.node("GatherElements", [idx, g.node("Unsqueeze", [j, ax1], "sample.j2")], "sample.pick", axis=1)
    g.nodes.append(helper.make_node("Reshape", [ge, g.const("c.shape_1", [1])], ["next_token"], name="sample.next_token"))

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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onestep-toy-exporter (python)")
    model.ir_version = 10

    # metadata (runtime/src/contract.rs meta::*)
    tcfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    template = tcfg.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        template = open(jinja).read()
    gen_path = os.path.join(folder, "generation_config.json")
    gcfg = json.load(open(gen_path)) if os.path.exists(gen_path) else {}
    eos = gcfg.get("eos_token_id", cfg.get("eos_token_id"))
    eos_list = eos if isinstance(eos, list) else [eos]
    bos = gcfg.get("bos_token_id", cfg.get("bos_token_id"))
    names = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.BFLOAT16: "bf16"}
    meta = {
        "onestep.format_version": "1",
        "onestep.architecture": arch,
        "onestep.source": f"{os.path.basename(os.path.abspath(folder))} (hf safetensors, python toy exporter)",
        "onestep.num_layers": str(L),
        "onestep.hidden_size": str(H),
        "onestep.num_heads": str(nh),
        "onestep.num_kv_heads": str(kvh),
        "onestep.head_dim": str(D),
        "onestep.vocab_size": str(V),
        "onestep.max_cache": str(max_cache),
        "onestep.max_chunk": str(max_chunk),
        "onestep.kv_dtype": kv_dtype,
        "onestep.weight_encoding": "source:" + ",".join(sorted(names[d] for d in dtypes)),
        "onestep.add_bos": "true" if tcfg.get("add_bos_token", False) else "false",
        "onestep.eos_id": str(eos_list[0]),
        "onestep.stop_ids": ",".join(str(e) for e in eos_list),
        "onestep.tokenizer_json": open(os.path.join(folder, "tokenizer.json")).read(),
        "onestep.generation": json.dumps({"temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                          "max_new_tokens": int(gcfg.get("max_new_tokens", 256))}),
    }
    if bos is not None:
        meta["onestep.bos_id"] = str(bos)
    if template is not None:
        meta["onestep.chat_template"] = template
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("out")
    ap.add_argument("--kv-dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--max-cache", type=int, default=64)
    ap.add_argument("--max-chunk", type=int, default=16)
    a = ap.parse_args()
    m = build(a.folder, a.kv_dtype, a.max_cache, a.max_chunk)
    onnx.save(m, a.out)
    print(f"wrote {a.out}: {len(m.graph.node)} nodes, {os.path.getsize(a.out)} bytes")


if __name__ == "__main__":
    main()
