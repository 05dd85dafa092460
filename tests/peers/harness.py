"""Drives an exported onestep step graph (docs/GRAPH.md, format/src/contract.rs) with onnxruntime.

The harness owns the KV cache like onestep's runtime does: numpy arrays [1, kv_heads, max_cache, head_dim]
in the file's kv dtype, one key and one value per layer; after each step it writes the graph's
`new.{i}.key/value` rows ([1, kv_heads, T, head_dim]) at slots position .. position+T.

    s = StepSession("model.onnx")
    tok, logits = s.step([1, 2, 3])            # prefill a chunk at the current position (greedy)
    tok, logits = s.step([tok], temperature=0.8, top_k=40, top_p=0.95, random_u=0.3)

Module-level helpers: `teacher_force(path, ids, start, chunk)` and `greedy(path, prompt_ids, n)`; and
`onestep_score(bin, path, jobs, *flags)`, which runs onestep's own runtime (`onestep score`) on the same file.
"""
import json
import os
import subprocess
import tempfile

import numpy as np

KV_NP = {"f16": np.float16, "f32": np.float32}


class StepSession:
    """One onnxruntime session over a step graph plus the caller-owned cache."""

    def __init__(self, model_path, threads=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        # Spinning worker threads collapse when another process holds a core (2-core CI machines).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = model_path
        self.sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.meta = meta

        def num(key):
            if key not in meta:
                raise KeyError(f"{model_path}: metadata key {key!r} missing")
            return int(meta[key])

        if num("onestep.format_version") != 1:
            raise ValueError(f"{model_path}: format version {meta['onestep.format_version']} != 1")
        self.num_layers = num("onestep.num_layers")
        self.kv_heads = num("onestep.num_kv_heads")
        self.head_dim = num("onestep.head_dim")
        self.max_cache = num("onestep.max_cache")
        self.max_chunk = num("onestep.max_chunk")
        self.vocab = num("onestep.vocab_size")
        self.kv_dtype = meta.get("onestep.kv_dtype")
        if self.kv_dtype not in KV_NP:
            raise ValueError(f"{model_path}: onestep.kv_dtype {self.kv_dtype!r} is not f16/f32")
        self.stop_ids = [int(s) for s in meta.get("onestep.stop_ids", "").split(",") if s.strip()]
        names_in = {i.name for i in self.sess.get_inputs()}
        names_out = [o.name for o in self.sess.get_outputs()]
        want_in = {"input_ids", "position", "temperature", "top_k", "top_p", "random_u"}
        want_out = {"next_token", "logits"}
        for i in range(self.num_layers):
            want_in |= {f"past.{i}.key", f"past.{i}.value"}
            want_out |= {f"new.{i}.key", f"new.{i}.value"}
        if want_in != names_in:
            raise ValueError(f"{model_path}: inputs differ from the contract: missing "
                             f"{sorted(want_in - names_in)}, extra {sorted(names_in - want_in)}")
        if not want_out <= set(names_out):
            raise ValueError(f"{model_path}: outputs missing {sorted(want_out - set(names_out))}")
        self.out_names = ["next_token", "logits"] + [f"new.{i}.{w}" for i in range(self.num_layers)
                                                     for w in ("key", "value")]
        self.reset()

    def reset(self):
        shape = (1, self.kv_heads, self.max_cache, self.head_dim)
        # The cache beyond `position` is never attended (masked); fill it with garbage, not zeros, so a
        # broken mask shows.
        rng = np.random.default_rng(0)
        self.cache = {f"past.{i}.{w}": rng.standard_normal(shape).astype(KV_NP[self.kv_dtype]) * 4
                      for i in range(self.num_layers) for w in ("key", "value")}
        self.position = 0

    def step(self, ids, temperature=0.0, top_k=0, top_p=1.0, random_u=0.0):
        """Runs one chunk `ids` at the current position; returns (next_token, logits[vocab] f32)."""
        ids = [int(i) for i in ids]
        T = len(ids)
        if T == 0:
            raise ValueError("empty chunk")
        if self.position + T > self.max_cache:
            raise ValueError(f"cache full: position {self.position} + {T} > max_cache {self.max_cache}")
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "position": np.array([self.position], dtype=np.int64),
            "temperature": np.array([temperature], dtype=np.float32),
            "top_k": np.array([top_k], dtype=np.int64),
            "top_p": np.array([top_p], dtype=np.float32),
            "random_u": np.array([random_u], dtype=np.float32),
        }
        feed.update(self.cache)
        outs = dict(zip(self.out_names, self.sess.run(self.out_names, feed)))
        for i in range(self.num_layers):
            for w in ("key", "value"):
                new = outs[f"new.{i}.{w}"]
                want = (1, self.kv_heads, T, self.head_dim)
                if new.shape != want or new.dtype != KV_NP[self.kv_dtype]:
                    raise ValueError(f"new.{i}.{w}: got {new.dtype}{list(new.shape)}, want "
                                     f"{self.kv_dtype}{list(want)}")
                self.cache[f"past.{i}.{w}"][:, :, self.position:self.position + T, :] = new
        self.position += T
        nt = outs["next_token"]
        lg = outs["logits"]
        if nt.shape != (1,) or lg.shape != (1, self.vocab):
            raise ValueError(f"next_token {nt.shape} / logits {lg.shape} do not match [1] / [1, {self.vocab}]")
        return int(nt[0]), lg[0].astype(np.float32)


