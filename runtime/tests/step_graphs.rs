//! The runtime follows the graph: small step graphs of every weight form (built by
//! `scripts/refs/make_step_graphs.py` exactly as docs/GRAPH.md describes) run through a schedule of
//! prefill, decode and sampling steps, and every step's logits and chosen token must match what
//! onnxruntime produced for the same file and inputs.

use std::path::PathBuf;

use onestep::{LoadOptions, Model, StepSampling};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn check(name: &str) {
    check_on(name, &LoadOptions::cpu());
    gpu::check(name);
}

/// The same schedule on the wgpu backend (lavapipe in CI): every step against onnxruntime's logits and
/// tokens. Skipped with a note when the machine has no adapter, unless `ONESTEP_REQUIRE_GPU` is set.
#[cfg(feature = "gpu")]
mod gpu {
    use onestep::backend::gpu::{BackendFilter, DeviceRequest, GpuContext};
    use onestep::LoadOptions;

    pub fn check(name: &str) {
        if let Err(e) = GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
            assert!(
                std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
                "ONESTEP_REQUIRE_GPU is set but there is no adapter: {e}"
            );
            eprintln!("note: no wgpu adapter ({e}); {name} not run on the GPU");
            return;
        }
        let opts = LoadOptions {
            device: DeviceRequest::Gpu(None),
            backend: BackendFilter::Any,
            ..LoadOptions::default()
        };
        super::check_on(name, &opts);
    }
}

#[cfg(not(feature = "gpu"))]
mod gpu {
    pub fn check(_: &str) {}
}

fn check_on(name: &str, opts: &LoadOptions) {
    let dir = fixtures();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let model = Model::load_with(dir.join(format!("{name}.onnx")), opts).unwrap();
    println!("{name}: device {}", model.device());
    let stats = model.plan_stats();
    assert_eq!(
        stats.cache_attention, 2,
        "{name}: attention must read the cache in place: {stats:?}"
    );
    assert!(
        stats.linear >= 14,
        "{name}: linear layers must be bound to their weights: {stats:?}"
    );
    println!("{name}: plan {stats:?}");
    let mut state = model.new_state().unwrap();
    let mut worst = 0.0f32;
    for (i, step) in json["steps"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = step["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let sampling = StepSampling {
            temperature: step["temperature"].as_f64().unwrap() as f32,
            top_k: step["top_k"].as_i64().unwrap(),
            top_p: step["top_p"].as_f64().unwrap() as f32,
            random_u: step["random_u"].as_f64().unwrap() as f32,
        };
        let out = model.step(&mut state, &ids, &sampling).unwrap();
        let want: Vec<f32> = step["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(
            out.logits.len(),
            want.len(),
            "{name} step {i}: logits length"
        );
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        let diff = out
            .logits
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / scale);
        assert!(
            diff <= 2e-4 * scale,
            "{name} step {i}: logits differ from onnxruntime by {diff} (scale {scale})"
        );
        assert_eq!(
            out.next_token as u64,
            step["next_token"].as_u64().unwrap(),
            "{name} step {i}: token differs from onnxruntime"
        );
    }
    println!("{name}: all steps match onnxruntime; worst relative logits diff {worst:.2e}");
}

#[test]
fn f32_weights_untied_f32_cache() {
    check("step_f32_untied_f32kv");
}

#[test]
fn f16_weights_tied_f16_cache_with_bias() {
    check("step_f16_tied_f16kv_bias");
}

#[test]
fn int8_per_channel_weights() {
    check("step_int8_untied_f16kv");
}

#[test]
fn int4_block_weights_with_bias_interleaved_rope() {
    check("step_int4_untied_f32kv_bias");
}

#[test]
fn q8_block_tied_embedding_and_output() {
    check("step_q8_tied_f16kv");
}
