"""Whisper tiny.en (the CTranslate2 model folder from scripts/fetch-whisper, exported with an f32 cache) in
onnxruntime and in onestep's runtime against faster-whisper and CTranslate2.

ONESTEP_WHISPER_ONNX: the exported file; ONESTEP_BIN: the `onestep` binary (scripts/test sets both). The fixtures
(tests/fixtures/whisper/transcripts.json, scripts/refs/gen_whisper_refs.py) hold faster-whisper's greedy
transcripts (no timestamps) of espeak-ng clips, silence and noise, and every 30 s window replayed through
CTranslate2 (prompt, tokens, per step the top-2 margin of the suppressed logits, the no-speech probability).

A token is only held to the reference where the reference was sure of it: a window's tokens are compared
exactly when every step's margin (end of text included) is >= MARGIN, else up to the first step with a smaller
margin (the test says so).

- onnxruntime runs the file unchanged (tests/peers/whisper_harness.py drives both phases): for every 16 kHz clip
  and window, from the fixture's prompt, greedy tokens equal CTranslate2's and the no-speech probability
  within NO_SPEECH_TOL.
- The runtime (`onestep transcribe --json`, each clip once, the 44.1 kHz stereo float copy of speech_01
  included): segment tokens equal faster-whisper's (the same margin rule), the text equal, no segment for
  silence and noise; prints WER against the spoken sentences, faster-whisper's WER and the real-time factor.
- With timestamps (the runtime's default, as faster-whisper's; tests/fixtures/whisper/timestamps.json from
  scripts/refs/gen_whisper_timestamps.py): every clip's segments — their tokens (timestamps included), start, end
  and text — equal faster-whisper's, windows seeking to the last timestamp as faster-whisper's do.
- The runtime's logits against transformers' (the exact-math oracle: CTranslate2's weights in
  WhisperForConditionalGeneration, tests/fixtures/whisper/transformers_logits.json from
  scripts/refs/gen_whisper_transformers_refs.py): top-1 equal wherever transformers' margin exceeds MARGIN, shared
  top logits within TF_TOL (a clip's later windows: TF_TOL_LATER, see there).
- The runtime's logits against onnxruntime's (`onestep score` with the window encoded first): the top-16 of
  every step within LOGIT_TOL, the same arg-max, on speech_01 and both windows of speech_long; for the f16 export
  and for the `--quantize q8` one (ONESTEP_WHISPER_Q8_ONNX) at exact precision.
- The q8 export at fast precision: WER against the spoken sentences within Q8_WER_CLIP of faster-whisper float32's
  per clip and Q8_WER_ALL on average, no segment from silence or noise.
"""
import json
import os

import pytest

import whisper_harness as wh

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "whisper")
PATH = os.environ.get("ONESTEP_WHISPER_ONNX", "").strip()
BIN = os.environ.get("ONESTEP_BIN", "").strip()
# The same model exported with `--quantize q8` (8-bit blocks of 32: what the CPU's integer kernels read).
Q8_PATH = os.environ.get("ONESTEP_WHISPER_Q8_ONNX", "").strip()
MARGIN = 0.1
NO_SPEECH_TOL = 1e-3
THREADS = 2

pytestmark = pytest.mark.skipif(not PATH, reason="ONESTEP_WHISPER_ONNX is not set (scripts/test exports "
                                                 "Whisper tiny.en from scripts/fetch-whisper and sets it)")


def _fixtures():
    with open(os.path.join(FIX, "transcripts.json")) as f:
        return json.load(f)


def _sure_steps(steps):
    """How many leading tokens the reference is sure of: the index of the first step whose margin < MARGIN,
    or len(steps) (every token and the end of text) when there is none."""
    for k, s in enumerate(steps):
        if s["margin"] < MARGIN:
            return k
    return len(steps)


