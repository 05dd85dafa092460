//! Whisper: one graph, two phases (docs/GRAPH.md, "Transcription models"). The graph's one node is an
//! `If` on the `encode` input:
//! - **then** (encoder phase): one 30 s window of samples → log-mel front end (reflect pad, the
//!   Fourier transform as a strided `Conv` over the windowed basis, power, mel filters, log10, clamp,
//!   frames past the audio set to 0 as faster-whisper pads them) → two convolutions with GELU →
//!   positions → encoder layers → per decoder layer the cross-attention keys and values
//!   (`encoded.{i}.key/value`);
//! - **else** (decoder step): the chunk's tokens over the static self-attention cache (the text
//!   models' step: `new.{i}.key/value`, `logits`, `next_token`), each layer also attending the
//!   window's `cross.{i}.key/value`, and the token choice with the suppressed tokens never chosen
//!   and the begin-suppress set not chosen first.
//!
//! Each branch also gives the other's outputs as empty tensors (an `If` has one output list).

use std::f64::consts::PI;

use onestep_format::contract;
use onestep_format::graph::{DType, Graph};

use super::blocks::{self, f32_bytes, Inputs};
use super::{add_matrix, embedding, linear, token_choice, MatSyms};
use crate::quant::{self, Quantize};
use crate::source::whisper::WhisperSource;
use crate::source::SourceDType;
use crate::trace::{AttentionScores, SDim, Sym, TraceError, Tracer};

use SDim::N;
const T: SDim = SDim::T(0);

/// Samples per second of the front end.
pub const SAMPLE_RATE: u32 = 16_000;
/// Fourier transform length.
pub const N_FFT: usize = 400;
/// Samples between frames.
pub const HOP: usize = 160;
/// Samples in one window (30 s).
pub const WINDOW_SAMPLES: usize = 480_000;
/// Frames in one window.
pub const FRAMES: usize = WINDOW_SAMPLES / HOP;
/// Layer norm epsilon of every Whisper checkpoint.
const EPS: f32 = 1e-5;

/// What the Whisper graph is built with.
#[derive(Debug, Clone)]
pub struct WhisperOptions {
    /// Self-attention cache slots (at most the decoder's positions).
    pub max_cache: usize,
    /// Element type of the self-attention cache and the cross-attention keys/values.
    pub kv_dtype: DType,
    /// Weight encoding of the linear layers and the embedding.
    pub quantize: Quantize,
}

