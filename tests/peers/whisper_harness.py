"""Drives an exported Whisper file (one ONNX graph, two phases) with onnxruntime, the way onestep's runtime does.

The graph (the exporter's Whisper contract): inputs `encode` bool[1] (true: the encoder phase), `audio`
f32[1, window] (16 kHz, zero-padded), `audio_samples` int64[1] (the valid samples), `input_ids` int64[1, T],
`position` int64[1], `past.{i}.key/value` [1, heads, max_cache, head_dim] (the decoder's self-attention cache,
owned by the caller), `cross.{i}.key/value` [1, heads, audio_frames, head_dim] (the encoded window), the sampling
inputs `temperature`, `top_k`, `top_p`, `random_u`, and `first_token` bool[1] (true on the step that picks the
transcript's first token: the begin-suppress set, ' ' and end of text, is excluded there).
Outputs: `encoded.{i}.key/value` (encoder phase), `next_token`, `logits` (raw, last position) and
`new.{i}.key/value` (the chunk's cache rows, written by the caller at slots position .. position+T).

    s = WhisperSession("whisper-tiny-en.onnx")
    cross = s.encode(read_wav_16k("speech.wav")[:s.window])
    r = s.decode(cross, [s.tokens["sot"], s.tokens["no_timestamps"]])
    r.tokens, r.logits, r.no_speech_prob, r.avg_logprob

`transcribe_json(bin, model, wav)` runs onestep's own runtime (`onestep transcribe --json`) on a file, and
`norm_words` / `wer` are the fixture script's (scripts/refs/gen_whisper_refs.py) word error rate.
"""
import json
import re
import subprocess
import time
import wave

import numpy as np

KV_NP = {"f16": np.float16, "f32": np.float32}


class Decoded:
    """One window's greedy decode.

    tokens: the generated ids (end of text not included); logits[k]: the raw logits row of the step that chose
    tokens[k] (the last row chose end of text, or the token past the length limit); sot_logits: the raw logits
    after the start token; no_speech_prob: softmax(sot_logits)[no_speech]; avg_logprob: the mean log-softmax of
    the chosen tokens and the end of text over the raw logits (as the runtime computes it).
    """

    def __init__(self, tokens, logits, sot_logits, no_speech_prob, avg_logprob, seconds):
        self.tokens = tokens
        self.logits = logits
        self.sot_logits = sot_logits
        self.no_speech_prob = no_speech_prob
        self.avg_logprob = avg_logprob
        self.seconds = seconds


def log_softmax(row):
    row = np.asarray(row, np.float64)
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


