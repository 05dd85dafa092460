//! The runtime follows the graph: small step graphs of every weight form (built by
//! `scripts/refs/make_step_graphs.py` exactly as docs/GRAPH.md describes) run through a schedule of
//! prefill, decode and sampling steps, and every step's logits and chosen token must match what
//! onnxruntime produced for the same file and inputs.

use std::path::PathBuf;

use onestep::kv::KvOptions;
use onestep::{LoadOptions, Model, Precision, StepSampling};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The CPU with f32 activations: onnxruntime's math, which every check here compares with (the
/// default, `Fast`, is checked against exact math by `tests/peers/test_fast_precision.py`).
fn exact_cpu() -> LoadOptions {
    LoadOptions {
        precision: Precision::Exact,
        ..LoadOptions::cpu()
    }
}

fn check(name: &str) {
    let base = check_on(name, &exact_cpu());
    // Other host page sizes: the same schedule, within the same tolerance of onnxruntime and of the
    // default pages (the online softmax visits keys a page at a time: another summation order).
    for page_rows in [1, 5] {
        let opts = LoadOptions {
            kv: KvOptions {
                page_rows,
                ..Default::default()
            },
            ..exact_cpu()
        };
        let other = check_on(name, &opts);
        for (i, (a, b)) in base.iter().zip(&other).enumerate() {
            let d = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                d < 1e-4,
                "{name} step {i}: pages of {page_rows} rows differ by {d}"
            );
        }
    }
    gpu::check(name);
}

#[cfg(feature = "gpu")]
mod common;
#[cfg(feature = "gpu")]
use common::has_gpu;

/// The GPU load options every GPU test runs under, each named: the adapter's own choice (on lavapipe
/// the one-item-an-invocation kernels), the workgroup kernels with prefill through the tiled GEMM, the
/// subgroup linear layers (where the device has subgroups), and those with every decode attention split
/// over chunks of 3 keys and a submission every 3 dispatches.
#[cfg(feature = "gpu")]
fn gpu_runs() -> Vec<(&'static str, LoadOptions)> {
    use onestep::gpu::{BackendFilter, DeviceRequest, GpuFusions, GpuOptions, Variant};
    let base = LoadOptions {
        device: DeviceRequest::Gpu(None),
        backend: BackendFilter::Any,
        precision: Precision::Exact,
        ..LoadOptions::default()
    };
    let with = |gpu: GpuOptions| LoadOptions {
        gpu,
        ..base.clone()
    };
    let d = GpuOptions::default();
    vec![
        ("the adapter's kernels", base.clone()),
        (
            "workgroup kernels, prefill through the tiled GEMM",
            with(GpuOptions {
                variant: Some(Variant::Lanes),
                gemm_tokens: 2,
                ..d.clone()
            }),
        ),
        (
            "subgroup linear layers",
            with(GpuOptions {
                variant: Some(Variant::Subgroups),
                ..d.clone()
            }),
        ),
        (
            "attention split over chunks of 3 keys, a submission every 3 dispatches",
            with(GpuOptions {
                variant: Some(Variant::Subgroups),
                split_keys: 1,
                split_chunk: 3,
                submit_every: Some(3),
                ..d.clone()
            }),
        ),
        (
            "the attention reading plain inputs: the planner's transposed rotary and f16 round trip",
            with(GpuOptions {
                fusions: GpuFusions {
                    attention_inputs: false,
                    ..GpuFusions::ALL
                },
                ..d.clone()
            }),
        ),
        (
            "no fusion",
            with(GpuOptions {
                fusions: GpuFusions::NONE,
                ..d
            }),
        ),
    ]
}

/// The same schedule on the wgpu backend (lavapipe in CI), under every [`gpu_runs`] setting: every step
/// against onnxruntime's logits and tokens.
#[cfg(feature = "gpu")]
mod gpu {
    use onestep::kv::{GpuCacheBudget, KvOptions};
    use onestep::LoadOptions;

