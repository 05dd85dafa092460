//! The export pipeline of a transcription model: Whisper source → the two-phase graph
//! ([`crate::arch::whisper`]) → ONNX file, with the text model's metadata (the decoder's shape, the
//! tokenizer, the stop token) and the speech description ([`Speech`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use onestep_format::contract::{meta, ModelInfo, Speech};
use onestep_format::GenerationDefaults;

use crate::arch::whisper::{self, WhisperOptions};
use crate::export::{ExportError, ExportOptions, ExportSummary, Progress};
use crate::source::whisper::WhisperSource;
use crate::write;

/// Exports the Whisper checkpoint `src` into one ONNX file at `out`. The self-attention cache holds
/// the decoder's positions (448) unless `opts.max_cache` asks for fewer.
pub fn export_whisper(
    src: &WhisperSource,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn Progress,
) -> Result<ExportSummary, ExportError> {
    let c = &src.config;
    let max_cache = opts.max_cache.min(c.text_ctx);
    let max_chunk = opts.max_chunk.min(max_cache);
    if max_chunk == 0 {
        return Err(ExportError::Options(
            "max cache and max chunk must be positive".into(),
        ));
    }
    let mut timings = Vec::new();
    let t0 = Instant::now();
    progress.stage("trace", 1);
    let wopts = WhisperOptions {
        max_cache,
        kv_dtype: opts.kv_dtype,
        quantize: opts.quantize,
    };
    let mut graph = whisper::build(src, &wopts).map_err(|source| ExportError::Trace {
        origin: src.origin.clone(),
        source,
    })?;
    progress.tick(1, "graph");
    progress.finish_stage();
    let t = &src.tokens;
    let info = ModelInfo {
        architecture: "whisper".into(),
        num_layers: c.decoder_layers,
        hidden_size: c.d_model,
        num_heads: c.decoder_heads,
        num_kv_heads: c.decoder_heads,
        head_dim: c.d_model / c.decoder_heads,
        vocab_size: c.vocab_size,
        max_cache,
        max_chunk,
        kv_dtype: opts.kv_dtype,
        bos_id: Some(t.sot),
        add_bos: false,
        eos_id: t.eot,
        stop_ids: vec![t.eot],
        generation: opts.generation.clone().unwrap_or(GenerationDefaults {
            max_new_tokens: (c.text_ctx / 2) as u32,
            ..GenerationDefaults::default()
        }),
    };
    info.to_metadata(&mut graph.metadata);
    let speech = Speech {
        sample_rate: whisper::SAMPLE_RATE,
        window_samples: whisper::WINDOW_SAMPLES,
        mel_bins: c.mel_bins,
        audio_frames: c.audio_ctx,
        time_precision: 0.02,
        multilingual: src.multilingual,
        tokens: t.clone(),
        languages: src.languages.clone(),
        suppress: src.suppress.clone(),
        suppress_begin: src.suppress_begin.clone(),
    };
    let m = &mut graph.metadata;
    m.insert(
        meta::SPEECH.into(),
        serde_json::to_string(&speech).expect("plain struct serializes"),
    );
    m.insert(meta::SOURCE.into(), src.origin.clone());
    m.insert(meta::WEIGHT_ENCODING.into(), opts.quantize.name().into());
    m.insert(meta::TOKENIZER_JSON.into(), src.tokenizer_json.clone());
    timings.push(("trace".to_string(), t0.elapsed().as_secs_f64()));

    let t0 = Instant::now();
    let total: u64 = graph.initializers.iter().map(|i| i.data.len() as u64).sum();
    progress.stage("write", total);
    let file_bytes = write::write_model(&graph, out, Some(Path::new(&src.origin)), &mut |d, _| {
        progress.tick(d, "weights")
    })?;
    progress.finish_stage();
    timings.push(("write".to_string(), t0.elapsed().as_secs_f64()));

    let used: std::collections::HashSet<&str> =
        graph.initializers.iter().map(|i| i.name.as_str()).collect();
    let parameters: u64 = src
        .tensors
        .values()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let weight_bytes: u64 = graph
        .initializers
        .iter()
        .filter(|i| !i.name.starts_with("const.") && !i.name.starts_with("frontend."))
        .map(|i| i.data.len() as u64)
        .sum();
    let unused_tensors = src
        .tensors
        .keys()
        .filter(|n| {
            let base = n.trim_end_matches(".weight").trim_end_matches(".bias");
            !used
                .iter()
                .any(|u| *u == n.as_str() || u.starts_with(&format!("{base}.")))
        })
        .cloned()
        .collect();
    Ok(ExportSummary {
        path: out.to_path_buf(),
        parameters,
        file_bytes,
        bytes_per_weight: weight_bytes as f64 / parameters.max(1) as f64,
        op_histogram: histogram(&graph),
        forms: BTreeMap::from([(opts.quantize.name().to_string(), src.tensors.len())]),
        timings,
        max_cache,
        unused_tensors,
    })
}

/// Ops of the graph and of its branches.
fn histogram(g: &onestep_format::graph::Graph) -> BTreeMap<String, usize> {
    let mut h = g.op_histogram();
    for n in &g.nodes {
        for a in n.attrs.values() {
            if let onestep_format::graph::Attr::Graph(b) = a {
                for (k, v) in histogram(b) {
                    *h.entry(k).or_insert(0) += v;
                }
            }
        }
    }
    h
}
