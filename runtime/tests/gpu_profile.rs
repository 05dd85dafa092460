//! [`LoadOptions::profile`] on the GPU: per-kernel GPU time from timestamps written around every
//! dispatch (where the adapter has timestamp queries inside passes), else from each dispatch submitted
//! alone.

#![cfg(feature = "gpu")]

use std::path::PathBuf;

use onestep::gpu::{BackendFilter, DeviceRequest};
use onestep::testing::GpuContext;
use onestep::{LoadOptions, Model, StepSampling};

#[test]
fn profile_counts_every_dispatch_of_the_steps() {
    if let Err(e) = GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
        assert!(
            std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
            "ONESTEP_REQUIRE_GPU is set but there is no adapter: {e}"
        );
        eprintln!("note: no wgpu adapter ({e}); profile test not run");
        return;
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join("step_int4_untied_f32kv_bias.onnx");
    let opts = LoadOptions {
        device: DeviceRequest::Gpu(None),
        backend: BackendFilter::Any,
        profile: true,
        ..LoadOptions::default()
    };
    let model = Model::load_with(&path, &opts).unwrap();
    let info = model.gpu_info().unwrap();
    let mut state = model.new_state().unwrap();
    let greedy = StepSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        random_u: 0.0,
        next_random_u: None,
    };
    let mut dispatches = 0;
    for ids in [&[1u32, 2, 3][..], &[4], &[5]] {
        model.step(&mut state, ids, &greedy).unwrap();
        dispatches += model.gpu_stats().unwrap().dispatches as u64;
    }
    let profile = model.profile();
    println!("timestamps {}: {profile:?}", info.timestamps);
    let kernels: u64 = profile
        .iter()
        .filter(|p| !p.0.starts_with('(') && !p.0.starts_with('['))
        .map(|p| p.1)
        .sum();
    assert_eq!(
        kernels, dispatches,
        "every dispatch timed once: {profile:?}"
    );
    assert!(
        profile.iter().all(|p| p.2 >= 0.0 && p.2.is_finite()),
        "{profile:?}"
    );
    assert!(profile.iter().any(|p| p.2 > 0.0), "{profile:?}");
    if info.timestamps {
        let span = profile.iter().find(|p| p.0.starts_with("(span")).unwrap();
        assert!(
            span.1 >= 3,
            "a span a submission, one at least a step: {profile:?}"
        );
        let busy: f64 = profile
            .iter()
            .filter(|p| !p.0.starts_with('('))
            .map(|p| p.2)
            .sum();
        assert!(span.2 >= busy * 0.5, "span {} < kernels {busy}", span.2);
    }
}