def _compare(label, ours, win):
    """Compares our tokens of a window with the reference window `win` (tokens, steps) under the margin rule.

    Returns (failure or None, note or None, full): full is True when the whole window was compared."""
    theirs, steps = win["tokens"], win["steps"]
    k = _sure_steps(steps)
    full = k == len(steps)
    n = len(theirs) if full else k
    note = None
    if not full:
        note = (f"{label}: compared the first {k} of {len(theirs)} tokens (step {k} margin {steps[k]['margin']:.3f} "
                f"< {MARGIN})")
    # With every step sure, the end of text is sure too: the lengths must match.
    for j in range(n + (1 if full else 0)):
        a = ours[j] if j < len(ours) else "eot"
        b = theirs[j] if j < len(theirs) else "eot"
        if a != b:
            top = ", ".join(f"{i}:{v:.3f}" for i, v in steps[j]["top"][:3])
            return (f"{label}: step {j}: token {a} != reference {b} (reference margin {steps[j]['margin']:.3f}; "
                    f"its top-3 {top}); ours {ours[:j + 3]}..., reference {theirs[:j + 3]}..."), note, full
    return None, note, full


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


@pytest.fixture(scope="module")
def fixtures():
    return _fixtures()


def test_onnxruntime_matches_ctranslate2(fixtures):
    s = wh.WhisperSession(PATH, threads=THREADS)
    fails, notes = [], []
    worst_ns, worst_top, n_win, n_exact = 0.0, 0.0, 0, 0
    print()
    for clip in fixtures["clips"]:
        samples = wh.read_wav_16k(os.path.join(FIX, clip["file"]))
        windows = s.windows(samples)
        if len(windows) != len(clip["ct2_windows"]):
            fails.append(f"{clip['file']}: {len(windows)} windows, the fixture has {len(clip['ct2_windows'])}")
            continue
        for w, (audio, win) in enumerate(zip(windows, clip["ct2_windows"])):
            label = f"{clip['file']} window {w}"
            cross = s.encode(audio)
            r = s.decode(cross, win["prompt"])
            fail, note, full = _compare(label, r.tokens, win)
            n_win += 1
            n_exact += r.tokens == win["tokens"]
            if fail:
                fails.append(fail)
            if note:
                notes.append(note)
            d_ns = abs(r.no_speech_prob - win["no_speech_prob"])
            worst_ns = max(worst_ns, d_ns)
            if d_ns > NO_SPEECH_TOL:
                fails.append(f"{label}: no-speech probability {r.no_speech_prob:.5f} != reference "
                             f"{win['no_speech_prob']:.5f} (|diff| {d_ns:.2e} > {NO_SPEECH_TOL})")
            # Information only: our raw logits on the reference's top-5 (suppressed) ids, over the steps both
            # took the same path to.
            same = 0
            while same < min(len(r.tokens), len(win["tokens"])) and r.tokens[same] == win["tokens"][same]:
                same += 1
            d_top = 0.0
            for j in range(min(same + 1, len(r.logits), len(win["steps"]))):
                for i, v in win["steps"][j]["top"]:
                    d_top = max(d_top, abs(float(r.logits[j][i]) - v))
            worst_top = max(worst_top, d_top)
            same_all = "equal" if r.tokens == win["tokens"] else "DIFFERENT"
            print(f"[whisper ort] {label}: {len(r.tokens)} tokens, {same_all}{'' if full else ' (partly compared)'}; "
                  f"no-speech {r.no_speech_prob:.4f} vs {win['no_speech_prob']:.4f}; max |logit diff| on the "
                  f"reference top-5 {d_top:.2e}; decode {r.seconds:.2f} s")
    print(f"[whisper ort] {n_exact}/{n_win} windows token for token equal to CTranslate2; max |no-speech diff| "
          f"{worst_ns:.2e}; max |logit diff| on the reference top-5 {worst_top:.2e}")
    for n in notes:
        print(f"[whisper ort] note: {n}")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails)


def _expected(fixtures):
    """(wav file, spoken sentence, faster-whisper's text, its segments as {window: tokens}, the ct2 windows
    giving the margins, a note on them)."""
    out = []
    for clip in fixtures["clips"]:
        fw = {_window_of(sg["start"]): sg["tokens"] for sg in clip["faster_whisper"]["segments"]}
        out.append((clip["file"], clip["spoken"], clip["faster_whisper"]["text"], fw, clip["ct2_windows"], None))
    rc = fixtures["resampled_copy"]
    src = next(c for c in fixtures["clips"] if c["file"] == "speech_01.wav")
    out.append((rc["file"], src["spoken"], rc["faster_whisper_text"], dict(enumerate(rc["faster_whisper_tokens"])),
                src["ct2_windows"], "margins from speech_01.wav's window"))
    return out