    pub fn check(name: &str) {
        if !super::has_gpu(name) {
            return;
        }
        for (label, opts) in super::gpu_runs() {
            println!("{name}: on the GPU with {label}");
            check_with(name, &opts);
        }
    }

    fn check_with(name: &str, opts: &LoadOptions) {
        let all = super::check_on(name, opts);
        // Every KV budget runs the same kernels on the same data: logits bit-identical to all-resident.
        for budget in [GpuCacheBudget::Percent(50), GpuCacheBudget::Bytes(1)] {
            let o = LoadOptions {
                kv: KvOptions {
                    gpu_budget: budget,
                    page_rows: 3,
                    gpu_segment_bytes: None,
                },
                ..opts.clone()
            };
            let got = super::check_on(name, &o);
            assert_eq!(got, all, "{name}: budget {budget:?} changed the logits");
        }
        // Each layer's cache split over buffers of 5 rows (a context longer than one allocation), all
        // layers streamed: still onnxruntime's logits and tokens (checked inside).
        let row = 2 * 16 * if name.contains("f32kv") { 4 } else { 2 };
        let o = LoadOptions {
            kv: KvOptions {
                gpu_budget: GpuCacheBudget::Bytes(1),
                page_rows: 4,
                gpu_segment_bytes: Some(5 * row),
            },
            ..opts.clone()
        };
        super::check_on(name, &o);
    }
}

#[cfg(not(feature = "gpu"))]
mod gpu {
    pub fn check(_: &str) {}
}

/// Truncating a sequence and stepping again on the GPU with every layer streamed (slots hold stale rows)
/// gives the same logits as the first time, and as all-resident.
#[cfg(feature = "gpu")]
#[test]
fn gpu_ring_after_truncate_and_reset() {
    if !has_gpu("the ring test") {
        return;
    }
    for (label, base) in gpu_runs() {
        println!("on the GPU with {label}");
        gpu_ring_after_truncate_and_reset_with(&base);
    }
}

#[cfg(feature = "gpu")]
fn gpu_ring_after_truncate_and_reset_with(base: &LoadOptions) {
    use onestep::kv::GpuCacheBudget;
    let run = |budget: GpuCacheBudget| -> Vec<Vec<f32>> {
        let opts = LoadOptions {
            kv: KvOptions {
                gpu_budget: budget,
                page_rows: 2,
                gpu_segment_bytes: None,
            },
            ..base.clone()
        };
        let model =
            Model::load_with(fixtures().join("step_int4_6layers_f16kv.onnx"), &opts).unwrap();
        let g = StepSampling::GREEDY;
        let mut st = model.new_state().unwrap();
        let mut out = Vec::new();
        model.step(&mut st, &[5, 6, 7, 8, 9], &g).unwrap();
        out.push(model.step(&mut st, &[10], &g).unwrap().logits);
        out.push(model.step(&mut st, &[11, 12], &g).unwrap().logits);
        // Back to 3 tokens, then the same continuation as before from there.
        st.truncate(3);
        model.step(&mut st, &[8, 9], &g).unwrap();
        out.push(model.step(&mut st, &[10], &g).unwrap().logits);
        out.push(model.step(&mut st, &[11, 12], &g).unwrap().logits);
        st.reset();
        model.step(&mut st, &[5, 6, 7, 8, 9], &g).unwrap();
        out.push(model.step(&mut st, &[10], &g).unwrap().logits);
        out
    };
    let all = run(GpuCacheBudget::All);
    assert_eq!(all[0], all[2]);
    assert_eq!(all[1], all[3]);
    assert_eq!(all[0], all[4]);
    assert_eq!(run(GpuCacheBudget::Bytes(1)), all);
    assert_eq!(run(GpuCacheBudget::Percent(50)), all);
}