class WhisperSession:
    """One onnxruntime session over an exported Whisper file; decode() owns its self-attention cache."""

    def __init__(self, path, threads=2):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.meta = meta
        if meta.get("onestep.architecture") != "whisper":
            raise ValueError(f"{path}: onestep.architecture is {meta.get('onestep.architecture')!r}, not whisper")
        self.num_layers = int(meta["onestep.num_layers"])
        self.max_cache = int(meta["onestep.max_cache"])
        self.max_chunk = int(meta["onestep.max_chunk"])
        self.vocab = int(meta["onestep.vocab_size"])
        kv = meta.get("onestep.kv_dtype")
        if kv not in KV_NP:
            raise ValueError(f"{path}: onestep.kv_dtype {kv!r} is not f16/f32")
        self.kv_np = KV_NP[kv]
        speech = json.loads(meta["onestep.speech"])
        self.speech = speech
        self.tokens = speech["tokens"]
        self.sample_rate = int(speech["sample_rate"])
        self.window = int(speech["window_samples"])
        self.frames = int(speech["audio_frames"])

        ins = {i.name: i for i in self.sess.get_inputs()}
        want_in = {"encode", "audio", "audio_samples", "input_ids", "position", "temperature", "top_k", "top_p",
                   "random_u", "first_token"}
        want_out = {"next_token", "logits"}
        for i in range(self.num_layers):
            for w in ("key", "value"):
                want_in |= {f"past.{i}.{w}", f"cross.{i}.{w}"}
                want_out |= {f"encoded.{i}.{w}", f"new.{i}.{w}"}
        if set(ins) != want_in:
            raise ValueError(f"{path}: inputs differ from the contract: missing {sorted(want_in - set(ins))}, "
                             f"extra {sorted(set(ins) - want_in)}")
        outs = [o.name for o in self.sess.get_outputs()]
        if not want_out <= set(outs):
            raise ValueError(f"{path}: outputs missing {sorted(want_out - set(outs))}")
        _, self.heads, cache, self.head_dim = ins["past.0.key"].shape
        if cache != self.max_cache:
            raise ValueError(f"{path}: past.0.key has {cache} slots, metadata says {self.max_cache}")
        self._kv_names = [f"{i}.{w}" for i in range(self.num_layers) for w in ("key", "value")]
        self._no_audio = np.zeros((1, self.window), np.float32)
        self._no_cross = {f"cross.{n}": np.zeros((1, self.heads, self.frames, self.head_dim), self.kv_np)
                          for n in self._kv_names}

    def _feeds(self, encode, audio, n, ids, position, cross, past, first):
        f = {
            "encode": np.array([encode]),
            "audio": audio,
            "audio_samples": np.array([n], np.int64),
            "input_ids": np.array([ids], np.int64),
            "position": np.array([position], np.int64),
            "temperature": np.array([0.0], np.float32),
            "top_k": np.array([0], np.int64),
            "top_p": np.array([1.0], np.float32),
            "random_u": np.array([0.0], np.float32),
            "first_token": np.array([first]),
        }
        f.update(cross)
        f.update(past)
        return f

    def _empty_past(self):
        shape = (1, self.heads, self.max_cache, self.head_dim)
        return {f"past.{n}": np.zeros(shape, self.kv_np) for n in self._kv_names}

    def encode(self, samples):
        """Encodes one window (mono float32 at the model's rate, at most `window` samples); returns the
        cross-attention inputs {`cross.{i}.key/value`: array}."""
        samples = np.asarray(samples, np.float32)
        n = len(samples)
        if n > self.window:
            raise ValueError(f"{n} samples > window {self.window}")
        audio = np.zeros((1, self.window), np.float32)
        audio[0, :n] = samples
        names = [f"encoded.{k}" for k in self._kv_names]
        res = self.sess.run(names, self._feeds(True, audio, n, [0], 0, self._no_cross, self._empty_past(), False))
        cross = {}
        for k, r in zip(self._kv_names, res):
            want = (1, self.heads, self.frames, self.head_dim)
            if r.shape != want or r.dtype != self.kv_np:
                raise ValueError(f"encoded.{k}: got {r.dtype}{list(r.shape)}, want {self.kv_np.__name__}{list(want)}")
            cross[f"cross.{k}"] = r
        return cross

    def _step(self, cross, past, ids, position, first):
        names = ["next_token", "logits"] + [f"new.{k}" for k in self._kv_names]
        res = dict(zip(names, self.sess.run(names, self._feeds(False, self._no_audio, 0, ids, position, cross, past,
                                                                   first))))
        T = len(ids)
        for k in self._kv_names:
            new = res[f"new.{k}"]
            if new.shape != (1, self.heads, T, self.head_dim):
                raise ValueError(f"new.{k}: shape {list(new.shape)}, want [1, {self.heads}, {T}, {self.head_dim}]")
            past[f"past.{k}"][:, :, position:position + T] = new
        lg = res["logits"]
        if lg.shape != (1, self.vocab):
            raise ValueError(f"logits {list(lg.shape)}, want [1, {self.vocab}]")
        return int(res["next_token"][0]), lg[0].astype(np.float32)

    def decode(self, cross, prompt, max_tokens=None):
        """Greedy decode of an encoded window after `prompt` ([sot_prev, previous...] sot [...] no_timestamps).

        The prompt up to and including the start token runs first (its logits give the no-speech probability),
        then the rest of the prompt as the first-token step, then one token a step until end of text or
        `max_tokens` (default: ctranslate2's min(max_cache // 2, max_cache - (len(prompt) - 1)))."""
        sot = self.tokens["sot"]
        if sot not in prompt:
            raise ValueError("the prompt has no start token")
        cut = prompt.index(sot) + 1
        prefix, tail = list(prompt[:cut]), list(prompt[cut:])
        if max_tokens is None:
            max_tokens = min(self.max_cache // 2, self.max_cache - (len(prompt) - 1))
        t0 = time.time()
        past = self._empty_past()
        pos = 0
        for k in range(0, len(prefix), self.max_chunk):
            part = prefix[k:k + self.max_chunk]
            last = k + self.max_chunk >= len(prefix)
            tok, sot_logits = self._step(cross, past, part, pos, last and not tail)
            pos += len(part)
        no_speech = float(np.exp(log_softmax(sot_logits)[self.tokens["no_speech"]]))
        logits = []
        if tail:
            tok, row = self._step(cross, past, tail, pos, True)
            pos += len(tail)
        else:
            row = sot_logits
        tokens = []
        logprob = 0.0
        while True:
            logits.append(row)
            logprob += float(log_softmax(row)[tok])
            if tok == self.tokens["eot"] or len(tokens) >= max_tokens or pos >= self.max_cache:
                break
            tokens.append(tok)
            tok, row = self._step(cross, past, [tok], pos, False)
            pos += 1
        return Decoded(tokens, logits, sot_logits, no_speech, logprob / (len(tokens) + 1), time.time() - t0)

    def windows(self, samples):
        """The audio cut into windows (the last one shorter)."""
        return [samples[k:k + self.window] for k in range(0, max(len(samples), 1), self.window)]


def read_wav_16k(path):
    """A 16 kHz mono 16-bit PCM WAV file as float32 in [-1, 1) (the fixtures' format; anything else raises)."""
    with wave.open(path) as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: {w.getframerate()} Hz, {w.getnchannels()} channels, "
                             f"{8 * w.getsampwidth()}-bit: not 16 kHz mono s16")
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def transcribe_json(bin_path, model, wav, *flags):
    """Runs `onestep transcribe model wav --json *flags` and returns (its parsed JSON, wall seconds); fails with
    the end of its stderr when it exits non-zero."""
    t0 = time.time()
    out = subprocess.run([bin_path, "transcribe", model, wav, "--json", *flags], capture_output=True, text=True)
    secs = time.time() - t0
    assert out.returncode == 0, f"onestep transcribe {wav} {' '.join(flags)} failed: {out.stderr[-2000:]}"
    return json.loads(out.stdout), secs


def norm_words(text):
    """Lower case, thousands separators dropped, punctuation (but apostrophes) to spaces; the words."""
    t = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    return re.sub(r"[^a-z0-9' ]+", " ", t).split()


def wer(ref, hyp):
    """Word error rate of `hyp` against `ref` after norm_words; None when `ref` has no words."""
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