def _window_of(start_s):
    """The 30 s window a segment starting at `start_s` belongs to."""
    return int(round(start_s / 30.0))


@pytest.mark.skipif(not BIN, reason="ONESTEP_BIN is not set (scripts/test sets it)")
def test_runtime_matches_faster_whisper(fixtures):
    fails, notes, rows = [], [], []
    total = 0.0
    for wav, spoken, fw_text, fw_segs, windows, how in _expected(fixtures):
        out, secs = wh.transcribe_json(BIN, PATH, os.path.join(FIX, wav), "--threads", str(THREADS),
                                       "--device", "cpu", "--no-timestamps")
        total += secs
        segs = out["segments"]
        st = out["stats"]
        # faster-whisper skips the same (silent) windows: pair segments by the window they start in.
        ours = {_window_of(sg["start"]): sg for sg in segs}
        whole = True
        extra = sorted(set(ours) - set(fw_segs))
        for w in extra:
            sg = ours[w]
            fails.append(f"{wav} window {w}: segment {sg['text']!r} {sg['tokens']} (no_speech_prob "
                         f"{sg['no_speech_prob']:.4f}, avg_logprob {sg['avg_logprob']:.4f}) where faster-whisper "
                         f"has none")
        if len(segs) != len(ours):
            fails.append(f"{wav}: {len(segs)} segments in {len(ours)} windows")
        for w, toks in sorted(fw_segs.items()):
            label = f"{wav} window {w}"
            if not whole:
                notes.append(f"{label}: not compared (its prompt holds an earlier window's tokens, which were "
                             f"not all compared, or differed)")
                continue
            if w not in ours:
                fails.append(f"{label}: no segment (faster-whisper: {toks})")
                whole = False
                continue
            win = dict(windows[w])
            if win["tokens"] != toks:
                fails.append(f"{label}: fixture inconsistency: ct2 window tokens != faster-whisper segment")
            fail, note, full = _compare(label, ours[w]["tokens"], win)
            whole = whole and full and fail is None
            if fail:
                fails.append(fail)
            if note:
                notes.append(note + (f" ({how})" if how else ""))
        text = out["text"]
        equal = text == fw_text
        if not equal:
            if whole:
                fails.append(f"{wav}: text {text!r} != faster-whisper {fw_text!r}")
            else:
                notes.append(f"{wav}: text {text!r} != faster-whisper {fw_text!r} (tokens only partly comparable)")
        rows.append((wav, wh.wer(spoken, text), wh.wer(spoken, fw_text), equal, st.get("real_time_factor"),
                     st.get("windows"), st.get("encode_s"), st.get("decode_s"), secs,
                     [(round(sg["no_speech_prob"], 4), round(sg["avg_logprob"], 4)) for sg in segs]))
    print("\n[whisper runtime] onestep transcribe --json --no-timestamps --threads 2 --device cpu, each clip once:")
    print(f"  {'clip':32} {'WER ours':>8} {'WER fw':>8} {'equal':>6} {'x RT':>7} {'win':>4} {'enc s':>7} {'dec s':>7} "
          f"{'wall s':>7}  (no_speech, avg_logprob) per segment")
    print("  (WER after the fixture script's normalisation; x RT: the runtime's stats.real_time_factor, audio seconds "
          "per second of transcribing, the model load not included; wall s: the whole command)")
    for wav, w_ours, w_fw, eq, rtf, nw, enc, dec, secs, per in rows:
        print(f"  {wav:32} {_fmt(w_ours):>8} {_fmt(w_fw):>8} {'yes' if eq else 'NO':>6} {_fmt(rtf, '.2f'):>7} "
              f"{nw:>4} {_fmt(enc, '.2f'):>7} {_fmt(dec, '.2f'):>7} {secs:>7.2f}  {per}")
    print(f"  total {total:.1f} s")
    for n in notes:
        print(f"[whisper runtime] note: {n}")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails)