/// Builds the two-phase graph of `src`.
pub fn build(src: &WhisperSource, opts: &WhisperOptions) -> Result<Graph, TraceError> {
    let c = &src.config;
    if opts.max_cache == 0 || opts.max_cache > c.text_ctx {
        return Err(TraceError::Model(format!(
            "max cache {} must be 1..={} (the decoder's positions)",
            opts.max_cache, c.text_ctx
        )));
    }
    if c.audio_ctx * 2 != FRAMES {
        return Err(TraceError::Model(format!(
            "{} encoder positions: a 30 s window gives {}",
            c.audio_ctx,
            FRAMES / 2
        )));
    }
    let mut t = Tracer::new("whisper");
    let w = Src {
        src,
        q: opts.quantize,
    };
    let kv = opts.kv_dtype;
    let (h, d) = (c.decoder_heads, c.d_model / c.decoder_heads);
    let encode = t.input(contract::ENCODE, DType::Bool, vec![N(1)])?;
    let audio = t.input(contract::AUDIO, DType::F32, vec![N(1), N(WINDOW_SAMPLES)])?;
    let samples = t.input(contract::AUDIO_SAMPLES, DType::I64, vec![N(1)])?;
    let input_ids = t.input(contract::INPUT_IDS, DType::I64, vec![N(1), T])?;
    let position = t.input(contract::POSITION, DType::I64, vec![N(1)])?;
    let cache = vec![N(1), N(h), N(opts.max_cache), N(d)];
    let cross = vec![N(1), N(h), N(c.audio_ctx), N(d)];
    let mut past = Vec::new();
    let mut cross_in = Vec::new();
    for i in 0..c.decoder_layers {
        past.push((
            t.input(&contract::past_key(i), kv, cache.clone())?,
            t.input(&contract::past_value(i), kv, cache.clone())?,
        ));
    }
    for i in 0..c.decoder_layers {
        cross_in.push((
            t.input(&contract::cross_key(i), kv, cross.clone())?,
            t.input(&contract::cross_value(i), kv, cross.clone())?,
        ));
    }
    let sampling = [
        t.input(contract::TEMPERATURE, DType::F32, vec![N(1)])?,
        t.input(contract::TOP_K, DType::I64, vec![N(1)])?,
        t.input(contract::TOP_P, DType::F32, vec![N(1)])?,
        t.input(contract::RANDOM_U, DType::F32, vec![N(1)])?,
    ];
    let first = t.input(contract::FIRST_TOKEN, DType::Bool, vec![N(1)])?;
    let x = Inputs {
        input_ids,
        position,
        past,
        sampling,
    };

    // The weights are the main graph's (both branches read them); the nodes go into the branches.
    let mark = t.mark();
    let encoded = encoder(&mut t, &w, &audio, &samples, kv)?;
    let empty_new = t.const_empty(kv, &[1, h, 0, d])?;
    let empty_tok = t.const_empty(DType::I64, &[0])?;
    let empty_logits = t.const_empty(DType::F32, &[1, 0])?;
    let mut outs: Vec<&Sym> = encoded.iter().collect();
    outs.push(&empty_tok);
    outs.push(&empty_logits);
    outs.extend(std::iter::repeat_n(&empty_new, 2 * c.decoder_layers));
    let then_g = t.branch("encoder", mark, &outs)?;

    let mark = t.mark();
    let step = decoder(&mut t, &w, &x, &cross_in, &first, opts)?;
    let empty_cross = t.const_empty(kv, &[1, h, 0, d])?;
    let mut outs: Vec<&Sym> = std::iter::repeat_n(&empty_cross, 2 * c.decoder_layers).collect();
    outs.extend(step.iter());
    let else_g = t.branch("decoder", mark, &outs)?;

    let frames = SDim::Dyn("audio_frames".into());
    let mut decl = vec![(kv, vec![N(1), N(h), frames, N(d)]); 2 * c.decoder_layers];
    decl.push((DType::I64, vec![SDim::Dyn("chosen".into())]));
    decl.push((DType::F32, vec![N(1), SDim::Dyn("vocab".into())]));
    decl.extend(std::iter::repeat_n(
        (kv, vec![N(1), N(h), T, N(d)]),
        2 * c.decoder_layers,
    ));
    let ys = t.if_("phase", &encode, then_g, else_g, decl)?;
    let mut names = Vec::new();
    for i in 0..c.decoder_layers {
        names.push(contract::encoded_key(i));
        names.push(contract::encoded_value(i));
    }
    names.push(contract::NEXT_TOKEN.into());
    names.push(contract::LOGITS.into());
    for i in 0..c.decoder_layers {
        names.push(contract::new_key(i));
        names.push(contract::new_value(i));
    }
    for (y, name) in ys.iter().zip(&names) {
        t.output(y, name)?;
    }
    Ok(t.finish())
}

/// The source's tensors as graph weights, in the requested encoding.
struct Src<'a> {
    src: &'a WhisperSource,
    q: Quantize,
}

