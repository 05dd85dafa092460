#!/usr/bin/env python3
"""Generates a tiny RANDOM multilingual Whisper checkpoint (Hugging Face layout) and transformers' reference
logits under tests/fixtures/tiny/whisper/.

Dev-time script (the fixtures are committed; CI never runs this). Needs torch, transformers 5.25.0, tokenizers,
safetensors, numpy (a venv: `python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch
transformers==5.25.0 tokenizers safetensors numpy`; PEERS.md on torch's size):

    /tmp/torch-venv/bin/python scripts/refs/gen_tiny_whisper.py

The model: WhisperForConditionalGeneration, 80 mel bins, d_model 64, 2 encoder + 2 decoder layers of 4 heads,
FFN 128, 1500 encoder / 448 decoder positions (a real 30 s window), f32 weights drawn at random (seeded; std
large enough that the logits spread), every bias and norm random, the output layer tied to the embedding.
Its tokenizer follows Whisper's multilingual layout on a small byte-level BPE (300 ids, trained on
tests/fixtures/tiny/corpus.txt): <|endoftext|> 300, <|startoftranscript|> 301, the languages <|en|> <|de|>
<|fr|> 302-304, <|translate|> 305, <|transcribe|> 306, <|startoflm|> 307, <|startofprev|> 308, <|nospeech|> 309,
<|notimestamps|> 310, then the 1501 timestamps <|0.00|> .. <|30.00|> (311 .. 1811): vocabulary 1812.
generation_config.json says `is_multilingual` and carries the suppress lists.

audio.wav: 30.0 s (480000 samples) of 16 kHz mono 16-bit PCM: a rising chirp, two steady tones and seeded noise,
so the whole window is signal (transformers pads short audio with zeros before its STFT, faster-whisper and the
exported graph pad the log-mel with zeros: a full window keeps both sides on the same input).

reference.json + logits.bin: for each decoder sequence (the prompt forms of transcription and translation,
timestamps, a previous-text prefix), the logits of every position from one forward of the model over
WhisperFeatureExtractor's features of audio.wav (f32), row-major [positions][1812], f32 LE, concatenated in
order; reference.json gives each sequence's ids and offset (in rows), and the feature extractor's version.
"""
import json
import os
import wave

import numpy as np
import torch
from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny", "whisper")
BASE = 300
LANGS = ["en", "de", "fr"]
SR = 16000
N = 30 * SR
SEED = 1234


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=BASE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([os.path.join(ROOT, "tests", "fixtures", "tiny", "corpus.txt")], trainer)
    assert tok.get_vocab_size() == BASE, tok.get_vocab_size()
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{l}|>" for l in LANGS]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(1501)])
    ids = {s: tok.token_to_id(s) for s in specials}
    assert ids["<|endoftext|>"] == BASE and ids["<|notimestamps|>"] == BASE + 10, ids
    assert tok.token_to_id("<|0.00|>") == BASE + 11 and tok.token_to_id("<|30.00|>") == BASE + 11 + 1500
    return tok, ids


def audio():
    t = np.arange(N) / SR
    rng = np.random.default_rng(SEED)
    chirp = 0.3 * np.sin(2 * np.pi * (200 * t + 60 * t * t))
    tones = 0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 1200 * t) * (t % 3 < 1.5)
    x = chirp + tones + 0.02 * rng.standard_normal(N)
    pcm = np.clip(np.round(x * 32767 * 0.8), -32768, 32767).astype("<i2")
    with wave.open(os.path.join(OUT, "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())
    return pcm.astype(np.float32) / 32768.0


def main():
    os.makedirs(OUT, exist_ok=True)
    tok, ids = tokenizer()
    vocab = tok.get_vocab_size()
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    ts0 = no_ts + 1
    space = tok.token_to_id("Ġ")
    # config.json carries the lists too (older folders have them only there).
    suppress = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93,
                ids["<|nospeech|>"]]
    cfg = WhisperConfig(
        vocab_size=vocab, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=sot, pad_token_id=eot,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True, activation_function="gelu",
        scale_embedding=False, suppress_tokens=suppress, begin_suppress_tokens=[space, eot],
    )
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_positions" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.7 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[1] if p.dim() > 1 else 1) * 1.2)
    model.save_pretrained(OUT)
    gen = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        is_multilingual=True, no_timestamps_token_id=no_ts,
        lang_to_id={f"<|{l}|>": ids[f"<|{l}|>"] for l in LANGS},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        suppress_tokens=suppress, begin_suppress_tokens=[space, eot], max_length=448,
    )
    gen.save_pretrained(OUT)
    tok.save(os.path.join(OUT, "tokenizer.json"))

    samples = audio()
    fe = WhisperFeatureExtractor(feature_size=80)
    feats = fe(samples, sampling_rate=SR, return_tensors="np").input_features
    assert feats.shape == (1, 80, 3000), feats.shape
    text = tok.encode(" the quick brown fox jumps over the lazy dog").ids
    seqs = {
        "transcribe_de": [sot, ids["<|de|>"], ids["<|transcribe|>"], no_ts] + text[:8],
        "translate_fr_timestamps": [sot, ids["<|fr|>"], ids["<|translate|>"], ts0] + text[2:7] + [ts0 + 40, ts0 + 40]
                                   + text[7:9],
        "previous_text_en": [ids["<|startofprev|>"]] + text[:5] + [sot, ids["<|en|>"], ids["<|transcribe|>"], no_ts]
                            + text[5:10],
    }
    rows, ref = [], {"generator": "scripts/refs/gen_tiny_whisper.py", "vocab": vocab, "seed": SEED,
                     "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                                  "numpy": np.__version__},
                     "features": "WhisperFeatureExtractor(feature_size=80) of audio.wav (i16 / 32768)",
                     "special_tokens": ids, "timestamp_begin": ts0, "sequences": []}
    with torch.no_grad():
        x = torch.from_numpy(feats)
        enc = model.model.encoder(x).last_hidden_state
        off = 0
        for name, s in seqs.items():
            out = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([s]))
            lg = out.logits[0].float().numpy()
            assert lg.shape == (len(s), vocab)
            top2 = np.sort(lg, axis=-1)[:, -2:]
            ref["sequences"].append({"name": name, "ids": s, "offset": off,
                                     "min_top2_margin": float((top2[:, 1] - top2[:, 0]).min()),
                                     "max_abs_logit": float(np.abs(lg).max())})
            rows.append(lg.astype("<f4"))
            off += len(s)
            print(f"{name}: {len(s)} positions, |logit| <= {np.abs(lg).max():.2f}, "
                  f"argmax {lg.argmax(-1).tolist()}")
    np.concatenate(rows).tofile(os.path.join(OUT, "logits.bin"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)


if __name__ == "__main__":
    main()