/// Runs the fixture's schedule under `opts`, checking every step against onnxruntime; returns the
/// logits of every step.
fn check_on(name: &str, opts: &LoadOptions) -> Vec<Vec<f32>> {
    #[cfg(feature = "gpu")]
    use onestep::gpu::{GpuOptions, Variant};
    let dir = fixtures();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let model = Model::load_with(dir.join(format!("{name}.onnx")), opts).unwrap();
    println!("{name}: device {}", model.device());
    let stats = model.plan_stats();
    assert_eq!(
        stats.cache_attention,
        model.info().num_layers,
        "{name}: attention must read the cache in place: {stats:?}"
    );
    assert!(
        stats.linear >= 14,
        "{name}: linear layers must be bound to their weights: {stats:?}"
    );
    // The token embedding is one step over its table, shared with the output layer when tied.
    let tied = name.contains("_tied");
    assert_eq!(
        (stats.embedding, stats.embedding_tied),
        (1, usize::from(tied)),
        "{name}: the embedding must be bound to its table: {stats:?}"
    );
    // The token choice's tail after its TopK is one step (proven against the nodes it replaces).
    assert_eq!(stats.token_choice, 1, "{name}: {stats:?}");
    println!("{name}: plan {stats:?}");
    #[cfg(feature = "gpu")]
    if let Some(g) = model.gpu_stats().filter(|_| opts.gpu.fusions.linear_groups) {
        // q/k/v and gate/up run as one dispatch each (the gate with its SiLU); on GPUs (not CPU
        // adapters) the attention and MLP norms and the output norm fold into the linears after them.
        let layers = model.info().num_layers;
        println!("{name}: gpu {g:?}");
        assert_eq!(
            g.linear_groups,
            2 * layers + usize::from(g.fused_norms > 0),
            "{name}: {g:?}"
        );
        let cpu_adapter = model.gpu_info().is_some_and(|i| i.device_type == "Cpu");
        let variant = opts.gpu.variant;
        let lanes = matches!(variant, Some(Variant::Lanes | Variant::Subgroups));
        if lanes || !cpu_adapter {
            assert_eq!(g.fused_norms, 2 * layers + 1, "{name}: {g:?}");
        }
        // Every linear kernel (q/k/v and gate/up groups, o, down, the output layer) on the subgroup
        // variant where asked for and available.
        let subgroups = model.gpu_info().is_some_and(|i| i.subgroups);
        if variant == Some(Variant::Subgroups) && subgroups {
            assert_eq!(g.subgroup_linears, 4 * layers + 1, "{name}: {g:?}");
        } else if variant == Some(Variant::Lanes) || cpu_adapter && variant.is_none() {
            assert_eq!(g.subgroup_linears, 0, "{name}: {g:?}");
        }
    }
    let mut state = model.new_state().unwrap();
    let mut worst = 0.0f32;
    let mut all = Vec::new();
    let mut context = 0;
    #[cfg(feature = "gpu")]
    let mut last_len = 0;
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
            next_random_u: None,
        };
        let out = model.step(&mut state, &ids, &sampling).unwrap();
        // One wait a step, whatever the token choice runs on, and one submission unless partial
        // submissions are asked for (`GpuOptions::submit_every`; `gpu_runs` has them); a step of the same
        // token count as the one before describes only what reads ids or positions (the attention, the
        // embedding, the token choice), the rest of its description is kept.
        #[cfg(feature = "gpu")]
        if let Some(g) = model.gpu_stats() {
            assert_eq!(g.waits, 1, "{name} step {i}: {g:?}");
            match opts.gpu.submit_every {
                // Partial submissions of `every` dispatches, none after the last GPU step.
                Some(every) if every > 0 => assert!(
                    g.submits > 1 && g.submits <= g.dispatches.div_ceil(every) + 1,
                    "{name} step {i}: {g:?}"
                ),
                _ if model.gpu_info().is_some_and(|i| i.device_type == "Cpu") => {
                    assert_eq!(g.submits, 1, "{name} step {i}: {g:?}")
                }
                _ => {}
            }
            println!(
                "{name} step {i}: {} tokens, {} steps described",
                ids.len(),
                g.described
            );
            if ids.len() == last_len {
                // (the rotaries read the positions too where the attention does not absorb them)
                let layers = model.info().num_layers;
                let per_layer = if opts.gpu.fusions.attention_inputs {
                    1
                } else {
                    3
                };
                assert!(
                    g.described <= per_layer * layers + 4,
                    "{name} step {i}: {g:?}"
                );
            }
        }
        #[cfg(feature = "gpu")]
        {
            last_len = ids.len();
        }
        let kv = model.kv_stats(&state);
        // Only the new rows come back; streamed layers upload exactly the used prefix they lack.
        let row = 2
            * 2
            * 16
            * model.info().num_layers as u64
            * if name.contains("f32kv") { 4 } else { 2 };
        if model.device() != "cpu" {
            assert_eq!(
                kv.step_bytes_down,
                row * ids.len() as u64,
                "{name} step {i}: {kv:?}"
            );
            if kv.layers_streamed > kv.slots {
                assert_eq!(
                    kv.step_bytes_up,
                    row / model.info().num_layers as u64 * (kv.layers_streamed * context) as u64,
                    "{name} step {i}: {kv:?}"
                );
            } else {
                assert_eq!(kv.step_bytes_up, 0, "{name} step {i}: {kv:?}");
            }
        }
        context += ids.len();
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
        all.push(out.logits);
    }
    println!(
        "{name}: all steps match onnxruntime; worst relative logits diff {worst:.2e}; kv {:?}",
        model.kv_stats(&state)
    );
    // Five dispatches a layer on GPUs (q/k/v with the norm; attention with its rotary; o + residual;
    // gate/up with the norm and SiLU; down + residual) and a few for the embedding and the token, in
    // the last step (a segmented cache adds a partial and a combine dispatch a layer). The embedding
    // runs on the GPU op by op: up to 7 dispatches (a Q8 table: 3 gathers, 2 casts, sub, mul).
    #[cfg(feature = "gpu")]
    if let (Some(g), Some(info)) = (model.gpu_stats(), model.gpu_info()) {
        let lanes = matches!(opts.gpu.variant, Some(Variant::Lanes | Variant::Subgroups));
        if (lanes || info.device_type != "Cpu") && opts.kv.gpu_segment_bytes.is_none() {
            let layers = model.info().num_layers;
            // Attention split over chunks of keys (forced by one of `gpu_runs`) adds a combine a layer.
            let split = opts.gpu.split_keys < GpuOptions::default().split_keys;
            let per_layer = if split { 6 } else { 5 };
            assert!(g.dispatches <= per_layer * layers + 6 + 7, "{name}: {g:?}");
        }
    }
    all
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