impl Src<'_> {
    fn err(e: impl std::fmt::Display) -> TraceError {
        TraceError::Model(e.to_string())
    }

    fn tensor(&self, name: &str) -> Result<&crate::source::SourceTensor, TraceError> {
        (self.src.tensors.get(name))
            .ok_or_else(|| TraceError::Model(format!("missing tensor `{name}`")))
    }

    /// A linear layer's (or the embedding's) matrix.
    fn matrix(&self, t: &mut Tracer, name: &str) -> Result<MatSyms, TraceError> {
        let m = self.tensor(name)?;
        let m = quant::encode_matrix(name, m, self.q).map_err(Self::err)?;
        add_matrix(t, name.trim_end_matches(".weight"), &m)
    }

    /// A vector (norm weight, bias) as f32.
    fn vector(&self, t: &mut Tracer, name: &str) -> Result<Sym, TraceError> {
        let v = self.tensor(name)?;
        let b = quant::vector_f32(name, v).map_err(Self::err)?;
        t.weight(name, DType::F32, &v.shape, b)
    }

    /// `name.bias` where the source has it.
    fn bias(&self, t: &mut Tracer, base: &str) -> Result<Option<Sym>, TraceError> {
        let name = format!("{base}.bias");
        match self.src.tensors.contains_key(&name) {
            true => self.vector(t, &name).map(Some),
            false => Ok(None),
        }
    }

    /// A float tensor of any rank as stored, then as f32 in the graph (a `Cast` for f16/bf16).
    fn float(&self, t: &mut Tracer, name: &str) -> Result<Sym, TraceError> {
        let s = self.stored_float(t, name)?;
        to_f32(t, &format!("{name}.f32"), s)
    }

    /// Rows `idx` of a float table as f32: gathered as stored, then cast, so a decode step converts
    /// its one row, not the table.
    fn float_rows(&self, t: &mut Tracer, name: &str, idx: &Sym) -> Result<Sym, TraceError> {
        let s = self.stored_float(t, name)?;
        let rows = t.gather(&format!("{name}.rows"), &s, idx, 0)?;
        to_f32(t, &format!("{name}.rows_f32"), rows)
    }

    /// A float tensor of any rank as stored (f32, f16 or bf16).
    fn stored_float(&self, t: &mut Tracer, name: &str) -> Result<Sym, TraceError> {
        let v = self.tensor(name)?;
        let dt = match v.dtype {
            SourceDType::F32 => DType::F32,
            SourceDType::F16 => DType::F16,
            SourceDType::BF16 => DType::BF16,
            other => return Err(Self::err(format!("`{name}`: {other:?} is not a float"))),
        };
        t.weight(name, dt, &v.shape, v.data.clone())
    }

    /// Layer norm `{base}.{weight,bias}` of `x`.
    fn norm(&self, t: &mut Tracer, node: &str, base: &str, x: &Sym) -> Result<Sym, TraceError> {
        let g = self.vector(t, &format!("{base}.weight"))?;
        let b = self.vector(t, &format!("{base}.bias"))?;
        t.layer_norm(node, x, &g, &b, EPS)
    }

    /// `Linear(x, {base}.weight) + {base}.bias`.
    fn linear(&self, t: &mut Tracer, node: &str, base: &str, x: &Sym) -> Result<Sym, TraceError> {
        let m = self.matrix(t, &format!("{base}.weight"))?;
        let b = self.bias(t, base)?;
        linear(t, node, x, &m, b.as_ref())
    }
}

/// `s` as f32 (a `Cast` unless it is f32 already).
fn to_f32(t: &mut Tracer, name: &str, s: Sym) -> Result<Sym, TraceError> {
    match s.dtype == DType::F32 {
        true => Ok(s),
        false => t.cast(name, &s, DType::F32),
    }
}

/// Splits `[L, h·d]` (`L` = `len`) into heads `[1, h, L, d]`.
fn heads(
    t: &mut Tracer,
    name: &str,
    y: &Sym,
    len: &SDim,
    h: usize,
    d: usize,
) -> Result<Sym, TraceError> {
    let r = t.reshape(
        &format!("{name}.split"),
        y,
        &[N(1), len.clone(), N(h), N(d)],
    )?;
    t.transpose(name, &r, &[0, 2, 1, 3])
}

/// Merges heads `[1, h, L, d]` back to `[L, h·d]`.
fn merge(t: &mut Tracer, name: &str, a: &Sym, len: &SDim, width: usize) -> Result<Sym, TraceError> {
    let m = t.transpose(&format!("{name}.merge"), a, &[0, 2, 1, 3])?;
    t.reshape(&format!("{name}.merge_flat"), &m, &[len.clone(), N(width)])
}

