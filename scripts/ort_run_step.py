#!/usr/bin/env python3
"""Run exported step graphs in onnxruntime and compare them with a NumPy reference forward pass.

Usage: ort_run_step.py DIR
DIR holds one folder per case (written by `ONESTEP_SYNTH_DIR=DIR cargo test -p onestep-export --test synthetic onnxruntime`),
each with `case.json` (config), `model.onnx` and `w/<canonical tensor name>.bin` (the f32 values each
weight stands for, dequantized from the *source* encoding, not from the exported file).

Per case it checks, against the float64 reference:
  A. prefill T=5 at position 0 over a cache full of random garbage (must be masked out);
  B. decode T=1 at position 5 after writing A's new rows into the cache;
  C. T=3 at position 6, then the in-graph token choice for several (temperature, top_k, top_p, u)
     against a NumPy version of the algorithm in docs/GRAPH.md applied to the graph's own logits;
  D. token-by-token prefill of the same 5 tokens gives the same cache rows and last logits as A.
Exit status 0 when every case passes.
"""
import json
import math
import os
import sys

import numpy as np
import onnxruntime as ort


def load_case(d):
    with open(os.path.join(d, "case.json")) as f:
        c = json.load(f)
    w = {}
    for name, shape in c["shapes"].items():
        w[name] = np.fromfile(os.path.join(d, "w", name + ".bin"), dtype=np.float32).reshape(shape).astype(np.float64)
    return c, w


