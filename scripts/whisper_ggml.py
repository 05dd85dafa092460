#!/usr/bin/env python3
"""Converts the CTranslate2 Whisper folder (scripts/fetch-whisper) to whisper.cpp's ggml model file, the same
weights, so whisper.cpp can stand beside onestep and faster-whisper in scripts/bench-whisper.

    whisper_ggml.py CT2_DIR -o cache/bench-whisper/ggml-tiny.en.bin
    whisper_ggml.py CT2_DIR -o FILE --check [--threads 2]   # then transcribe the committed clips with it

Needs numpy (and pywhispercpp for --check). The layout is the classic one whisper.cpp's
models/convert-pt-to-ggml.py / convert-h5-to-ggml.py write and src/whisper.cpp's whisper_model_load reads
(all little-endian int32 unless noted):

  magic 0x67676d6c ("ggml")
  hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx, n_text_state,
           n_text_head, n_text_layer, n_mels, ftype (1: the big matrices are float16)
  mel filters: n_mel, n_fft, then n_mel * n_fft float32 (row-major [mel][fft bin])
  vocabulary: count, then per token id 0..count-1: length, the token's bytes (GPT-2 byte-level token text
           mapped back to bytes). Only the BPE vocabulary (ids 0..50256, <|endoftext|> included, as
           convert-h5-to-ggml.py writes vocab.json): whisper.cpp names the special tokens up to n_vocab itself
  tensors until the end of the file: n_dims, name length, ftype (0 f32, 1 f16), the dims innermost first
           (numpy's shape reversed), the name, the data (row-major)

Tensors (whisper.cpp's names; CTranslate2's in brackets). float16 as stored in model.bin: the 2-D matrices
(token embedding, attention/MLP weights) and the conv weights [out, in, 3] (ggml ne = 3, in, out); float32
(widened from the file's float16, exactly): biases, layer norms, the positional embeddings and the conv biases
reshaped to [n, 1]. CTranslate2 fuses self-attention q/k/v (linear_0, rows q|k|v) and cross-attention k/v
(linear_1, rows k|v): split by rows; whisper.cpp has no key bias (CTranslate2 stores zeros there: checked).
The output projection is the token embedding (tied), so it has no tensor of its own.

The mel filter bank is tests/fixtures/whisper/mel_filters.bin (faster-whisper's 80 x 201 slaney filters, what
the CTranslate2 model was run with; whisper's mel_filters.npz holds the same bank up to float rounding).
"""
import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts/refs"))
from ct2_model import read_ct2  # noqa: E402

MEL_FILTERS = ROOT / "tests/fixtures/whisper/mel_filters.bin"
FIX = ROOT / "tests/fixtures/whisper"


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocabulary(tokenizer_json):
    """The BPE tokens as bytes, in id order (ids 0..max, no gaps)."""
    vocab = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]["vocab"]
    dec = {c: b for b, c in bytes_to_unicode().items()}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id))), "token ids with gaps"
    return [bytes(dec[c] for c in tok) for tok, _ in by_id]


def layer_count(v, side):
    return sum(1 for n in v if n.startswith(f"{side}/layer_") and n.endswith("/ffn/linear_0/weight"))