/// The encoder phase: `audio` (`samples` of it valid) → per decoder layer its cross-attention keys and
/// values in the cache dtype (`[k0, v0, k1, v1, …]`).
fn encoder(
    t: &mut Tracer,
    w: &Src<'_>,
    audio: &Sym,
    samples: &Sym,
    kv: DType,
) -> Result<Vec<Sym>, TraceError> {
    let c = &w.src.config;
    let mel = log_mel(t, audio, samples, c.mel_bins)?;
    t.set_scope("enc");
    let w1 = w.float(t, "enc.conv1.weight")?;
    let b1 = w.vector(t, "enc.conv1.bias")?;
    let w2 = w.float(t, "enc.conv2.weight")?;
    let b2 = w.vector(t, "enc.conv2.bias")?;
    let x = t.conv1d("conv1", &mel, &w1, Some(&b1), 1, 1)?;
    let x = t.gelu("conv1.gelu", &x)?;
    let x = t.conv1d("conv2", &x, &w2, Some(&b2), 2, 1)?;
    let x = t.gelu("conv2.gelu", &x)?;
    let (f, dm) = (c.audio_ctx, c.d_model);
    let x = t.reshape("frames", &x, &[N(dm), N(f)])?;
    let x = t.transpose("tokens", &x, &[1, 0])?;
    let pos = w.float(t, "enc.pos")?;
    let mut x = t.add("positions", &x, &pos)?;
    let (h, d) = (c.encoder_heads, dm / c.encoder_heads);
    let len = N(f);
    for i in 0..c.encoder_layers {
        t.set_scope(&format!("enc.l{i}"));
        let l = format!("enc.l{i}");
        let a = w.norm(t, "attn_norm", &format!("{l}.attn_norm"), &x)?;
        let q = w.linear(t, "attn.q_proj", &format!("{l}.attn.q"), &a)?;
        let k = w.linear(t, "attn.k_proj", &format!("{l}.attn.k"), &a)?;
        let v = w.linear(t, "attn.v_proj", &format!("{l}.attn.v"), &a)?;
        let q = heads(t, "attn.q_heads", &q, &len, h, d)?;
        let k = heads(t, "attn.k_heads", &k, &len, h, d)?;
        let v = heads(t, "attn.v_heads", &v, &len, h, d)?;
        let a = t.attention_with("attn.sdpa", &q, &k, &v, None, AttentionScores::default())?;
        let a = merge(t, "attn", &a, &len, dm)?;
        let a = w.linear(t, "attn.o_proj", &format!("{l}.attn.o"), &a)?;
        x = t.add("attn.residual", &x, &a)?;
        let m = w.norm(t, "ffn_norm", &format!("{l}.ffn_norm"), &x)?;
        let m = w.linear(t, "mlp.fc1", &format!("{l}.fc1"), &m)?;
        let m = t.gelu("mlp.gelu", &m)?;
        let m = w.linear(t, "mlp.fc2", &format!("{l}.fc2"), &m)?;
        x = t.add("mlp.residual", &x, &m)?;
    }
    t.set_scope("enc");
    let x = w.norm(t, "norm", "enc.norm", &x)?;
    let (h, d) = (c.decoder_heads, dm / c.decoder_heads);
    let mut out = Vec::new();
    for i in 0..c.decoder_layers {
        t.set_scope(&format!("dec.l{i}.cross"));
        let l = format!("dec.l{i}.cross");
        for part in ["k", "v"] {
            let y = w.linear(t, &format!("{part}_proj"), &format!("{l}.{part}"), &x)?;
            let y = heads(t, &format!("{part}_heads"), &y, &len, h, d)?;
            out.push(match kv {
                DType::F32 => y,
                _ => t.cast(&format!("{part}_cache"), &y, kv)?,
            });
        }
    }
    t.set_scope("");
    Ok(out)
}