def _session(model):
    return model if isinstance(model, StepSession) else StepSession(model)


def teacher_force(model, ids, start, chunk=None):
    """Feeds `ids` through the graph and returns the logits rows for positions start-1 .. len(ids)-1.

    ids[:start] is prefilled in chunks of `chunk` tokens (default: the file's max_chunk), the rest one token
    per step. rows[r] is the logits row at position start-1+r, i.e. the prediction of ids[start+r]
    (the last row predicts the token after the sequence). `model` is a path or a StepSession (reset first).
    """
    s = _session(model)
    s.reset()
    if not 1 <= start <= len(ids):
        raise ValueError(f"start {start} must be in 1..{len(ids)}")
    chunk = chunk or s.max_chunk
    pos = 0
    logits = None
    while pos < start:
        n = min(chunk, start - pos)
        _, logits = s.step(ids[pos:pos + n])
        pos += n
    rows = [logits]
    for t in ids[start:]:
        _, logits = s.step([t])
        rows.append(logits)
    return rows


def greedy(model, prompt_ids, n, chunk=None, stop=False):
    """Greedy decode with the graph's own token choice (temperature 0).

    Returns (generated ids, logits rows); row r chose generated[r]. Stops early at a stop id when `stop`.
    """
    s = _session(model)
    s.reset()
    chunk = chunk or s.max_chunk
    pos = 0
    while pos < len(prompt_ids):
        tok, logits = s.step(prompt_ids[pos:pos + chunk])
        pos += chunk
    out, rows = [], []
    for _ in range(n):
        out.append(tok)
        rows.append(logits)
        if (stop and tok in s.stop_ids) or len(out) == n:
            break
        tok, logits = s.step([tok])
    return out, rows


def sample_reference(logits, temperature, top_k, top_p, random_u):
    """numpy model of the in-graph token choice of docs/GRAPH.md (for tests)."""
    V = logits.shape[-1]
    if temperature <= 0:
        return int(np.argmax(logits))
    k = top_k if 0 < top_k < V else V
    scaled = logits.astype(np.float64) / max(temperature, 1e-6)
    order = np.argsort(-scaled, kind="stable")[:k]
    vals = scaled[order]
    p = np.exp(vals - vals.max())
    p /= p.sum()
    c = np.cumsum(p)
    keep = (c - p) < max(top_p, 1e-6)
    pk = p * keep
    ck = np.cumsum(pk)
    j = min(int(np.sum(ck <= random_u * pk.sum())), k - 1)
    return int(order[j])


def onestep_score(bin_path, model, jobs, *flags, precision="exact"):
    """Runs `onestep score model --jobs <jobs as JSON> --precision <precision> *flags` and returns its parsed
    output (one result per job); fails with the end of its stderr when it exits non-zero. The precision is
    `exact` unless asked: the comparisons with onnxruntime and between the CPU and the GPU are with f32
    activations. `precision=None` passes no flag: the CLI's default (`fast`, which test_fast_precision.py
    checks against exact math)."""
    if precision is not None:
        flags = ("--precision", precision, *flags)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
        name = f.name
    try:
        out = subprocess.run([bin_path, "score", model, "--jobs", name, *flags], capture_output=True, text=True)
    finally:
        os.unlink(name)
    assert out.returncode == 0, f"onestep score {' '.join(flags)} failed: {out.stderr[-2000:]}"
    return json.loads(out.stdout)


def env_path(var):
    """Returns the path in env var `var` or None."""
    v = os.environ.get(var, "").strip()
    return v or None
