//! A Hugging Face Whisper folder: the tiny random multilingual checkpoint of
//! `scripts/refs/gen_tiny_whisper.py` (tests/fixtures/tiny/whisper) read, exported (f32 cache) and run
//! in the runtime on its 30 s `audio.wav` — the log-mel front end in the graph — against transformers'
//! logits (WhisperFeatureExtractor's features, one forward a sequence): every position decoded token by
//! token, and the sequences prefilled whole, within [`TOL`] of the largest logit; on the CPU, and with
//! the decoder step (then the encoder phase too) on the GPU where the machine has an adapter (lavapipe
//! in CI; `ONESTEP_REQUIRE_GPU` makes a missing one a failure).

use std::path::{Path, PathBuf};

use onestep::{LoadOptions, Model, Precision, StepSampling};
use onestep_export::export_speech::export_whisper;
use onestep_export::quant::Quantize;
use onestep_export::source::whisper_hf::{is_hf_whisper, read_hf};
use onestep_export::{ExportOptions, NoProgress};
use onestep_format::graph::DType;

/// Largest |ours − transformers| over a sequence's logits, as a share of its largest |logit|.
const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/whisper")
}

fn reference() -> (serde_json::Value, Vec<f32>) {
    let r = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap())
        .unwrap();
    let b = std::fs::read(dir().join("logits.bin")).unwrap();
    let l = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (r, l)
}

/// The samples of a canonical 16-bit mono PCM WAV (44-byte header) as f32 in [-1, 1).
fn wav16(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"RIFF");
    assert_eq!(&b[36..40], b"data");
    assert_eq!(u16::from_le_bytes([b[22], b[23]]), 1, "mono");
    assert_eq!(u16::from_le_bytes([b[34], b[35]]), 16, "16-bit");
    b[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 32768.0)
        .collect()
}

#[test]
fn the_folder_reads_as_a_multilingual_whisper() {
    let d = dir();
    assert!(is_hf_whisper(&d));
    let src = read_hf(&d).unwrap();
    let c = &src.config;
    assert_eq!(
        (
            c.mel_bins,
            c.d_model,
            c.encoder_layers,
            c.decoder_layers,
            c.ffn
        ),
        (80, 64, 2, 2, 128)
    );
    assert_eq!((c.vocab_size, c.audio_ctx, c.text_ctx), (1812, 1500, 448));
    assert!(
        src.multilingual,
        "generation_config.json says is_multilingual"
    );
    let langs: Vec<(&str, u32)> = src
        .languages
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(langs, [("de", 303), ("en", 302), ("fr", 304)]);
    let t = &src.tokens;
    assert_eq!(
        (t.eot, t.sot, t.translate, t.transcribe, t.sot_prev),
        (300, 301, 305, 306, 308)
    );
    assert_eq!(
        (t.no_speech, t.no_timestamps, t.timestamp_begin),
        (309, 310, 311)
    );
    // generation_config's list, plus the prompt's own specials (faster-whisper's `-1`).
    for id in [1, 93, 309, 305, 306, 301, 308, 307] {
        assert!(src.suppress.contains(&id), "{id} not suppressed");
    }
    assert_eq!(src.suppress_begin.len(), 2);
    assert!(src.suppress_begin.contains(&300));
    // The CTranslate2 reader does not take it, and a folder without config.json is not one.
    assert!(!is_hf_whisper(&d.join("..")));
}

