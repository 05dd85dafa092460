//! Bad files and bad arguments give typed errors — never a panic — and a session keeps working after.

use std::path::PathBuf;

use bytes::Bytes;
use onestep::onnx::proto::ModelProto;
use onestep::{Error, Model, StepSampling};
use prost::Message;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn good_bytes() -> Vec<u8> {
    std::fs::read(fixture("step_q8_tied_f16kv.onnx")).unwrap()
}

fn load(bytes: Vec<u8>) -> onestep::Result<std::sync::Arc<Model>> {
    Model::load_from_bytes(Bytes::from(bytes), "test.onnx")
}

fn edit(f: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let mut m = ModelProto::decode(Bytes::from(good_bytes())).unwrap();
    f(&mut m);
    m.encode_to_vec()
}

#[test]
fn truncated_files_are_errors() {
    let bytes = good_bytes();
    let mut count = 0;
    for cut in (0..bytes.len())
        .step_by(997)
        .chain([1, 2, 7, bytes.len() - 1])
    {
        let r = load(bytes[..cut].to_vec());
        assert!(r.is_err(), "file cut at {cut} of {} loaded", bytes.len());
        count += 1;
    }
    println!("{count} truncated files rejected");
}

#[test]
fn flipped_bytes_never_panic() {
    let bytes = good_bytes();
    let mut errors = 0;
    for (k, at) in (0..bytes.len()).step_by(331).enumerate() {
        let mut b = bytes.clone();
        b[at] ^= 1 << (k % 8);
        // A flip inside weight bytes still loads (weights are data); anything structural must be Err.
        match std::panic::catch_unwind(|| {
            load(b).map(|m| {
                let mut s = m.new_state().unwrap();
                let _ = m.step(&mut s, &[1, 2, 3], &StepSampling::GREEDY);
            })
        }) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("flipping a bit at byte {at} panicked"),
        }
    }
    println!("{errors} structural corruptions rejected");
    assert!(errors > 0);
}

#[test]
fn wrong_opset_is_named() {
    let bytes = edit(|m| {
        for o in &mut m.opset_import {
            if o.domain.as_deref().unwrap_or("").is_empty() {
                o.version = Some(99);
            }
        }
    });
    match load(bytes) {
        Err(Error::Opset { version: 99, .. }) => {}
        other => panic!("expected an opset error, got {other:?}"),
    }
}

#[test]
fn unknown_ops_are_all_listed() {
    let bytes = edit(|m| {
        let g = m.graph.as_mut().unwrap();
        g.node[3].op_type = Some("FancyOp".into());
        g.node[7].op_type = Some("OtherOp".into());
    });
    match load(bytes) {
        Err(Error::UnsupportedOps(ops)) => {
            let all = ops.join(" ");
            assert!(all.contains("FancyOp") && all.contains("OtherOp"), "{all}");
        }
        other => panic!("expected unsupported ops, got {other:?}"),
    }
}

#[test]
fn missing_metadata_and_wrong_version_are_named() {
    let bytes = edit(|m| {
        m.metadata_props
            .retain(|p| p.key.as_deref() != Some("onestep.max_cache"))
    });
    let e = load(bytes).unwrap_err().to_string();
    assert!(e.contains("onestep.max_cache"), "{e}");
    let bytes = edit(|m| {
        for p in &mut m.metadata_props {
            if p.key.as_deref() == Some("onestep.format_version") {
                p.value = Some("7".into());
            }
        }
    });
    let e = load(bytes).unwrap_err().to_string();
    assert!(e.contains("format version 7"), "{e}");
}

#[test]
fn bad_tensor_size_is_named() {
    let bytes = edit(|m| {
        let g = m.graph.as_mut().unwrap();
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name.as_deref() == Some("rope.cos"))
            .unwrap();
        t.dims[0] += 1;
    });
    let e = load(bytes).unwrap_err().to_string();
    assert!(e.contains("rope.cos"), "{e}");
}

#[test]
fn bad_arguments_leave_the_state_usable() {
    let model = Model::load(fixture("step_q8_tied_f16kv.onnx")).unwrap();
    let max_cache = model.info().max_cache;
    let vocab = model.info().vocab_size as u32;
    let mut s = model.new_state().unwrap();
    assert!(matches!(
        model.step(&mut s, &[], &StepSampling::GREEDY),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        model.step(&mut s, &[vocab], &StepSampling::GREEDY),
        Err(Error::InvalidArgument(_))
    ));
    let chunk = vec![1u32; model.info().max_chunk + 1];
    assert!(model.step(&mut s, &chunk, &StepSampling::GREEDY).is_err());
    assert_eq!(s.len(), 0);
    let a = model
        .step(&mut s, &[5, 6, 7], &StepSampling::GREEDY)
        .unwrap();
    // Fill the cache, then one more token must be refused with the numbers.
    while s.len() < max_cache {
        model.step(&mut s, &[3], &StepSampling::GREEDY).unwrap();
    }
    let e = model.step(&mut s, &[3], &StepSampling::GREEDY).unwrap_err();
    assert!(e.to_string().contains("exceed the cache"), "{e}");
    s.reset();
    let b = model
        .step(&mut s, &[5, 6, 7], &StepSampling::GREEDY)
        .unwrap();
    assert_eq!(a, b, "a reset state reproduces the first step exactly");
}

#[test]
fn state_from_another_model_is_refused() {
    let a = Model::load(fixture("step_q8_tied_f16kv.onnx")).unwrap();
    let b = Model::load(fixture("step_f32_untied_f32kv.onnx")).unwrap();
    let mut sb = b.new_state().unwrap();
    // Same number of caches but other dtypes/shapes: the step must not read it as its own.
    let r = a.step(&mut sb, &[1], &StepSampling::GREEDY);
    assert!(r.is_err(), "a state of another model was accepted");
}