def inv_freq(c):
    d = c["head_dim"]
    inv = 1.0 / (c["theta"] ** (np.arange(d // 2, dtype=np.float64) * 2 / d))
    if c["scaling"] == "linear":
        inv = inv / c["factor"]
    elif c["scaling"] == "llama3":
        factor, lo, hi, old = c["factor"], c["low_freq_factor"], c["high_freq_factor"], c["original_max"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv


def hf_llama3_inv_freq(c):
    """transformers' own llama3 inv_freq, if transformers is importable (else None)."""
    try:
        import torch  # noqa: F401
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except Exception:
        return None
    scaling = {
        "rope_type": "llama3",
        "factor": c["factor"],
        "low_freq_factor": c["low_freq_factor"],
        "high_freq_factor": c["high_freq_factor"],
        "original_max_position_embeddings": c["original_max"],
        "rope_theta": c["theta"],
    }
    kw = dict(hidden_size=c["heads"] * c["head_dim"], num_attention_heads=c["heads"], max_position_embeddings=1024)
    for attempt in ("rope_parameters", "rope_scaling"):
        try:
            cfg = LlamaConfig(**kw, **{attempt: scaling}, rope_theta=c["theta"])
            inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
            return inv.double().numpy()
        except Exception:
            continue
    return None


def rope(x, pos0, cos, sin, interleaved):
    """x [heads, T, D] float64; cos/sin [P, D/2] (f32 tables as in the graph)."""
    t = x.shape[1]
    c = cos[pos0:pos0 + t][None].astype(np.float64)
    s = sin[pos0:pos0 + t][None].astype(np.float64)
    out = np.empty_like(x)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
    else:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h] = a * c - b * s
        out[..., h:] = b * c + a * s
    return out


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


class Reference:
    def __init__(self, c, w):
        self.c, self.w = c, w
        inv = inv_freq(c)
        ang = np.arange(c["max_cache"], dtype=np.float64)[:, None] * inv[None]
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.kv_round = (lambda a: a.astype(np.float16).astype(np.float64)) if c["kv_dtype"] == "f16" else (
            lambda a: a.astype(np.float32).astype(np.float64))

    def forward(self, ids, pos, cache_k, cache_v):
        """cache_*: per layer [kvh, S, D] arrays (only slots < pos are read). Returns logits, new k, new v."""
        c, w = self.c, self.w
        nh, kvh, d, eps = c["heads"], c["kv_heads"], c["head_dim"], c["eps"]
        t = len(ids)
        x = w["token_embd.weight"][ids]
        news_k, news_v = [], []
        for i in range(c["layers"]):
            p = f"blk.{i}."
            h = rms(x, w[p + "attn_norm.weight"], eps)
            q, k, v = (h @ w[p + f"attn_{n}.weight"].T for n in "qkv")
            if c["bias"]:
                q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
            q = q.reshape(t, nh, d).transpose(1, 0, 2)
            k = k.reshape(t, kvh, d).transpose(1, 0, 2)
            v = v.reshape(t, kvh, d).transpose(1, 0, 2)
            q = rope(q, pos, self.cos, self.sin, c["interleaved"])
            k = self.kv_round(rope(k, pos, self.cos, self.sin, c["interleaved"]))
            v = self.kv_round(v)
            news_k.append(k)
            news_v.append(v)
            kk = np.concatenate([cache_k[i][:, :pos].astype(np.float64), k], axis=1)
            vv = np.concatenate([cache_v[i][:, :pos].astype(np.float64), v], axis=1)
            out = np.empty((nh, t, d))
            for hh in range(nh):
                g = hh // (nh // kvh)
                sc = q[hh] @ kk[g].T / math.sqrt(d)
                allowed = np.arange(pos + t)[None, :] <= (pos + np.arange(t))[:, None]
                sc = np.where(allowed, sc, -np.inf)
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                out[hh] = (sc / sc.sum(-1, keepdims=True)) @ vv[g]
            a = out.transpose(1, 0, 2).reshape(t, nh * d)
            x = x + a @ w[p + "attn_output.weight"].T
            h2 = rms(x, w[p + "ffn_norm.weight"], eps)
            g_, u_ = h2 @ w[p + "ffn_gate.weight"].T, h2 @ w[p + "ffn_up.weight"].T
            x = x + (g_ / (1 + np.exp(-g_)) * u_) @ w[p + "ffn_down.weight"].T
        last = rms(x[-1:], w["output_norm.weight"], eps)
        out_w = w["token_embd.weight"] if c["tied"] else w["output.weight"]
        return last @ out_w.T, news_k, news_v


def ref_sample(logits, temp, top_k, top_p, u):
    """docs/GRAPH.md token choice; returns (token, margin of u*total from the nearest cumulative edge)."""
    logits = logits.astype(np.float32).reshape(-1)
    vocab = logits.shape[0]
    kk = top_k if 0 < top_k < vocab else vocab
    k = 1 if temp <= 0 else kk
    scaled = logits / np.float32(max(temp, 1e-6))
    order = np.argsort(-scaled, kind="stable")[:k]
    vals = scaled[order].astype(np.float64)
    p = np.exp(vals - vals.max())
    p /= p.sum()
    cum = np.cumsum(p)
    keep = (cum - p) < max(top_p, 1e-6)
    pk = p * keep
    ck = np.cumsum(pk)
    thr = u * pk.sum()
    j = min(int((ck <= thr).sum()), k - 1)
    margin = np.min(np.abs(ck - thr)) if k > 1 else 1.0
    return int(order[j]), margin


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1.0))


# graph initializer base → canonical source tensor (docs/GRAPH.md "Initializer names")
_CANON = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
          "mlp.gate": "ffn_gate", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}


def canonical_name(base):
    if base in ("token_embd", "output"):
        return base + ".weight"
    layer, rest = base.split(".", 1)
    return f"blk.{layer[1:]}.{_CANON[rest]}.weight"