@pytest.mark.skipif(not BIN, reason="ONESTEP_BIN is not set (scripts/test sets it)")
@pytest.mark.parametrize("clip,encoder", [("speech_long.wav", "cpu"), ("speech_01.wav", "gpu")])
def test_gpu_transcribes_as_the_cpu(clip, encoder):
    """`--device gpu` (the whole decoder step on the GPU; the encoder on the CPU, as a software adapter keeps
    it, or with `--set gpu_encoder_software=on` on the GPU too) transcribes as the CPU does with the GPU
    kernels' math (`--precision exact`): the same tokens, segments and times. The two-window clip checks
    that the second window's encoded state replaces the first's on the GPU; the encoder on lavapipe takes
    ~40 s a window, so it runs on the one-window clip."""
    if not os.environ.get("ONESTEP_REQUIRE_GPU"):
        pytest.skip("GPU runs are checked where ONESTEP_REQUIRE_GPU is set (CI: lavapipe)")
    wav = os.path.join(FIX, clip)
    gpu_flags = ["--set", "gpu_encoder_software=on"] if encoder == "gpu" else []
    runs = {}
    for device, flags in (("cpu", ["--precision", "exact"]), ("gpu", gpu_flags)):
        out, secs = wh.transcribe_json(BIN, PATH, wav, "--threads", str(THREADS), "--device", device, *flags)
        runs[device] = out
        st = out["stats"]
        print(f"\n[whisper gpu] {clip}, {device} (encoder on the {encoder if device == 'gpu' else 'cpu'}): "
              f"{st['windows']} windows, {st['tokens']} tokens, encoder {st['encode_s']:.2f} s, decoder "
              f"{st['decode_s']:.2f} s, wall {secs:.1f} s")
    seg = lambda o: [(sg["tokens"], sg["start"], sg["end"]) for sg in o["segments"]]
    assert runs["gpu"]["stats"]["windows"] == runs["cpu"]["stats"]["windows"] == (2 if clip == "speech_long.wav" else 1)
    assert seg(runs["gpu"]) == seg(runs["cpu"]), f"gpu {seg(runs['gpu'])}\ncpu {seg(runs['cpu'])}"
    assert runs["gpu"]["text"] == runs["cpu"]["text"]
    # Where each run's encoder ran, as the CLI reports it.
    assert runs["cpu"]["encoder_device"] == "cpu"
    assert (runs["gpu"]["encoder_device"] != "cpu") == (encoder == "gpu"), runs["gpu"]["encoder_device"]
    assert runs["gpu"]["device"] != "cpu"


@pytest.mark.skipif(not BIN, reason="ONESTEP_BIN is not set (scripts/test sets it)")
def test_runtime_timestamps_match_faster_whisper():
    ref = json.load(open(os.path.join(FIX, "timestamps.json")))
    fails, rows = [], []
    for clip in ref["clips"]:
        wav = clip["file"]
        out, secs = wh.transcribe_json(BIN, PATH, os.path.join(FIX, wav), "--threads", str(THREADS),
                                       "--device", "cpu")
        ours, want = out["segments"], clip["segments"]
        rows.append((wav, len(ours), len(want), out["stats"]["windows"], len(clip["windows"]), secs))
        if len(ours) != len(want):
            fails.append(f"{wav}: {len(ours)} segments, faster-whisper {len(want)}: "
                         f"{[(s['start'], s['end'], s['text']) for s in ours]}")
        for i, (a, b) in enumerate(zip(ours, want)):
            where = f"{wav} segment {i} [{b['start']} → {b['end']}]"
            if a["tokens"] != b["tokens"]:
                fails.append(f"{where}: tokens {a['tokens']} != faster-whisper {b['tokens']}")
            if abs(a["start"] - b["start"]) > 5e-3 or abs(a["end"] - b["end"]) > 5e-3:
                fails.append(f"{where}: ours [{a['start']} → {a['end']}]")
            if a["text"] != b["text"]:
                fails.append(f"{where}: text {a['text']!r} != {b['text']!r}")
        if out["text"] != clip["text"]:
            fails.append(f"{wav}: text {out['text']!r} != faster-whisper {clip['text']!r}")
    print("\n[whisper timestamps] onestep transcribe --json --threads 2 --device cpu against faster-whisper:")
    print(f"  {'clip':20} {'segments':>8} {'fw':>4} {'windows':>7} {'fw':>4} {'wall s':>7}")
    for wav, n, m, w, fw_w, secs in rows:
        print(f"  {wav:20} {n:>8} {m:>4} {w:>7} {fw_w:>4} {secs:>7.2f}")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails)


