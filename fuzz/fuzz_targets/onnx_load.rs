//! ONNX loader: decode + check + plan any bytes; when a model loads, build a session (tokenizer and
//! chat template from the metadata) and run two steps on it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onestep::generate::Session;
use onestep::{Model, StepSampling};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::load_from_bytes(bytes::Bytes::copy_from_slice(data), "fuzz.onnx") else {
        return;
    };
    let _ = Session::new(model.clone());
    let Ok(mut state) = model.new_state() else {
        return;
    };
    let vocab = model.info().vocab_size.max(1) as u32;
    let ids: Vec<u32> = (0..model.info().max_chunk.clamp(1, 3) as u32)
        .map(|i| (i * 7 + 1) % vocab)
        .collect();
    let _ = model.step(&mut state, &ids, &StepSampling::GREEDY);
    let _ = model.step(&mut state, &ids[..1], &StepSampling::GREEDY);
});