def packed_int4_matrices(path):
    """Dequantizes every 4-bit matrix with packed u8 zero points straight from the ONNX bytes, as the
    MatMulNBits spec defines them (independently of the exporter's own dequantizer): base → f64 [N, K]."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    inits = {i.name: i for i in m.graph.initializer}
    out = {}
    for name, z in inits.items():
        if not name.endswith(".zero_points") or z.data_type != onnx.TensorProto.UINT8:
            continue
        base = name[: -len(".zero_points")]
        b = numpy_helper.to_array(inits[base + ".weight"])
        n, nb, blob = b.shape
        # 8-bit blocks have u8 zero points too, one per block ([N, nb]); packed 4-bit ones are
        # [N, ceil(nb/2)] and their blob is 16 bytes (a block of 16 8-bit codes is too)
        if blob != 16 or (nb > 1 and numpy_helper.to_array(z).shape == (n, nb)):
            continue
        s = numpy_helper.to_array(inits[base + ".scales"]).astype(np.float64).reshape(n, nb)
        zp = numpy_helper.to_array(z).reshape(n, -1)
        assert zp.shape[1] == (nb + 1) // 2, f"{name}: {zp.shape} for {nb} blocks"
        zz = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float64)
        q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, nb, 32).astype(np.float64)
        out[base] = ((q - zz[..., None]) * s[..., None]).reshape(n, nb * 32)
    return out


def run_case(d):
    c, w = load_case(d)
    ref = Reference(c, w)
    name = c["name"]
    fails = []
    info = {}

    def check(label, ok, detail=""):
        if not ok:
            fails.append(f"{label} {detail}")

    packed = packed_int4_matrices(os.path.join(d, c["model"]))
    if packed:
        e = max(float(np.max(np.abs(v - w[canonical_name(k)]))) for k, v in packed.items())
        info["packed 4-bit zero points"] = f"{len(packed)} matrices, max |spec dequant - reference| {e:.1e}"
        check("packed zero points", e < 1e-6, f"{e}")

    if c["scaling"] == "llama3":
        hf = hf_llama3_inv_freq(c)
        if hf is None:
            info["hf_llama3"] = "skipped"
        else:
            e = float(np.max(np.abs(hf - inv_freq(c)) / hf))
            info["hf_llama3_rel"] = f"{e:.1e}"
            check("llama3 inv_freq vs transformers", e < 1e-6, f"{e}")

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(os.path.join(d, c["model"]), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    kvdt = np.float16 if c["kv_dtype"] == "f16" else np.float32
    L, kvh, S, D, V = c["layers"], c["kv_heads"], c["max_cache"], c["head_dim"], c["vocab"]
    rng = np.random.default_rng(7)

    def garbage_cache():
        return ([(rng.standard_normal((1, kvh, S, D)) * 5).astype(kvdt) for _ in range(L)],
                [(rng.standard_normal((1, kvh, S, D)) * 5).astype(kvdt) for _ in range(L)])

    def run(ids, pos, ck, cv, temp=0.0, top_k=0, top_p=1.0, u=0.5):
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "position": np.array([pos], dtype=np.int64),
            "temperature": np.array([temp], dtype=np.float32),
            "top_k": np.array([top_k], dtype=np.int64),
            "top_p": np.array([top_p], dtype=np.float32),
            "random_u": np.array([u], dtype=np.float32),
        }
        for i in range(L):
            feeds[f"past.{i}.key"] = ck[i]
            feeds[f"past.{i}.value"] = cv[i]
        return dict(zip(out_names, sess.run(None, feeds)))

    def write(ck, cv, o, pos):
        for i in range(L):
            t = o[f"new.{i}.key"].shape[2]
            assert o[f"new.{i}.key"].dtype == kvdt
            ck[i][:, :, pos:pos + t] = o[f"new.{i}.key"]
            cv[i][:, :, pos:pos + t] = o[f"new.{i}.value"]

    def compare(label, o, ids, pos, ck, cv):
        logits, nk, nv = ref.forward(ids, pos, [a[0] for a in ck], [a[0] for a in cv])
        e = rel_err(o["logits"], logits)
        ekv = max(max(rel_err(o[f"new.{i}.key"][0], nk[i]), rel_err(o[f"new.{i}.value"][0], nv[i])) for i in range(L))
        info[label] = f"logits {e:.1e} kv {ekv:.1e}"
        # f16 cache: a row element may round to the neighbouring f16 (2^-11 relative) when ORT's f32 value
        # and the float64 reference straddle a rounding edge; observed max ~2e-5 (logits), ~3e-4 (rows).
        tol, tol_kv = (1e-4, 1e-3) if c["kv_dtype"] == "f16" else (1e-5, 1e-5)
        check(label + " logits", e < tol, f"rel err {e:.2e} >= {tol}")
        check(label + " kv rows", ekv < tol_kv, f"rel err {ekv:.2e} >= {tol_kv}")
        check(label + " shapes", o["logits"].shape == (1, V) and o["next_token"].shape == (1,)
              and o["new.0.key"].shape == (1, kvh, len(ids), D), "")
        am = int(np.argmax(o["logits"][0]))
        check(label + " greedy", int(o["next_token"][0]) == am, f"{o['next_token']} vs argmax {am}")

    tokens = rng.integers(0, V, 12).tolist()
    ck, cv = garbage_cache()
    a = run(tokens[:5], 0, ck, cv)
    compare("A prefill T=5 pos 0", a, tokens[:5], 0, ck, cv)
    write(ck, cv, a, 0)
    b = run(tokens[5:6], 5, ck, cv)
    compare("B decode T=1 pos 5", b, tokens[5:6], 5, ck, cv)
    write(ck, cv, b, 5)
    cc = run(tokens[6:9], 6, ck, cv)
    compare("C chunk T=3 pos 6", cc, tokens[6:9], 6, ck, cv)
    n_samp, skipped, distinct = 0, 0, set()
    for temp, top_k, top_p in [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 10, 1.0), (1.3, 0, 0.9), (0.7, 5, 0.6),
                               (1.0, 1, 1.0), (2.0, 200, 0.95), (-1.0, 3, 0.5)]:
        for u in [0.0, 0.13, 0.5, 0.77, 0.999]:
            o = run(tokens[6:9], 6, ck, cv, temp, top_k, top_p, u)
            want, margin = ref_sample(o["logits"][0], temp, top_k, top_p, u)
            if margin < 1e-5:
                skipped += 1
                continue
            n_samp += 1
            distinct.add(want)
            check(f"C sample t={temp} k={top_k} p={top_p} u={u}", int(o["next_token"][0]) == want,
                  f"got {int(o['next_token'][0])} want {want}")
    info["sampling"] = f"{n_samp} checked ({len(distinct)} distinct tokens), {skipped} skipped (u on an edge)"
    # D: token by token == chunk
    ck2, cv2 = garbage_cache()
    for p in range(5):
        o = run(tokens[p:p + 1], p, ck2, cv2)
        write(ck2, cv2, o, p)
    e_rows = max(rel_err(ck2[i][:, :, :5], ck[i][:, :, :5]) for i in range(L))
    e_last = rel_err(o["logits"], a["logits"])
    info["D token-by-token vs chunk"] = f"kv {e_rows:.1e} logits {e_last:.1e}"
    check("D cache rows", e_rows < (1e-3 if c["kv_dtype"] == "f16" else 1e-5), f"{e_rows}")
    # an f16 cache row element may round to the neighbouring f16 between the two orders (above), and
    # the logits carry that
    check("D logits", e_last < (1e-4 if c["kv_dtype"] == "f16" else 1e-5), f"{e_last}")
    return name, fails, info


def main():
    root = sys.argv[1]
    print(f"onnxruntime {ort.__version__}")
    bad = 0
    for case in sorted(os.listdir(root)):
        d = os.path.join(root, case)
        if not os.path.exists(os.path.join(d, "case.json")):
            continue
        try:
            name, fails, info = run_case(d)
        except Exception as e:  # an ORT load/run failure is a failure of the case
            name, fails, info = case, [f"{type(e).__name__}: {e}"], {}
        status = "ok" if not fails else "FAIL"
        bad += bool(fails)
        print(f"{status:4} {name}")
        for k, v in info.items():
            print(f"       {k}: {v}")
        for f in fails[:10]:
            print(f"       ! {f}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
