#!/usr/bin/env python3
"""Builds small step graphs exactly as docs/GRAPH.md describes (random weights, every weight form) and
records onnxruntime's outputs for a fixed schedule of steps. The runtime's tests load these files and
must reproduce onnxruntime's outputs — proving that the runtime follows the graph it is given.

Run: python3 scripts/refs/make_step_graphs.py   (needs numpy, onnx, onnxruntime; writes
runtime/tests/fixtures/step_*.onnx and step_*.json)"""
import json, os, sys
import numpy as np
import onnx
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
import onnxruntime as ort

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "runtime", "tests", "fixtures")


class B:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def init(self, name, arr):
        self.inits.append(nh.from_array(arr, name))
        return name

    def c(self, arr):
        self.n += 1
        return self.init(f"const{self.n}", np.asarray(arr))

    def op(self, op, ins, name, nout=1, domain="", **attrs):
        outs = [name] if nout == 1 else [f"{name}:{i}" for i in range(nout)]
        self.nodes.append(h.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs[0] if nout == 1 else outs


def quant_block(w, bits, rng):
    """w [N,K] → MatMulNBits B, S [N,nb], Z [N,nb] (f32 for 4-bit, u8 for 8-bit)."""
    n, k = w.shape
    nb = k // 32
    wb = w.reshape(n, nb, 32)
    if bits == 4:
        lo, hi = wb.min(-1), wb.max(-1)
        s = np.maximum((hi - lo) / 15, 1e-6).astype(np.float32)
        z = np.round(-lo / s).clip(0, 15).astype(np.float32)
        q = np.clip(np.round(wb / s[..., None] + z[..., None]), 0, 15).astype(np.uint8)
        b = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        s = (np.abs(wb).max(-1) / 127).astype(np.float32)
        q = (np.round(wb / s[..., None]) + 128).clip(0, 255).astype(np.uint8)
        b = q
        z = np.full((n, nb), 128, np.uint8)
    return b, s, z


f32 = np.float32


def build(name, form, kv, tied, bias, interleaved, seed, layers=2):
    rng = np.random.default_rng(seed)
    H, L, NH, KVH, D, F, V, S = 64, layers, 4, 2, 16, 96, 80, 24
    g = B()

    def linear(x, w, nm, b=None):
        n, k = w.shape
        if form == "f32":
            args = [x, g.init(nm + ".weight", w.astype(f32))]
            if b is not None:
                args.append(g.init(nm + ".bias", b))
            return g.op("Gemm", args, nm, transB=1)
        if form == "f16":
            wc = g.op("Cast", [g.init(nm + ".weight", w.astype(np.float16))], nm + ".cast", to=TP.FLOAT)
            args = [x, wc] + ([g.init(nm + ".bias", b)] if b is not None else [])
            return g.op("Gemm", args, nm, transB=1)
        if form == "int8":
            s = (np.abs(w).max(1) / 127).astype(f32)
            q = np.round(w / s[:, None]).clip(-127, 127).astype(np.int8)
            dq = g.op("DequantizeLinear", [g.init(nm + ".weight", q), g.init(nm + ".scales", s)], nm + ".dq", axis=0)
            args = [x, dq] + ([g.init(nm + ".bias", b)] if b is not None else [])
            return g.op("Gemm", args, nm, transB=1)
        bits = 4 if form == "int4" else 8
        bq, s, z = quant_block(w, bits, rng)
        y = g.op("MatMulNBits", [x, g.init(nm + ".weight", bq),
                                 g.op("Reshape", [g.init(nm + ".scales", s), g.c(np.array([-1]))], nm + ".s1"),
                                 g.op("Reshape", [g.init(nm + ".zero_points", z), g.c(np.array([-1]))], nm + ".z1")],
                 nm, domain="com.microsoft", K=k, N=n, bits=bits, block_size=32)
        if b is not None:
            y = g.op("Add", [y, g.init(nm + ".bias", b)], nm + ".bias_add")
        return y

    ids = g.op("Reshape", ["input_ids", g.c(np.array([-1]))], "ids")
    tn = g.op("Squeeze", [g.op("Shape", ["input_ids"], "shape_t", start=1, end=2)], "tn")
    pos = g.op("Squeeze", ["position"], "pos")
    rt = g.op("Range", [g.c(np.array(0)), tn, g.c(np.array(1))], "range_t")
    pos_ids = g.op("Unsqueeze", [g.op("Add", [rt, pos], "pos_abs"), g.c(np.array([0]))], "pos_ids")
    rs = g.op("Range", [g.c(np.array(0)), g.c(np.array(S)), g.c(np.array(1))], "range_s")
    past_ok = g.op("Unsqueeze", [g.op("Less", [rs, pos], "past_ok0"), g.c(np.array([0]))], "past_ok1")
    shp = g.op("Concat", [g.op("Unsqueeze", [tn, g.c(np.array([0]))], "tn1"), g.c(np.array([S]))], "mask_shape", axis=0)
    past_m = g.op("Expand", [past_ok, shp], "past_mask")
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [rt, g.c(np.array([0]))], "rt_row"),
                                  g.op("Unsqueeze", [rt, g.c(np.array([1]))], "rt_col")], "causal")
    allowed = g.op("Concat", [past_m, causal], "mask.allowed", axis=1)
    mask = g.op("Where", [allowed, g.c(np.array(0.0, f32)), g.c(np.array(-np.inf, f32))], "mask")

    E = (rng.standard_normal((V, H)) * 0.5).astype(f32)
    if tied and form == "q8":
        bq, s, z = quant_block(E, 8, rng)
        Bn, Sn, Zn = g.init("token_embd.weight", bq), g.init("token_embd.scales", s), g.init("token_embd.zero_points", z)
        rows = g.op("Gather", [Bn, ids], "embd.rows", axis=0)
        q = g.op("Cast", [rows], "embd.qf", to=TP.FLOAT)
        zf = g.op("Unsqueeze", [g.op("Cast", [g.op("Gather", [Zn, ids], "embd.z", axis=0)], "embd.zf", to=TP.FLOAT), g.c(np.array([-1]))], "embd.zu")
        sf = g.op("Unsqueeze", [g.op("Gather", [Sn, ids], "embd.s", axis=0), g.c(np.array([-1]))], "embd.su")
        x = g.op("Reshape", [g.op("Mul", [g.op("Sub", [q, zf], "embd.sub"), sf], "embd.mul"), g.c(np.array([-1, H]))], "embd")
    else:
        x = g.op("Gather", [g.init("token_embd.weight", E), ids], "embd", axis=0)

    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    ang = np.arange(S)[:, None] * inv[None, :]
    cos, sin = g.init("rope.cos", np.cos(ang).astype(f32)), g.init("rope.sin", np.sin(ang).astype(f32))
    inputs = [h.make_tensor_value_info("input_ids", TP.INT64, [1, "T"]), h.make_tensor_value_info("position", TP.INT64, [1])]
    outputs = []
    kvt = TP.FLOAT16 if kv == "f16" else TP.FLOAT
    for i in range(L):
        p = f"l{i}"
        nw = (1 + 0.1 * rng.standard_normal(H)).astype(f32)
        hh = g.op("RMSNormalization", [x, g.init(f"{p}.attn_norm.weight", nw)], f"{p}.attn_norm", axis=-1, epsilon=1e-5)
        w = lambda n, k: (rng.standard_normal((n, k)) / np.sqrt(k)).astype(f32)
        bb = lambda n: (0.1 * rng.standard_normal(n)).astype(f32) if bias else None
        q = linear(hh, w(NH * D, H), f"{p}.attn.q_proj", bb(NH * D))
        k = linear(hh, w(KVH * D, H), f"{p}.attn.k_proj", bb(KVH * D))
        v = linear(hh, w(KVH * D, H), f"{p}.attn.v_proj", bb(KVH * D))
        heads = lambda t, n, nm: g.op("Transpose", [g.op("Reshape", [t, g.c(np.array([1, -1, n, D]))], nm + ".r")], nm, perm=[0, 2, 1, 3])
        q4, k4, v4 = heads(q, NH, f"{p}.q4"), heads(k, KVH, f"{p}.k4"), heads(v, KVH, f"{p}.v4")
        qr = g.op("RotaryEmbedding", [q4, cos, sin, pos_ids], f"{p}.q_rope", interleaved=interleaved)
        kr = g.op("RotaryEmbedding", [k4, cos, sin, pos_ids], f"{p}.k_rope", interleaved=interleaved)
        nk, nv = f"new.{i}.key", f"new.{i}.value"
        if kv == "f16":
            g.nodes.append(h.make_node("Cast", [kr], [nk], name=f"{p}.k_cast", to=TP.FLOAT16))
            g.nodes.append(h.make_node("Cast", [v4], [nv], name=f"{p}.v_cast", to=TP.FLOAT16))
            pk = g.op("Cast", [f"past.{i}.key"], f"{p}.pk32", to=TP.FLOAT)
            pv = g.op("Cast", [f"past.{i}.value"], f"{p}.pv32", to=TP.FLOAT)
            nk32 = g.op("Cast", [nk], f"{p}.nk32", to=TP.FLOAT)
            nv32 = g.op("Cast", [nv], f"{p}.nv32", to=TP.FLOAT)
        else:
            g.nodes.append(h.make_node("Identity", [kr], [nk], name=f"{p}.k_out"))
            g.nodes.append(h.make_node("Identity", [v4], [nv], name=f"{p}.v_out"))
            pk, pv, nk32, nv32 = f"past.{i}.key", f"past.{i}.value", nk, nv
        K = g.op("Concat", [pk, nk32], f"{p}.k_all", axis=2)
        Vv = g.op("Concat", [pv, nv32], f"{p}.v_all", axis=2)
        a = g.op("Attention", [qr, K, Vv, mask], f"{p}.attn")
        a2 = g.op("Reshape", [g.op("Transpose", [a], f"{p}.attn_t", perm=[0, 2, 1, 3]), g.c(np.array([-1, NH * D]))], f"{p}.attn_flat")
        x = g.op("Add", [x, linear(a2, w(H, NH * D), f"{p}.attn.o_proj")], f"{p}.res1")
        h2 = g.op("RMSNormalization", [x, g.init(f"{p}.ffn_norm.weight", nw[::-1].copy())], f"{p}.ffn_norm", axis=-1, epsilon=1e-5)
        gg = linear(h2, w(F, H), f"{p}.mlp.gate")
        uu = linear(h2, w(F, H), f"{p}.mlp.up")
        act = g.op("Mul", [g.op("Mul", [gg, g.op("Sigmoid", [gg], f"{p}.mlp.sig")], f"{p}.mlp.silu"), uu], f"{p}.mlp.act")
        x = g.op("Add", [x, linear(act, w(H, F), f"{p}.mlp.down")], f"{p}.res2")
        for nm in (f"past.{i}.key", f"past.{i}.value"):
            inputs.append(h.make_tensor_value_info(nm, kvt, [1, KVH, S, D]))
        outputs += [h.make_tensor_value_info(nk, kvt, [1, KVH, "T", D]), h.make_tensor_value_info(nv, kvt, [1, KVH, "T", D])]
    last = g.op("Unsqueeze", [g.op("Gather", [x, g.op("Sub", [tn, g.c(np.array(1))], "t_minus_1")], "last0", axis=0), g.c(np.array([0]))], "last")
    fn = g.op("RMSNormalization", [last, g.init("output_norm.weight", np.ones(H, f32))], "final_norm", axis=-1, epsilon=1e-5)
    if tied and form == "q8":
        logits_src = g.op("MatMulNBits", [fn, "token_embd.weight",
                                          g.op("Reshape", ["token_embd.scales", g.c(np.array([-1]))], "lm.s1"),
                                          g.op("Reshape", ["token_embd.zero_points", g.c(np.array([-1]))], "lm.z1")],
                          "lm_head", domain="com.microsoft", K=H, N=V, bits=8, block_size=32)
    elif tied:
        logits_src = g.op("Gemm", [fn, "token_embd.weight"], "lm_head", transB=1)
    else:
        logits_src = linear(fn, (rng.standard_normal((V, H)) / 8).astype(f32), "output")
    g.nodes.append(h.make_node("Identity", [logits_src], ["logits"], name="logits_out"))
    # token choice
    inputs += [h.make_tensor_value_info("temperature", TP.FLOAT, [1]), h.make_tensor_value_info("top_k", TP.INT64, [1]),
               h.make_tensor_value_info("top_p", TP.FLOAT, [1]), h.make_tensor_value_info("random_u", TP.FLOAT, [1])]
    greedy = g.op("LessOrEqual", ["temperature", g.c(np.array([0.0], f32))], "sample.greedy")
    kok = g.op("And", [g.op("Greater", ["top_k", g.c(np.array([0]))], "sample.kpos"), g.op("Less", ["top_k", g.c(np.array([V]))], "sample.ksmall")], "sample.kok")
    kk = g.op("Where", [kok, "top_k", g.c(np.array([V]))], "sample.kk")
    k = g.op("Where", [greedy, g.c(np.array([1])), kk], "sample.k")
    scaled = g.op("Div", ["logits", g.op("Max", ["temperature", g.c(np.array([1e-6], f32))], "sample.t")], "sample.scaled")
    vals, idx = g.op("TopK", [scaled, k], "sample.topk", nout=2, axis=-1, largest=1, sorted=1)
    pr = g.op("Softmax", [vals], "sample.p", axis=-1)
    ax = g.c(np.array(-1))
    cs = g.op("CumSum", [pr, ax], "sample.c")
    keep = g.op("Less", [g.op("Sub", [cs, pr], "sample.before"), g.op("Max", ["top_p", g.c(np.array([1e-6], f32))], "sample.pp")], "sample.keep")
    pk = g.op("Mul", [pr, g.op("Cast", [keep], "sample.keepf", to=TP.FLOAT)], "sample.pk")
    tot = g.op("ReduceSum", [pk, g.c(np.array([-1]))], "sample.total", keepdims=1)
    ck = g.op("CumSum", [pk, ax], "sample.ck")
    le = g.op("LessOrEqual", [ck, g.op("Mul", ["random_u", tot], "sample.thr")], "sample.le")
    j = g.op("ReduceSum", [g.op("Cast", [le], "sample.lei", to=TP.INT64), g.c(np.array([-1]))], "sample.j0", keepdims=0)
    j = g.op("Min", [j, g.op("Sub", [k, g.c(np.array([1]))], "sample.kmax")], "sample.j")
    tok = g.op("GatherElements", [idx, g.op("Unsqueeze", [j, g.c(np.array([1]))], "sample.j2")], "sample.tok", axis=1)
    g.nodes.append(h.make_node("Reshape", [tok, g.c(np.array([1]))], ["next_token"], name="next_token_out"))
    outputs = [h.make_tensor_value_info("next_token", TP.INT64, [1]), h.make_tensor_value_info("logits", TP.FLOAT, [1, V])] + outputs
    graph = h.make_graph(g.nodes, name, inputs, outputs, g.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)], producer_name="make_step_graphs.py")
    model.ir_version = 10
    meta = {"onestep.format_version": "1", "onestep.architecture": "llama", "onestep.num_layers": str(L),
            "onestep.hidden_size": str(H), "onestep.num_heads": str(NH), "onestep.num_kv_heads": str(KVH),
            "onestep.head_dim": str(D), "onestep.vocab_size": str(V), "onestep.max_cache": str(S),
            "onestep.max_chunk": "8", "onestep.kv_dtype": kv, "onestep.eos_id": "2", "onestep.stop_ids": "2",
            "onestep.tokenizer_json": "{}"}
    for kk_, vv in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=kk_, value=vv))
    onnx.checker.check_model(model)
    return model, dict(L=L, KVH=KVH, S=S, D=D, V=V, kv=kv)