#[test]
fn int4_six_layers_through_the_kv_ring() {
    check("step_int4_6layers_f16kv");
}

/// The host cache grows a page at a time with the context and shrinks on truncate/reset.
#[test]
fn host_pages_follow_the_used_context() {
    let model = Model::load(fixtures().join("step_int4_6layers_f16kv.onnx")).unwrap();
    let opts = KvOptions {
        page_rows: 4,
        ..Default::default()
    };
    let mut state = model.new_state_with(&opts).unwrap();
    // 12 caches (6 layers × K, V) of 2 heads × 16 f16: 64 bytes a row, 256 a page.
    let page = 12 * 4 * 64;
    assert_eq!(model.kv_stats(&state).host_bytes, 0);
    model
        .step(&mut state, &[1, 2, 3], &StepSampling::GREEDY)
        .unwrap();
    assert_eq!(model.kv_stats(&state).host_bytes, page);
    model
        .step(&mut state, &[4, 5], &StepSampling::GREEDY)
        .unwrap();
    assert_eq!(model.kv_stats(&state).host_bytes, 2 * page);
    let after5 = model.step(&mut state, &[6], &StepSampling::GREEDY).unwrap();
    state.truncate(3);
    assert_eq!(model.kv_stats(&state).host_bytes, page);
    // Re-running the truncated rows gives the same result.
    model
        .step(&mut state, &[4, 5], &StepSampling::GREEDY)
        .unwrap();
    let again = model.step(&mut state, &[6], &StepSampling::GREEDY).unwrap();
    assert_eq!(again.logits, after5.logits);
    state.reset();
    assert_eq!(model.kv_stats(&state).host_bytes, 0);
    assert!(model
        .new_state_with(&KvOptions {
            page_rows: 0,
            ..Default::default()
        })
        .is_err());
}