LOGIT_TOL = 1e-3
# Against transformers, whose features are faster-whisper's: the graph's own front end computes the same ones
# for a clip's first window (measured ~1e-4). faster-whisper clamps the log-mel at 8 below the WHOLE clip's
# maximum, the graph at 8 below its window's: a later window quieter than the clip's loudest gets a higher
# floor (speech_long's second window: 1.9e-2 measured), hence a looser bound there.
TF_TOL = 5e-4
TF_TOL_LATER = 5e-2


@pytest.mark.skipif(not BIN, reason="ONESTEP_BIN is not set (scripts/test sets it)")
def test_runtime_logits_match_transformers(tmp_path):
    """The exact-math oracle (tests/fixtures/whisper/transformers_logits.json, scripts/refs/
    gen_whisper_transformers_refs.py: transformers with the CTranslate2 model's weights, teacher-forced on every
    window's CTranslate2 tokens): through `onestep score`, the top-1 equals transformers' wherever its margin is
    over MARGIN, and every logit both top lists share is within TF_TOL (TF_TOL_LATER in a clip's later windows)."""
    import subprocess

    ref = json.load(open(os.path.join(FIX, "transformers_logits.json")))
    jobs = [{"ids": w["ids"], "start": w["start"], "audio": os.path.join(FIX, w["file"]), "window": w["window"]}
            for w in ref["windows"]]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    out = subprocess.run([BIN, "score", PATH, "--jobs", str(path), "--top", "16", "--device", "cpu",
                          "--threads", str(THREADS)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    fails, worst, compared, top1, sure, per = [], 0.0, 0, 0, 0, []
    for w, res in zip(ref["windows"], results):
        label = f"{w['file']} window {w['window']}"
        worst_before = worst
        worst = 0.0
        rows = res["rows"]
        assert len(rows) >= len(w["steps"]), (label, len(rows), len(w["steps"]))
        for r, st in enumerate(w["steps"]):
            theirs = dict((i, v) for i, v in st["top"])
            ours = rows[r]
            if st["margin"] > MARGIN:
                sure += 1
                if ours[0][0] == st["top"][0][0]:
                    top1 += 1
                else:
                    fails.append(f"{label} step {r}: top-1 {ours[0][0]} != transformers' {st['top'][0][0]} "
                                 f"(margin {st['margin']:.3f})")
            for tok, val in ours:
                if tok in theirs:
                    diff = abs(val - theirs[tok])
                    worst = max(worst, diff)
                    compared += 1
                    if diff > (TF_TOL if w["window"] == 0 else TF_TOL_LATER):
                        fails.append(f"{label} step {r} token {tok}: {val} vs transformers {theirs[tok]}")
        per.append(f"{label} {worst:.1e}")
        worst = max(worst, worst_before)
    print(f"\n[whisper logits] runtime vs transformers (CTranslate2's weights): top-1 equal at {top1}/{sure} steps "
          f"with margin > {MARGIN}; {compared} shared top logits, max |diff| {worst:.2e} (tolerance {TF_TOL}, later "
          f"windows {TF_TOL_LATER}); "
          f"per window: {', '.join(per)}")
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails[:20])


@pytest.mark.skipif(not BIN, reason="ONESTEP_BIN is not set (scripts/test sets it)")
@pytest.mark.parametrize("form", ["f16", "q8"])
def test_runtime_logits_match_onnxruntime(fixtures, tmp_path, form):
    """Teacher-forced through `onestep score` (the window encoded first): every step's top logits of the
    runtime within LOGIT_TOL of onnxruntime's on the same file, and the same arg-max. `q8`: the `--quantize q8`
    export (MatMulNBits 8-bit blocks), the runtime at exact precision (onnxruntime's math)."""
    import subprocess

    path = {"f16": PATH, "q8": Q8_PATH}[form]
    if not path:
        pytest.skip("ONESTEP_WHISPER_Q8_ONNX is not set (scripts/test exports it)")
    sess = wh.WhisperSession(path, threads=THREADS)
    worst = 0.0
    for name in ("speech_01.wav", "speech_long.wav"):
        clip = next(c for c in fixtures["clips"] if c["file"] == name)
        samples = wh.read_wav_16k(os.path.join(FIX, name))
        for w, win in enumerate(clip["ct2_windows"]):
            cross = sess.encode(sess.windows(samples)[w])
            d = sess.decode(cross, win["prompt"])
            ids = list(win["prompt"]) + d.tokens
            job = {"ids": ids, "start": len(win["prompt"]), "audio": os.path.join(FIX, name), "window": w}
            jobs = tmp_path / f"job_{name}_{w}.json"
            jobs.write_text(json.dumps([job]))
            out = subprocess.run([BIN, "score", path, "--jobs", str(jobs), "--top", "16", "--device", "cpu",
                                  "--threads", str(THREADS), "--precision", "exact"], capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)[0]["rows"]
            # Row r predicts ids[start + r]; onnxruntime's decode step r chose tokens[r] from logits[r].
            assert len(rows) >= len(d.logits), (len(rows), len(d.logits))
            for r, ort_row in enumerate(d.logits):
                top = rows[r]
                assert top[0][0] == int(ort_row.argmax()), f"{name} window {w} step {r}: arg-max differs"
                for tok, val in top:
                    diff = abs(val - float(ort_row[tok]))
                    worst = max(worst, diff)
                    assert diff < LOGIT_TOL, f"{name} window {w} step {r} token {tok}: {val} vs {ort_row[tok]}"
    print(f"\n[whisper logits] {form}: runtime vs onnxruntime, top-16 of every step: max |diff| {worst:.2e} "
          f"(tolerance {LOGIT_TOL})")


# The q8 export at fast precision (8-bit activations, integer dot products): its weights are not the f16 ones,
# so its transcripts are held to the spoken sentences, beside faster-whisper's float32 transcripts of the same
# clips, rather than token for token. Per speech clip the WER may exceed faster-whisper's by at most Q8_WER_CLIP
# (about three words of a clip's ~14: a rounding of the weights may flip a near tie, and the words after it
# follow), and over all clips by at most Q8_WER_ALL on average; silence and noise give no segment.
Q8_WER_CLIP = 0.25
Q8_WER_ALL = 0.05


@pytest.mark.skipif(not (BIN and Q8_PATH), reason="ONESTEP_BIN or ONESTEP_WHISPER_Q8_ONNX is not set (scripts/test "
                                                   "sets them)")
def test_q8_fast_transcribes_the_speech(fixtures):
    fails, rows = [], []
    for clip in fixtures["clips"]:
        wav, spoken, fw_text = clip["file"], clip["spoken"], clip["faster_whisper"]["text"]
        out, secs = wh.transcribe_json(BIN, Q8_PATH, os.path.join(FIX, wav), "--threads", str(THREADS),
                                       "--device", "cpu", "--no-timestamps", "--precision", "fast")
        text = out["text"]
        if not spoken:
            if out["segments"]:
                fails.append(f"{wav}: segments {[sg['text'] for sg in out['segments']]} from no speech")
            continue
        ours, fw = wh.wer(spoken, text), wh.wer(spoken, fw_text)
        rows.append((wav, ours, fw, text == fw_text, out["stats"]["real_time_factor"]))
        if ours > fw + Q8_WER_CLIP:
            fails.append(f"{wav}: WER {ours:.3f} (faster-whisper float32 {fw:.3f}): {text!r}")
    print("\n[whisper q8] onestep transcribe --precision fast --no-timestamps on the --quantize q8 export:")
    print(f"  {'clip':20} {'WER q8':>7} {'WER fw':>7} {'same text':>9} {'x RT':>6}")
    for wav, ours, fw, eq, rtf in rows:
        print(f"  {wav:20} {ours:>7.3f} {fw:>7.3f} {'yes' if eq else 'no':>9} {rtf:>6.1f}")
    mean_ours = sum(r[1] for r in rows) / len(rows)
    mean_fw = sum(r[2] for r in rows) / len(rows)
    print(f"  mean WER q8 {mean_ours:.3f}, faster-whisper float32 {mean_fw:.3f}")
    if mean_ours > mean_fw + Q8_WER_ALL:
        fails.append(f"mean WER {mean_ours:.3f} > faster-whisper's {mean_fw:.3f} + {Q8_WER_ALL}")
    assert len(rows) >= 6, f"only {len(rows)} speech clips in the fixtures"
    assert not fails, f"{len(fails)} failures:\n" + "\n".join(fails)