/// Whisper's log-mel features `[1, mel_bins, 3000]` of one window: frames centred on every 160th
/// sample (reflected at the window's start), `log10(max(power·mel, 1e-10))` clamped to 8 below the
/// maximum over the audio's frames, `(x + 4) / 4`; frames past the audio (`samples / 160` on) are 0.
fn log_mel(t: &mut Tracer, audio: &Sym, samples: &Sym, bins: usize) -> Result<Sym, TraceError> {
    t.set_scope("frontend");
    let x = t.reshape("signal", audio, &[N(1), N(1), N(WINDOW_SAMPLES)])?;
    // Centre the frames (`N_FFT / 2` reflected at the start) and end the signal where the last of the
    // 3000 frames ends (the next 40 samples reflected: 3000 frames, not 3001).
    let tail = (FRAMES - 1) * HOP + N_FFT - WINDOW_SAMPLES - N_FFT / 2;
    let x = t.pad("centred", &x, &[0, 0, N_FFT / 2, 0, 0, tail], "reflect")?;
    let freqs = N_FFT / 2 + 1;
    let basis = t.weight(
        "frontend.dft",
        DType::F32,
        &[2 * freqs, 1, N_FFT],
        f32_bytes(&dft_basis()),
    )?;
    let spec = t.conv1d("stft", &x, &basis, None, HOP, 0)?;
    let power = t.mul("power", &spec, &spec)?;
    let filters = t.weight(
        "frontend.mel",
        DType::F32,
        &[bins, 2 * freqs, 1],
        f32_bytes(&mel_weights_both(bins)),
    )?;
    let mel = t.conv1d("mel", &power, &filters, None, 1, 0)?;
    let floor = t.const_f32(1e-10);
    let mel = t.max("mel_floor", &mel, &floor)?;
    let ln = t.log("ln", &mel)?;
    let inv_ln10 = t.const_f32(std::f32::consts::LOG10_E);
    let lg = t.mul("log10", &ln, &inv_ln10)?;
    // Which frames hold audio: faster-whisper takes the maximum over samples/160 + 1 frames and
    // keeps samples/160 of them.
    let zero = t.const_i64(&[0], true);
    let one = t.const_i64(&[1], true);
    let nf = t.const_i64(&[FRAMES as i64], true);
    let frame = t.range("frame", &zero, &nf, &one)?;
    let hop = t.const_i64(&[HOP as i64], false);
    let kept = t.div("audio_frames", samples, &hop)?;
    let one_v = t.const_i64(&[1], false);
    let seen = t.add("seen_frames", &kept, &one_v)?;
    let in_max = t.less("in_max", &frame, &seen)?;
    let keep = t.less("keep", &frame, &kept)?;
    let ninf = t.const_f32(f32::NEG_INFINITY);
    let counted = t.where_("counted", &in_max, &lg, &ninf)?;
    let top = t.reduce_max_all("max", &counted)?;
    let eight = t.const_f32(8.0);
    let low = t.sub("clamp_floor", &top, &eight)?;
    let y = t.max("clamped", &lg, &low)?;
    let four = t.const_f32(4.0);
    let quarter = t.const_f32(0.25);
    let y = t.add("shifted", &y, &four)?;
    let y = t.mul("scaled", &y, &quarter)?;
    let zero_f = t.const_f32(0.0);
    let y = t.where_("features", &keep, &y, &zero_f)?;
    t.set_scope("");
    Ok(y)
}