/// Decode steps run ahead on the GPU (recorded and submitted before the step they follow is read back,
/// their token ids copied on the GPU from its token choice): tokens and logits as on the CPU, whether the
/// guess holds (the caller feeds the chosen token, same inputs; a top-5 choice too, its draw taken from
/// the call) or not (another token, other sampling settings: the step run ahead is dropped and the real
/// one runs). Every fixture's plan must allow it.
#[cfg(feature = "gpu")]
#[test]
fn gpu_decode_steps_run_ahead() {
    if !has_gpu("the run-ahead test") {
        return;
    }
    for (label, opts) in gpu_runs() {
        println!("on the GPU with {label}");
        gpu_decode_steps_run_ahead_with(&opts);
    }
    // Without run-ahead, no step runs ahead (same tokens).
    let mut off = gpu_runs().swap_remove(0).1;
    off.gpu.run_ahead = false;
    let path = fixtures().join("step_q8_tied_f16kv.onnx");
    let gpu = Model::load_with(&path, &off).unwrap();
    let cpu = Model::load_with(&path, &exact_cpu()).unwrap();
    let (mut sc, mut sg) = (cpu.new_state().unwrap(), gpu.new_state().unwrap());
    let mut tok = 5;
    for _ in 0..4 {
        let a = cpu.step(&mut sc, &[tok], &StepSampling::GREEDY).unwrap();
        let b = gpu.step(&mut sg, &[tok], &StepSampling::GREEDY).unwrap();
        assert_eq!(a.next_token, b.next_token);
        tok = a.next_token;
    }
    let g = gpu.gpu_stats().unwrap();
    assert_eq!((g.ahead, g.ahead_steps), (false, 0), "{g:?}");
}

