//! `--device auto` decides by measuring (issue 20): on lavapipe, allowed into the trial, the CPU wins;
//! the decision is read back on the next load of the same model (under any path), and another model
//! decides again. Runs where wgpu finds an adapter (CI: lavapipe, `ONESTEP_REQUIRE_GPU=1`).
#![cfg(feature = "gpu")]

use std::path::{Path, PathBuf};

use onestep::gpu::{BackendFilter, DeviceRequest, GpuOptions};
use onestep::testing::GpuContext;
use onestep::{LoadOptions, Model};

mod common;
use common::has_gpu;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn auto(cache: Option<&Path>, trial_software: bool) -> LoadOptions {
    LoadOptions {
        device: DeviceRequest::Auto,
        gpu: GpuOptions {
            pipeline_cache: cache.map(Path::to_path_buf),
            trial_software,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The decision files in `dir`.
fn decisions(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("auto-device-"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn note(m: &Model) -> String {
    m.device_note().expect("auto says how it chose").to_string()
}

#[test]
fn auto_measures_once_remembers_and_decides_again_for_another_model() {
    if !has_gpu("auto's trial") {
        return;
    }
    let software = GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any)
        .unwrap()
        .info()
        .device_type
        == "Cpu";
    let dir = std::env::temp_dir().join(format!("onestep-auto-device-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = fixture("step_q8_tied_f16kv.onnx");

    // Untried: a software adapter is left for the CPU without a trial, and nothing is written.
    if software {
        let m = Model::load_with(&a, &auto(Some(&dir), false)).unwrap();
        assert_eq!(m.device(), "cpu");
        assert!(note(&m).contains("software adapter"), "{}", note(&m));
        assert!(decisions(&dir).is_empty());
    }

    // First load: both measured, the faster kept (on lavapipe the CPU), the decision written.
    let m = Model::load_with(&a, &auto(Some(&dir), true)).unwrap();
    let first = note(&m);
    assert!(
        first.contains("measured now") && first.contains("remembered in"),
        "{first}"
    );
    assert!(
        first.contains("ms on the GPU") && first.contains("ms on the CPU"),
        "{first}"
    );
    let on_cpu = m.device() == "cpu";
    assert_eq!(on_cpu, first.contains("auto chose the CPU"), "{first}");
    if software {
        assert!(on_cpu, "lavapipe outran the CPU backend: {first}");
    }
    drop(m);
    let files = decisions(&dir);
    assert_eq!(files.len(), 1, "{files:?}");

    // Second load, from another path with the same bytes: read back, not measured.
    let copy = dir.join("copy.onnx");
    std::fs::copy(&a, &copy).unwrap();
    let m = Model::load_with(&copy, &auto(Some(&dir), true)).unwrap();
    let second = note(&m);
    assert!(second.contains("remembered: "), "{second}");
    assert_eq!(m.device() == "cpu", on_cpu);
    drop(m);

    // The file is what decides: turned around, it puts the model on the other device.
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let (from, to) = if on_cpu {
        ("device cpu", "device gpu")
    } else {
        ("device gpu", "device cpu")
    };
    std::fs::write(&files[0], text.replace(from, to)).unwrap();
    let m = Model::load_with(&a, &auto(Some(&dir), true)).unwrap();
    assert_eq!(m.device() == "cpu", !on_cpu, "{}", note(&m));
    drop(m);

    // Another model file decides again, in a file of its own.
    let b = fixture("step_f16_tied_f16kv_bias.onnx");
    let m = Model::load_with(&b, &auto(Some(&dir), true)).unwrap();
    assert!(note(&m).contains("measured now"), "{}", note(&m));
    assert_eq!(decisions(&dir).len(), 2);

    // Without a folder every load measures, and says it keeps nothing.
    let m = Model::load_with(&a, &auto(None, true)).unwrap();
    assert!(note(&m).contains("not remembered"), "{}", note(&m));

    // A forced device says nothing about auto.
    let m = Model::load_with(&a, &LoadOptions::cpu()).unwrap();
    assert!(m.device_note().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CPU that `auto` chooses runs the plan made for the CPU, not the one bounded by the GPU's kernels
/// (on a software adapter the rows variant folds no norm or SiLU gate into the linear groups; the
/// CPU folds both): untried, and after a trial the CPU won.
#[test]
fn a_cpu_chosen_by_auto_runs_the_cpus_plan() {
    if !has_gpu("auto's plan") {
        return;
    }
    let a = fixture("step_q8_tied_f16kv.onnx");
    let folded = |m: &Model| {
        let s = m.plan_stats();
        (s.linear_groups, s.group_norms, s.group_gates)
    };
    let cpu = folded(&Model::load_with(&a, &LoadOptions::cpu()).unwrap());
    let gpu_opts = LoadOptions {
        device: DeviceRequest::Gpu(None),
        ..Default::default()
    };
    let gpu = Model::load_with(&a, &gpu_opts).unwrap();
    if gpu.gpu_info().is_some_and(|g| g.device_type == "Cpu") {
        // The test means something only where the two plans differ.
        assert_ne!(
            folded(&gpu),
            cpu,
            "the rows variant's plan equals the CPU's"
        );
    }
    for trial in [false, true] {
        let m = Model::load_with(&a, &auto(None, trial)).unwrap();
        if m.device() == "cpu" {
            assert_eq!(folded(&m), cpu, "auto (trial {trial}): {}", note(&m));
        }
    }
}