/// The decoder step: the chunk over the self-attention cache and the window's cross keys/values →
/// `[next_token, logits, new_key_0, new_value_0, …]`.
fn decoder(
    t: &mut Tracer,
    w: &Src<'_>,
    x_in: &Inputs,
    cross: &[(Sym, Sym)],
    first: &Sym,
    opts: &WhisperOptions,
) -> Result<Vec<Sym>, TraceError> {
    let c = &w.src.config;
    let (dm, h) = (c.d_model, c.decoder_heads);
    let d = dm / h;
    let kv = opts.kv_dtype;
    let pos = blocks::positions(t, x_in, opts.max_cache)?;
    let mask = pos.mask(t, "mask", None)?;
    t.set_scope("dec");
    let embed = w.matrix(t, "dec.embed.weight")?;
    let tok = embedding(t, &embed, &pos.ids)?;
    let pflat = t.reshape("pos_flat", &pos.pos_ids, &[T])?;
    let pe = w.float_rows(t, "dec.pos", &pflat)?;
    let mut x = t.add("embedded", &tok, &pe)?;
    for (i, (ck, cv)) in cross.iter().enumerate() {
        t.set_scope(&format!("dec.l{i}"));
        let l = format!("dec.l{i}");
        let a = w.norm(t, "attn_norm", &format!("{l}.attn_norm"), &x)?;
        let mq = w.matrix(t, &format!("{l}.attn.q.weight"))?;
        let mk = w.matrix(t, &format!("{l}.attn.k.weight"))?;
        let mv = w.matrix(t, &format!("{l}.attn.v.weight"))?;
        let bq = w.bias(t, &format!("{l}.attn.q"))?;
        let bk = w.bias(t, &format!("{l}.attn.k"))?;
        let bv = w.bias(t, &format!("{l}.attn.v"))?;
        let [q, k, v] = blocks::qkv_heads(
            t,
            &a,
            [&mq, &mk, &mv],
            [bq.as_ref(), bk.as_ref(), bv.as_ref()],
            (h, h, d),
            None,
            EPS,
        )?;
        let (pk, pv) = &x_in.past[i];
        let a = blocks::cache_attention(
            t,
            i,
            (&q, &k, &v),
            (pk, pv),
            kv,
            &mask,
            AttentionScores::default(),
            dm,
        )?;
        let a = w.linear(t, "attn.o_proj", &format!("{l}.attn.o"), &a)?;
        x = t.add("attn.residual", &x, &a)?;
        let a = w.norm(t, "cross_norm", &format!("{l}.cross_norm"), &x)?;
        let q = w.linear(t, "cross.q_proj", &format!("{l}.cross.q"), &a)?;
        let q = heads(t, "cross.q_heads", &q, &T, h, d)?;
        let (ck, cv) = match kv {
            DType::F32 => (ck.clone(), cv.clone()),
            _ => (
                t.cast("cross.keys", ck, DType::F32)?,
                t.cast("cross.values", cv, DType::F32)?,
            ),
        };
        let a = t.attention_with("cross.sdpa", &q, &ck, &cv, None, AttentionScores::default())?;
        let a = merge(t, "cross", &a, &T, dm)?;
        let a = w.linear(t, "cross.o_proj", &format!("{l}.cross.o"), &a)?;
        x = t.add("cross.residual", &x, &a)?;
        let m = w.norm(t, "ffn_norm", &format!("{l}.ffn_norm"), &x)?;
        let m = w.linear(t, "mlp.fc1", &format!("{l}.fc1"), &m)?;
        let m = t.gelu("mlp.gelu", &m)?;
        let m = w.linear(t, "mlp.fc2", &format!("{l}.fc2"), &m)?;
        x = t.add("mlp.residual", &x, &m)?;
    }
    t.set_scope("dec");
    let one = t.const_i64(&[1], true);
    let last_idx = t.sub("last_index", &pos.chunk_len, &one)?;
    let last = t.gather("last", &x, &last_idx, 0)?;
    let last = t.unsqueeze("last_row", &last, &[0])?;
    let last = w.norm(t, "norm", "dec.norm", &last)?;
    let logits = linear(t, "lm_head", &last, &embed, None)?;
    t.set_scope("");
    let choice = suppressed(t, w.src, &logits, first)?;
    let [temperature, top_k, top_p, random_u] = &x_in.sampling;
    let next = token_choice(
        t,
        &choice,
        c.vocab_size,
        temperature,
        top_k,
        top_p,
        random_u,
    )?;
    // The step's outputs in the If's order: the cache rows are the outputs cache_attention declared,
    // taken back (the If gives their names).
    let mut out = vec![next, logits];
    out.extend(t.take_outputs("dec.")?);
    Ok(out)
}

