//! One loaded model (weights once in memory) shared by sessions on several threads: every thread gets
//! exactly the tokens and logits a single thread gets.

use std::path::PathBuf;
use std::sync::Arc;

use onestep::{Model, StepSampling};

fn run(model: &Model, seed: u32) -> Vec<(u32, Vec<f32>)> {
    let mut state = model.new_state().unwrap();
    let vocab = model.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..6).map(|i| (seed * 7 + i * 13) % vocab).collect();
    let mut out = vec![];
    let mut step = model
        .step(&mut state, &prompt, &StepSampling::GREEDY)
        .unwrap();
    while state.len() < model.info().max_cache {
        out.push((step.next_token, step.logits.clone()));
        step = model
            .step(&mut state, &[step.next_token], &StepSampling::GREEDY)
            .unwrap();
    }
    out
}

#[test]
fn four_threads_share_one_model() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step_q8_tied_f16kv.onnx");
    let model: Arc<Model> = Model::load(path).unwrap();
    let alone: Vec<_> = (0..4).map(|s| run(&model, s)).collect();
    let handles: Vec<_> = (0..4)
        .map(|s| {
            let m = model.clone();
            std::thread::spawn(move || run(&m, s))
        })
        .collect();
    for (s, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            alone[s],
            "thread {s} differs from the single-thread run"
        );
    }
    assert!(
        alone[0] != alone[1],
        "different prompts should give different runs"
    );
}
