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

/// Sessions (tokenizer, sampling, stop handling) on 4 threads sharing one model: each thread's seeded,
/// sampled generation is exactly what the same session produces alone. Full version (SmolLM2, longer
/// runs): `ONESTEP_SOAK_FULL=1 ONESTEP_SOAK_MODEL=/tmp/smollm2.onnx`.
#[test]
fn four_threads_with_sessions_match_one_thread() {
    use onestep::generate::Session;
    use std::ops::ControlFlow;

    let full = std::env::var_os("ONESTEP_SOAK_FULL").is_some_and(|v| v != "0");
    let path = std::env::var_os("ONESTEP_SOAK_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/micro/micro_llama_q8.onnx")
        });
    let model: Arc<Model> = Model::load(&path).unwrap();
    let rounds = if full { 8 } else { 4 };
    let run = move |m: Arc<Model>, seed: u64| -> Vec<Vec<u32>> {
        let mut s = Session::new(m).unwrap();
        let mut opts = s.default_options();
        opts.temperature = 0.8;
        opts.top_p = 0.95;
        opts.ignore_stop_tokens = true;
        opts.max_new_tokens = if full { 200 } else { 64 };
        (0..rounds)
            .map(|r| {
                opts.seed = Some(seed * 100 + r);
                let prompt = format!("t{seed} r{r}");
                let c = s
                    .generate(&prompt, &opts, |_| ControlFlow::Continue(()))
                    .unwrap();
                s.reset();
                c.token_ids
            })
            .collect()
    };
    let t0 = std::time::Instant::now();
    let alone: Vec<_> = (0..4).map(|s| run(model.clone(), s)).collect();
    let t_alone = t0.elapsed();
    let t1 = std::time::Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|s| {
            let m = model.clone();
            std::thread::spawn(move || run(m, s))
        })
        .collect();
    let together: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    println!(
        "threads: 4 x {rounds} generations; one thread {:.2}s, 4 threads {:.2}s",
        t_alone.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    for (s, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "thread {s} differs from the single-thread run");
        assert!(a.iter().all(|ids| !ids.is_empty()));
    }
    assert_ne!(
        alone[0], alone[1],
        "different seeds should give different runs"
    );
}

/// Sessions share their model's tokenizer: built once (a large vocabulary costs tens of MB and a
/// fraction of a second each time), the same one on every thread.
#[test]
fn sessions_share_the_models_tokenizer() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/micro/micro_llama_q8.onnx");
    let model: Arc<Model> = Model::load(&path).unwrap();
    let first = model.tokenizer().unwrap();
    let others: Vec<_> = (0..3)
        .map(|_| {
            let m = model.clone();
            std::thread::spawn(move || m.tokenizer().unwrap())
        })
        .collect();
    for t in others {
        assert!(
            Arc::ptr_eq(&first, &t.join().unwrap()),
            "a second tokenizer was built"
        );
    }
    assert_eq!(
        first.encode("hello world").unwrap(),
        onestep::generate::tokenizer::Tokenizer::from_json(model.tokenizer_json(), model.info())
            .unwrap()
            .encode("hello world")
            .unwrap(),
        "the shared tokenizer is the file's"
    );
}