/// The logits the token choice sees: the suppressed tokens at −∞, and when `first`, the
/// begin-suppress set too.
fn suppressed(
    t: &mut Tracer,
    src: &WhisperSource,
    logits: &Sym,
    first: &Sym,
) -> Result<Sym, TraceError> {
    let v = src.config.vocab_size;
    let bias = |ids: &[u32]| {
        let mut b = vec![0f32; v];
        for &i in ids {
            if let Some(x) = b.get_mut(i as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        f32_bytes(&b)
    };
    t.set_scope("suppress");
    let always = t.weight("suppress.always", DType::F32, &[1, v], bias(&src.suppress))?;
    let begin = t.weight(
        "suppress.begin",
        DType::F32,
        &[1, v],
        bias(&src.suppress_begin),
    )?;
    let x = t.add("always", logits, &always)?;
    let xb = t.add("begin", &x, &begin)?;
    let y = t.where_("logits", first, &xb, &x)?;
    t.set_scope("");
    Ok(y)
}

/// The windowed Fourier basis `[2·201, 1, 400]`: rows `k` = `w[n]·cos(2πkn/400)`, rows `201 + k` =
/// `−w[n]·sin(2πkn/400)`, `w` the periodic Hann window (torch.stft's, as Whisper computes it).
pub fn dft_basis() -> Vec<f32> {
    let freqs = N_FFT / 2 + 1;
    let win: Vec<f64> = (0..N_FFT)
        .map(|n| 0.5 - 0.5 * (2.0 * PI * n as f64 / N_FFT as f64).cos())
        .collect();
    let mut out = vec![0f32; 2 * freqs * N_FFT];
    for k in 0..freqs {
        for (n, wn) in win.iter().enumerate() {
            // k·n mod N keeps the angle small and exact.
            let a = 2.0 * PI * ((k * n) % N_FFT) as f64 / N_FFT as f64;
            out[k * N_FFT + n] = (wn * a.cos()) as f32;
            out[(freqs + k) * N_FFT + n] = (-wn * a.sin()) as f32;
        }
    }
    out
}

/// Slaney-scale mel filters `[bins, 201]` over 0..8 kHz with Slaney area normalization (librosa's
/// `filters.mel(sr=16000, n_fft=400, n_mels=bins)`, what Whisper and faster-whisper use).
pub fn mel_filters(bins: usize) -> Vec<f64> {
    let freqs = N_FFT / 2 + 1;
    let f_sp = 200.0 / 3.0;
    let (min_log_hz, min_log_mel) = (1000.0, 1000.0 / f_sp);
    let logstep = 6.4f64.ln() / 27.0;
    let hz_to_mel = |f: f64| {
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    };
    let mel_to_hz = |m: f64| {
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    };
    let sr = SAMPLE_RATE as f64;
    let fft: Vec<f64> = (0..freqs).map(|i| i as f64 * sr / N_FFT as f64).collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let pts: Vec<f64> = (0..bins + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (bins + 1) as f64))
        .collect();
    let mut w = vec![0f64; bins * freqs];
    for m in 0..bins {
        let enorm = 2.0 / (pts[m + 2] - pts[m]);
        for (j, &f) in fft.iter().enumerate() {
            let lower = (f - pts[m]) / (pts[m + 1] - pts[m]);
            let upper = (pts[m + 2] - f) / (pts[m + 2] - pts[m + 1]);
            w[m * freqs + j] = lower.min(upper).max(0.0) * enorm;
        }
    }
    w
}

/// The mel filters applied to the squared real and imaginary parts alike: `[bins, 2·201, 1]`.
fn mel_weights_both(bins: usize) -> Vec<f32> {
    let freqs = N_FFT / 2 + 1;
    let m = mel_filters(bins);
    let mut out = Vec::with_capacity(bins * 2 * freqs);
    for row in m.chunks_exact(freqs) {
        out.extend(row.iter().map(|&x| x as f32));
        out.extend(row.iter().map(|&x| x as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/whisper")
    }

    /// The mel filters equal faster-whisper's (`mel_filters.bin`, written by
    /// scripts/refs/gen_whisper_refs.py) to f32 rounding.
    #[test]
    fn mel_filters_match_faster_whisper() {
        let bytes = std::fs::read(fixtures().join("mel_filters.bin")).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got = mel_filters(80);
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g - w as f64).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-7, "worst difference {worst}");
    }

    /// The Fourier basis: row k of a cosine (and sine) at frequency k under the periodic Hann window,
    /// so a pure tone at bin 10 lands in bin 10 with the window's sum as its magnitude.
    #[test]
    fn dft_basis_puts_a_tone_in_its_bin() {
        let b = dft_basis();
        let freqs = N_FFT / 2 + 1;
        let tone: Vec<f64> = (0..N_FFT)
            .map(|n| (2.0 * PI * 10.0 * n as f64 / N_FFT as f64).cos())
            .collect();
        let power = |k: usize| {
            let re: f64 = (0..N_FFT).map(|n| b[k * N_FFT + n] as f64 * tone[n]).sum();
            let im: f64 = (0..N_FFT)
                .map(|n| b[(freqs + k) * N_FFT + n] as f64 * tone[n])
                .sum();
            re * re + im * im
        };
        let peak = power(10);
        // Σ hann = 200; a cosine of amplitude 1 gives half of it in its bin.
        assert!((peak.sqrt() - 100.0).abs() < 1e-3, "{}", peak.sqrt());
        assert!(power(20) < 1e-6 && power(0) < 1e-6);
    }
}
