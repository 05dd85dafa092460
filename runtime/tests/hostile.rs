//! Every `*.onnx` of the hostile corpus (tests/fixtures/hostile, made by scripts/refs/make_hostile.py)
//! is refused with the typed error its MANIFEST.json names: no panic, no abort, no huge allocation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use onestep::{Error, Limits, LoadOptions, Model};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hostile")
}

fn manifest() -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(dir().join("MANIFEST.json")).expect("MANIFEST.json");
    serde_json::from_str(&text).expect("MANIFEST.json parses")
}

/// The variant name of an error (`Decode`, `Limit`, ...), from its `Debug` form.
fn class(e: &Error) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect()
}

#[test]
fn every_hostile_onnx_file_is_a_typed_error() {
    let manifest = manifest();
    let mut failures = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "onnx") {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let expected = manifest
            .get(&name)
            .and_then(|m| m["error"].as_str())
            .unwrap_or_else(|| panic!("{name} is not in MANIFEST.json"))
            .to_string();
        let p = path.clone();
        match std::panic::catch_unwind(move || Model::load(&p).map(|_| ())) {
            Err(_) => failures.push(format!("{name}: PANICKED")),
            Ok(Ok(())) => failures.push(format!("{name}: loaded, expected {expected}")),
            Ok(Err(e)) if class(&e) != expected => {
                failures.push(format!("{name}: {} ({e}), expected {expected}", class(&e)))
            }
            Ok(Err(_)) => {}
        }
    }
    let listed = manifest.keys().filter(|k| k.ends_with(".onnx")).count();
    assert_eq!(seen, listed, "files on disk vs. MANIFEST.json entries");
    assert!(seen >= 20, "only {seen} hostile ONNX files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn hostile_bytes_in_memory_are_typed_errors_too() {
    // The same corpus through load_from_bytes (the Android-asset path), which has no file-size check of
    // its own: the limits apply to the buffer.
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "onnx") {
            continue;
        }
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        assert!(Model::load_from_bytes(bytes, &path.display().to_string()).is_err());
    }
}

fn valid_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/step_q8_tied_f16kv.onnx")
}

#[test]
fn limits_are_configurable_and_name_what_they_bound() {
    let ok = Model::load_with(valid_model(), &LoadOptions::default()).expect("defaults admit it");
    let cache_bytes: u64 = {
        let i = ok.info();
        (2 * i.num_layers * i.num_kv_heads * i.max_cache * i.head_dim * i.kv_dtype.size()) as u64
    };
    let cases: Vec<(Limits, &str)> = vec![
        (
            Limits {
                max_file_bytes: 1000,
                ..Limits::default()
            },
            "file size",
        ),
        (
            Limits {
                max_tensors: 3,
                ..Limits::default()
            },
            "initializer count",
        ),
        (
            Limits {
                max_nodes: 10,
                ..Limits::default()
            },
            "node count",
        ),
        (
            Limits {
                max_metadata_bytes: 20,
                ..Limits::default()
            },
            "metadata",
        ),
        (
            Limits {
                max_tensor_elements: 100,
                ..Limits::default()
            },
            "element count",
        ),
        (
            Limits {
                max_cache_bytes: cache_bytes - 1,
                ..Limits::default()
            },
            "KV cache bytes",
        ),
    ];
    for (limits, what) in cases {
        let opts = LoadOptions {
            limits,
            ..LoadOptions::cpu()
        };
        match Model::load_with(valid_model(), &opts) {
            Err(Error::Limit {
                what: w,
                value,
                max,
            }) => {
                assert!(w.contains(what), "`{w}` should mention {what}");
                assert!(value > max);
            }
            other => panic!("{what}: expected a limit error, got {other:?}"),
        }
        let bytes = bytes::Bytes::from(std::fs::read(valid_model()).unwrap());
        assert!(matches!(
            Model::load_from_bytes_with(bytes, "mem", &opts),
            Err(Error::Limit { .. })
        ));
    }
    let exact = LoadOptions {
        limits: Limits {
            max_cache_bytes: cache_bytes,
            ..Limits::default()
        },
        ..LoadOptions::cpu()
    };
    Model::load_with(valid_model(), &exact).expect("a cache exactly at the limit loads");
}