def run_schedule(model, cfg, seed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed + 1)
    kvdt = np.float16 if cfg["kv"] == "f16" else np.float32
    cache = {f"past.{i}.{kv}": np.zeros((1, cfg["KVH"], cfg["S"], cfg["D"]), kvdt) for i in range(cfg["L"]) for kv in ("key", "value")}
    pos = 0
    steps = []
    schedule = [(5, "greedy"), (1, "greedy"), (3, "sample"), (1, "sample"), (1, "greedy"), (8, "greedy"), (1, "topp")]
    for t, mode in schedule:
        ids = rng.integers(0, cfg["V"], size=t).tolist()
        temp, topk, topp, u = 0.0, 0, 1.0, 0.0
        if mode == "sample":
            temp, topk, topp, u = 0.8, 5, 1.0, float(rng.random())
        elif mode == "topp":
            temp, topk, topp, u = 1.3, 0, 0.7, float(rng.random())
        feeds = dict(cache)
        feeds.update(input_ids=np.array([ids], np.int64), position=np.array([pos], np.int64),
                     temperature=np.array([temp], np.float32), top_k=np.array([topk], np.int64),
                     top_p=np.array([topp], np.float32), random_u=np.array([u], np.float32))
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feeds)))
        for i in range(cfg["L"]):
            for kv in ("key", "value"):
                cache[f"past.{i}.{kv}"][:, :, pos:pos + t] = res[f"new.{i}.{kv}"]
        steps.append(dict(ids=ids, temperature=temp, top_k=topk, top_p=topp, random_u=u,
                          next_token=int(res["next_token"][0]), logits=[round(float(v), 6) for v in res["logits"][0]]))
        pos += t
    return steps


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    variants = [
        ("step_f32_untied_f32kv", "f32", "f32", False, False, 0),
        ("step_f16_tied_f16kv_bias", "f16", "f16", True, True, 0),
        ("step_int8_untied_f16kv", "int8", "f16", False, False, 1),
        ("step_int4_untied_f32kv_bias", "int4", "f32", False, True, 1),
        ("step_q8_tied_f16kv", "q8", "f16", True, False, 1),
        # Six layers: enough for the runtime's KV ring (two GPU slots) to cycle within a step.
        ("step_int4_6layers_f16kv", "int4", "f16", False, False, 0, 6),
    ]
    for i, (name, form, kv, tied, bias, il, *layers) in enumerate(variants):
        model, cfg = build(name, form, kv, tied, bias, il, seed=100 + i, layers=(layers or [2])[0])
        steps = run_schedule(model, cfg, seed=200 + i)
        onnx.save(model, os.path.join(OUT, name + ".onnx"))
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(dict(model=name + ".onnx", steps=steps), f)
        print(name, "ok", [s["next_token"] for s in steps])