#[cfg(feature = "gpu")]
fn gpu_decode_steps_run_ahead_with(opts: &LoadOptions) {
    let greedy = StepSampling::GREEDY;
    // A draw and the one the next step will use (as a session announces it).
    let sampled = |random_u: f32, next: f32| StepSampling {
        temperature: 0.8,
        top_k: 5,
        top_p: 1.0,
        random_u,
        next_random_u: Some(next),
    };
    for name in [
        "step_f32_untied_f32kv",
        "step_f16_tied_f16kv_bias",
        "step_int8_untied_f16kv",
        "step_int4_untied_f32kv_bias",
        "step_q8_tied_f16kv",
        "step_int4_6layers_f16kv",
    ] {
        let path = fixtures().join(format!("{name}.onnx"));
        let cpu = Model::load_with(&path, &exact_cpu()).unwrap();
        let gpu = Model::load_with(&path, opts).unwrap();
        let (mut sc, mut sg) = (cpu.new_state().unwrap(), gpu.new_state().unwrap());
        let vocab = cpu.info().vocab_size as u32;
        let mut step = |ids: &[u32], s: &StepSampling, what: &str| -> u32 {
            let a = cpu.step(&mut sc, ids, s).unwrap();
            let b = gpu.step(&mut sg, ids, s).unwrap();
            let scale = a.logits.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let d = a
                .logits
                .iter()
                .zip(&b.logits)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= 2e-4 * scale, "{name} {what}: logits differ by {d}");
            assert_eq!(a.next_token, b.next_token, "{name} {what}: tokens differ");
            a.next_token
        };
        // Greedy with a new draw each step, as a session makes them, each announcing the next: the
        // whole choice runs on the GPU, so a step run ahead draws with the announced number.
        let greedy_u = |random_u: f32, next: f32| StepSampling {
            random_u,
            next_random_u: Some(next),
            ..StepSampling::GREEDY
        };
        let mut tok = step(&[5, 6, 7, 8, 9], &greedy, "prefill");
        // The chosen token fed back: the steps after the first run ahead and hold.
        for i in 0..3 {
            let u = 0.3 * i as f32;
            tok = step(&[tok], &greedy_u(u, u + 0.3), &format!("greedy {i}"));
        }
        let g = gpu.gpu_stats().unwrap();
        assert!(g.ahead, "{name}: {g:?}");
        // Another token than the one chosen: the step run ahead is dropped.
        tok = step(&[(tok + 1) % vocab], &greedy_u(0.9, 0.7), "another token");
        assert!(!gpu.gpu_stats().unwrap().ahead);
        tok = step(&[tok], &greedy_u(0.7, 0.01), "greedy again");
        assert!(gpu.gpu_stats().unwrap().ahead);
        // Other sampling settings than the step run ahead assumed: dropped too.
        tok = step(&[tok], &sampled(0.01, 0.99), "sampled");
        // Same settings and the announced draw: the step run ahead holds; its token is the one the
        // GPU chose with that draw (a late choice among the 5, not the first).
        tok = step(&[tok], &sampled(0.99, 0.3), "sampled, the announced draw");
        let g = gpu.gpu_stats().unwrap();
        assert!(g.ahead, "{name}: {g:?}");
        // Another draw than the announced one: dropped.
        tok = step(&[tok], &sampled(0.6, 0.5), "sampled, another draw");
        assert!(!gpu.gpu_stats().unwrap().ahead);
        let g = gpu.gpu_stats().unwrap();
        // Held: greedy 1, 2, "greedy again" and "the announced draw"; dropped: "another token",
        // "sampled", "another draw".
        assert_eq!((g.ahead_steps, g.ahead_missed), (4, 3), "{name}: {g:?}");
        // Greedy after sampling: dropped. A truncation drops the step run ahead of this one (not
        // counted); the sequence goes on from there as on the CPU.
        step(&[tok], &greedy, "greedy before a truncation");
        let len = sc.len() - 2;
        sc.truncate(len);
        sg.truncate(len);
        let mut step = |ids: &[u32]| {
            let a = cpu.step(&mut sc, ids, &greedy).unwrap();
            let b = gpu.step(&mut sg, ids, &greedy).unwrap();
            assert_eq!(a.next_token, b.next_token, "{name} after truncation");
            a.next_token
        };
        let t = step(&[3]);
        step(&[t]);
        let g = gpu.gpu_stats().unwrap();
        assert_eq!((g.ahead_steps, g.ahead_missed), (5, 4), "{name}: {g:?}");
    }
}

/// Two sequences of one GPU model stepped in turn, each with a step run ahead: what one submits between
/// another's steps (the shared activation buffers, its own token choice) does not leak into the other's
/// fed token ids. Tokens and logits as on the CPU.
#[cfg(feature = "gpu")]
#[test]
fn gpu_interleaved_sequences_run_ahead() {
    if !has_gpu("the interleaved test") {
        return;
    }
    for (label, opts) in gpu_runs() {
        println!("on the GPU with {label}");
        gpu_interleaved_sequences_run_ahead_with(&opts);
    }
}