#[test]
fn tiny_multilingual_whisper_matches_transformers_logits() {
    let (tmp, out) = export_tiny("hf", Quantize::Keep);
    let mut runs = vec![("cpu", LoadOptions::cpu())];
    if has_gpu() {
        let gpu = LoadOptions {
            device: onestep::gpu::DeviceRequest::Gpu(None),
            precision: Precision::Exact,
            ..LoadOptions::default()
        };
        // The encoder on the GPU too (a software adapter keeps it on the CPU unless asked).
        let mut both = gpu.clone();
        both.gpu.encoder_software = true;
        runs.push(("gpu", gpu));
        runs.push(("gpu (encoder too)", both));
    }
    for (device, options) in runs {
        let model = Model::load_with(&out, &options).unwrap();
        let encoder = model.encoder_device().unwrap();
        assert_eq!(
            encoder == "cpu",
            device != "gpu (encoder too)",
            "{device}: {encoder}"
        );
        matches_transformers(&model, device);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The tiny checkpoint exported (f32 cache, chunks of 16, weights as `quantize` asks) into a fresh
/// temporary folder named by `tag`: (the folder, the file).
fn export_tiny(tag: &str, quantize: Quantize) -> (PathBuf, PathBuf) {
    let tmp = std::env::temp_dir().join(format!("onestep-whisper-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = tmp.join("tiny-whisper.onnx");
    let opts = ExportOptions {
        kv_dtype: DType::F32,
        max_chunk: 16,
        quantize,
        ..ExportOptions::default()
    };
    export_whisper(&read_hf(&dir()).unwrap(), &out, &opts, &mut NoProgress).unwrap();
    (tmp, out)
}

/// Whether this machine has a wgpu adapter (a missing one is a failure under `ONESTEP_REQUIRE_GPU`).
fn has_gpu() -> bool {
    use onestep::gpu::{BackendFilter, DeviceRequest};
    match onestep::testing::GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
                "ONESTEP_REQUIRE_GPU is set but there is no adapter: {e}"
            );
            eprintln!("note: no wgpu adapter ({e}); the tiny Whisper not run on the GPU");
            false
        }
    }
}

/// One of the reference's sequences: its token ids, its first row in the logits, its largest
/// |logit|.
struct Sequence {
    name: String,
    ids: Vec<u32>,
    offset: usize,
    scale: f32,
}

/// The reference's sequences.
fn sequences(r: &serde_json::Value) -> Vec<Sequence> {
    let seqs = r["sequences"].as_array().unwrap().iter();
    seqs.map(|s| Sequence {
        name: s["name"].as_str().unwrap().to_string(),
        ids: (s["ids"].as_array().unwrap().iter())
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        offset: s["offset"].as_u64().unwrap() as usize,
        scale: s["max_abs_logit"].as_f64().unwrap() as f32,
    })
    .collect()
}

/// Largest |got − want|.
fn max_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

/// Every reference sequence through `model` (loaded for `device`): decoded token by token, prefilled
/// whole, and in two chunks, each row within [`TOL`] of transformers'.
fn matches_transformers(model: &Model, device: &str) {
    let sp = model.speech().expect("a transcription model").clone();
    assert!(sp.multilingual);
    assert_eq!(sp.languages.get("fr"), Some(&304));
    let samples = wav16(&dir().join("audio.wav"));
    assert_eq!(samples.len(), 480_000);
    let (r, logits) = reference();
    let vocab = r["vocab"].as_u64().unwrap() as usize;
    let mut state = model.new_state().unwrap();
    for s in sequences(&r) {
        let (name, ids, off, scale) = (&s.name, &s.ids, s.offset, s.scale);
        let row = |i: usize| &logits[(off + i) * vocab..(off + i + 1) * vocab];
        let err = |got: &[f32], want: &[f32]| max_diff(got, want) / scale;
        // Decode: one token a step, every position.
        model.encode(&mut state, &samples).unwrap();
        let mut worst = 0.0f32;
        for (i, &id) in ids.iter().enumerate() {
            let o = model
                .step(&mut state, &[id], &StepSampling::GREEDY)
                .unwrap();
            worst = worst.max(err(&o.logits, row(i)));
        }
        assert!(
            worst <= TOL,
            "{device} {name}, decode: error {worst:.2e} of max|logit| {scale}"
        );
        // Prefill: the whole sequence in one step (its last row), then a prefix and the rest.
        model.encode(&mut state, &samples).unwrap();
        let o = model.step(&mut state, ids, &StepSampling::GREEDY).unwrap();
        let whole = err(&o.logits, row(ids.len() - 1));
        model.encode(&mut state, &samples).unwrap();
        let k = ids.len() / 2;
        let a = model
            .step(&mut state, &ids[..k], &StepSampling::GREEDY)
            .unwrap();
        let b = model
            .step(&mut state, &ids[k..], &StepSampling::GREEDY)
            .unwrap();
        let split = err(&a.logits, row(k - 1)).max(err(&b.logits, row(ids.len() - 1)));
        assert!(
            whole.max(split) <= TOL,
            "{device} {name}, prefill: error {whole:.2e} whole, {split:.2e} split"
        );
        println!(
            "{device} {name}: {} positions, decode {worst:.2e}, prefill {:.2e} (of max|logit| {scale:.1})",
            ids.len(),
            whole.max(split)
        );
    }
}

/// The `--quantize q8` export (8-bit blocks of 32) at fast precision — the encoder's linears on the
/// integer kernels too — against transformers: the decode logits within [`Q8_TOL`] of the largest
/// logit (the 8-bit weights and activations move them), the same arg-max wherever transformers'
/// top-2 margin passes [`Q8_MARGIN`]; and a profiled load reports the encoder's ops beside the
/// decoder's.
#[test]
fn q8_export_at_fast_precision_stays_near_transformers() {
    const Q8_TOL: f32 = 2e-2;
    const Q8_MARGIN: f32 = 0.05;
    let (tmp, out) = export_tiny("q8", Quantize::Q8);
    let options = LoadOptions {
        precision: Precision::Fast,
        profile: true,
        ..LoadOptions::cpu()
    };
    let model = Model::load_with(&out, &options).unwrap();
    let samples = wav16(&dir().join("audio.wav"));
    let (r, logits) = reference();
    let vocab = r["vocab"].as_u64().unwrap() as usize;
    let mut state = model.new_state().unwrap();
    let (mut worst, mut compared) = (0.0f32, 0);
    for s in sequences(&r) {
        let (off, scale) = (s.offset, s.scale);
        model.encode(&mut state, &samples).unwrap();
        for (i, &id) in s.ids.iter().enumerate() {
            let want = &logits[(off + i) * vocab..(off + i + 1) * vocab];
            let got = model
                .step(&mut state, &[id], &StepSampling::GREEDY)
                .unwrap()
                .logits;
            worst = worst.max(max_diff(&got, want) / scale);
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
            if want[order[0]] - want[order[1]] > Q8_MARGIN * scale {
                let top = (0..vocab)
                    .max_by(|&a, &b| got[a].total_cmp(&got[b]))
                    .unwrap();
                assert_eq!(top, order[0], "sequence at offset {off}, step {i}: arg-max");
                compared += 1;
            }
        }
    }
    println!("q8 fast: worst {worst:.2e} of max|logit|, {compared} arg-maxes compared");
    assert!(worst <= Q8_TOL, "error {worst:.2e} of max|logit|");
    assert!(compared > 0);
    let profile = model.profile();
    for op in [
        "encoder: [linear",
        "encoder: Attention",
        "[cache attention]",
    ] {
        assert!(
            profile
                .iter()
                .any(|(name, n, _)| name.starts_with(op) && *n > 0),
            "no `{op}` row in the profile: {profile:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