def tensors(v):
    """(whisper.cpp name, array) in load order; float16 arrays stay float16, the rest is float32."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    out = []

    def norm(src, dst):
        out.append((f"{dst}.weight", f32(v[f"{src}/gamma"])))
        out.append((f"{dst}.bias", f32(v[f"{src}/beta"])))

    def linear(src, dst, bias=True):
        out.append((f"{dst}.weight", v[f"{src}/weight"]))
        if bias:
            out.append((f"{dst}.bias", f32(v[f"{src}/bias"])))

    def split(src, dsts):
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        d = w.shape[0] // len(dsts)
        for j, dst in enumerate(dsts):
            out.append((f"{dst}.weight", w[j * d:(j + 1) * d]))
            if dst.endswith(".key"):
                assert not b[j * d:(j + 1) * d].any(), f"{src}: a non-zero key bias"
            else:
                out.append((f"{dst}.bias", f32(b[j * d:(j + 1) * d])))

    out.append(("encoder.positional_embedding", f32(v["encoder/position_encodings/encodings"])))
    for k in (1, 2):
        out.append((f"encoder.conv{k}.weight", v[f"encoder/conv{k}/weight"]))  # [out, in, 3]
        out.append((f"encoder.conv{k}.bias", f32(v[f"encoder/conv{k}/bias"]).reshape(-1, 1)))
    for i in range(layer_count(v, "encoder")):
        s, d = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{d}.attn_ln")
        split(f"{s}/self_attention/linear_0", [f"{d}.attn.query", f"{d}.attn.key", f"{d}.attn.value"])
        linear(f"{s}/self_attention/linear_1", f"{d}.attn.out")
        norm(f"{s}/ffn/layer_norm", f"{d}.mlp_ln")
        linear(f"{s}/ffn/linear_0", f"{d}.mlp.0")
        linear(f"{s}/ffn/linear_1", f"{d}.mlp.2")
    norm("encoder/layer_norm", "encoder.ln_post")

    out.append(("decoder.positional_embedding", f32(v["decoder/position_encodings/encodings"])))
    out.append(("decoder.token_embedding.weight", v["decoder/embeddings/weight"]))
    for i in range(layer_count(v, "decoder")):
        s, d = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{d}.attn_ln")
        split(f"{s}/self_attention/linear_0", [f"{d}.attn.query", f"{d}.attn.key", f"{d}.attn.value"])
        linear(f"{s}/self_attention/linear_1", f"{d}.attn.out")
        norm(f"{s}/attention/layer_norm", f"{d}.cross_attn_ln")
        linear(f"{s}/attention/linear_0", f"{d}.cross_attn.query")
        split(f"{s}/attention/linear_1", [f"{d}.cross_attn.key", f"{d}.cross_attn.value"])
        linear(f"{s}/attention/linear_2", f"{d}.cross_attn.out")
        norm(f"{s}/ffn/layer_norm", f"{d}.mlp_ln")
        linear(f"{s}/ffn/linear_0", f"{d}.mlp.0")
        linear(f"{s}/ffn/linear_1", f"{d}.mlp.2")
    norm("decoder/layer_norm", "decoder.ln")
    return out


def convert(ct2_dir, out_path):
    """Writes the ggml file; returns (tensor count, bytes)."""
    spec, v = read_ct2(Path(ct2_dir) / "model.bin")
    assert spec == "WhisperSpec", spec
    emb = v["decoder/embeddings/weight"]
    assert emb.dtype == np.float16, f"expected float16 weights, got {emb.dtype}"
    n_vocab, n_state = emb.shape
    n_mels = v["encoder/conv1/weight"].shape[1]
    hparams = [n_vocab, v["encoder/position_encodings/encodings"].shape[0], n_state, int(v["encoder/num_heads"]),
               layer_count(v, "encoder"), v["decoder/position_encodings/encodings"].shape[0], n_state,
               int(v["decoder/num_heads"]), layer_count(v, "decoder"), n_mels, 1]
    filters = np.fromfile(MEL_FILTERS, dtype="<f4")
    n_fft = 201
    assert filters.size == n_mels * n_fft, f"{MEL_FILTERS}: {filters.size} floats, want {n_mels} x {n_fft}"
    tokens = vocabulary(Path(ct2_dir) / "tokenizer.json")
    assert len(tokens) <= n_vocab

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    ts = tensors(v)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", 0x67676D6C))
        f.write(struct.pack("<11i", *hparams))
        f.write(struct.pack("<ii", n_mels, n_fft))
        f.write(filters.astype("<f4").tobytes())
        f.write(struct.pack("<i", len(tokens)))
        for t in tokens:
            f.write(struct.pack("<i", len(t)))
            f.write(t)
        for name, a in ts:
            a = np.ascontiguousarray(a, dtype="<f2" if a.dtype == np.float16 else "<f4")
            nb = name.encode()
            f.write(struct.pack("<iii", a.ndim, len(nb), 1 if a.dtype == np.float16 else 0))
            f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
            f.write(nb)
            f.write(a.tobytes())
    os.replace(tmp, out_path)
    return len(ts), out_path.stat().st_size


def words(s):
    return [w.strip(".,?!;:'\"").lower() for w in s.split() if w.strip(".,?!;:'\"")]


def wer(ref, hyp):
    """Word error rate of `hyp` against `ref` (case and punctuation ignored)."""
    r, h = words(ref), words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)] / max(len(r), 1)


def check(model_path, threads):
    """Transcribes tests/fixtures/whisper/speech_0[1-6].wav with whisper.cpp (greedy, en, no timestamps);
    prints each text beside the spoken sentence and faster-whisper's text, with WERs (case and punctuation
    ignored). Exit 1 if one is off by over 20%. A few words may differ from faster-whisper's on these short
    clips: whisper.cpp pads the audio to 30 s with zeros before the mel (as openai-whisper and transformers do),
    faster-whisper pads the log-mel with 0.0 (transcripts.json's ct2_first_window_hf_features, transformers'
    features, has whisper.cpp's "master" for speech_02 too); on full 30 s windows (scripts/bench-whisper's
    audio) whisper.cpp's text equals faster-whisper float32's."""
    from pywhispercpp.model import Model
    refs = {c["file"]: c for c in json.loads((FIX / "transcripts.json").read_text())["clips"]}
    m = Model(str(model_path), redirect_whispercpp_logs_to=None, n_threads=threads, print_progress=False,
              print_realtime=False, language="en", greedy={"best_of": 1}, temperature=0.0, temperature_inc=0.0,
              no_timestamps=True, no_context=False, suppress_nst=True)
    bad = 0
    for k in range(1, 7):
        name = f"speech_{k:02d}.wav"
        text = " ".join(s.text for s in m.transcribe(str(FIX / name))).strip()  # pywhispercpp strips segments
        spoken, fw = refs[name]["spoken"], refs[name]["faster_whisper"]["text"]
        w_sp, w_fw = wer(spoken, text), wer(fw, text)
        bad += w_sp > 0.2
        print(f"{name}: whisper.cpp {text!r}\n    spoken {spoken!r} WER {w_sp:.3f}\n"
              f"    faster-whisper {fw!r} WER {w_fw:.3f}")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description="CTranslate2 Whisper folder -> whisper.cpp ggml model file")
    ap.add_argument("ct2", help="the CTranslate2 model folder (model.bin, tokenizer.json)")
    ap.add_argument("-o", "--output", required=True, help="the ggml file to write")
    ap.add_argument("--check", action="store_true",
                    help="then transcribe tests/fixtures/whisper/speech_0[1-6].wav with it (needs pywhispercpp)")
    ap.add_argument("--threads", type=int, default=2, help="whisper.cpp threads for --check")
    args = ap.parse_args()
    t0 = time.perf_counter()
    n, size = convert(args.ct2, args.output)
    print(f"whisper_ggml: {args.output}: {n} tensors, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    if args.check:
        sys.exit(check(args.output, args.threads))


if __name__ == "__main__":
    main()