#[cfg(feature = "gpu")]
fn gpu_interleaved_sequences_run_ahead_with(opts: &LoadOptions) {
    let path = fixtures().join("step_q8_tied_f16kv.onnx");
    let cpu = Model::load_with(&path, &exact_cpu()).unwrap();
    let gpu = Model::load_with(&path, opts).unwrap();
    let g = StepSampling::GREEDY;
    let mut seqs: Vec<_> = [[1u32, 2, 3], [40, 41, 42]]
        .iter()
        .map(|p| {
            let (mut c, mut s) = (cpu.new_state().unwrap(), gpu.new_state().unwrap());
            let t = cpu.step(&mut c, p, &g).unwrap().next_token;
            assert_eq!(gpu.step(&mut s, p, &g).unwrap().next_token, t);
            (c, s, t)
        })
        .collect();
    for i in 0..6 {
        for (k, (c, s, t)) in seqs.iter_mut().enumerate() {
            let a = cpu.step(c, &[*t], &g).unwrap();
            let b = gpu.step(s, &[*t], &g).unwrap();
            let d = a
                .logits
                .iter()
                .zip(&b.logits)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= 2e-4, "sequence {k} step {i}: logits differ by {d}");
            assert_eq!(a.next_token, b.next_token, "sequence {k} step {i}");
            *t = a.next_token;
        }
    }
    let st = gpu.gpu_stats().unwrap();
    assert_eq!((st.ahead_steps, st.ahead_missed), (10, 0), "{st:?}");
}

/// The whole token choice on the GPU: for greedy, top-k, and top-p over the whole vocabulary (the
/// `TopK` sorts the row there), a step that does not want the logits reads back the token id and its
/// cache rows, nothing else; the tokens equal the CPU's for many draws.
#[cfg(feature = "gpu")]
#[test]
fn gpu_token_choice_reads_back_only_the_token() {
    if !has_gpu("the token-choice test") {
        return;
    }
    for (label, opts) in gpu_runs() {
        println!("on the GPU with {label}");
        gpu_token_choice_reads_back_only_the_token_with(&opts);
    }
}

#[cfg(feature = "gpu")]
fn gpu_token_choice_reads_back_only_the_token_with(opts: &LoadOptions) {
    let path = fixtures().join("step_int4_untied_f32kv_bias.onnx");
    let cpu = Model::load_with(&path, &exact_cpu()).unwrap();
    let gpu = Model::load_with(&path, opts).unwrap();
    let vocab = cpu.info().vocab_size;
    assert!(
        vocab > 64,
        "the fixture's vocabulary ({vocab}) must take the sort"
    );
    let (mut sc, mut sg) = (cpu.new_state().unwrap(), gpu.new_state().unwrap());
    let prompt = [3u32, 14, 15, 72, 65];
    let a = cpu.step(&mut sc, &prompt, &StepSampling::GREEDY).unwrap();
    let b = gpu.step(&mut sg, &prompt, &StepSampling::GREEDY).unwrap();
    assert_eq!(a.next_token, b.next_token);
    let mut tok = a.next_token;
    let mut sampled = 0;
    // The cache has 24 slots.
    for i in 0..18 {
        let (temperature, top_k, top_p) = match i % 4 {
            0 => (0.0, 0, 1.0),
            1 => (0.9, 5, 1.0),
            2 => (1.2, 0, 0.8),
            _ => (2.0, 0, 1.0),
        };
        let u = ((i * 37 + 11) % 100) as f32 / 100.0;
        let s = StepSampling {
            temperature,
            top_k,
            top_p,
            random_u: u,
            next_random_u: None,
        };
        let a = cpu.step(&mut sc, &[tok], &s).unwrap();
        let b = gpu.step_with(&mut sg, &[tok], &s, false).unwrap();
        assert!(b.logits.is_empty());
        let g = gpu.gpu_stats().unwrap();
        let kv = gpu.kv_stats(&sg);
        assert_eq!(
            g.bytes_down,
            8 + kv.step_bytes_down,
            "step {i} ({temperature}, {top_k}, {top_p}): {g:?}"
        );
        assert_eq!(
            a.next_token, b.next_token,
            "step {i} ({temperature}, {top_k}, {top_p}, u {u})"
        );
        let argmax =
            (0..a.logits.len()).fold(0, |b, j| if a.logits[j] > a.logits[b] { j } else { b });
        sampled += usize::from(temperature > 0.0 && a.next_token as usize != argmax);
        tok = a.next_token;
    }
    // The draws chose other tokens than the arg-max (the choice is not greedy in disguise).
    assert!(
        sampled >= 3,
        "only {sampled} sampled steps left the arg-max"
    );
}
