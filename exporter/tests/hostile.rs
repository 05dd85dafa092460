//! Every `*.gguf`, `*.safetensors` and `*.bin` (a CTranslate2 `model.bin`) of the hostile corpus
//! (tests/fixtures/hostile, made by scripts/refs/make_hostile.py) is refused with the typed error its
//! MANIFEST.json names: no panic, no abort, no allocation sized by an unchecked count. A `*.safetensors`
//! file is read as the only weights of a folder holding the config and tokenizer of
//! tests/fixtures/tiny/llama_f16.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onestep_export::source::{ct2, gguf, hf, SourceError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest() -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/hostile/MANIFEST.json"))
        .expect("MANIFEST.json");
    serde_json::from_str(&text).expect("MANIFEST.json parses")
}

fn class(e: &SourceError) -> String {
    format!("{e:?}")
        .chars()
        .take_while(|c| c.is_alphanumeric())
        .collect()
}

/// Runs `read` on every file with extension `ext`; returns the number of files seen.
fn check_all(ext: &str, read: impl Fn(&Path) -> Result<(), SourceError>) -> usize {
    let manifest = manifest();
    let mut failures = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("tests/fixtures/hostile")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != ext) {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let expected = manifest
            .get(&name)
            .and_then(|m| m["error"].as_str())
            .unwrap_or_else(|| panic!("{name} is not in MANIFEST.json"))
            .to_string();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&path))) {
            Err(_) => failures.push(format!("{name}: PANICKED")),
            Ok(Ok(())) => failures.push(format!("{name}: read fine, expected {expected}")),
            Ok(Err(e)) if class(&e) != expected => {
                failures.push(format!("{name}: {} ({e}), expected {expected}", class(&e)))
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
            }
        }
    }
    let listed = manifest
        .keys()
        .filter(|k| k.ends_with(&format!(".{ext}")))
        .count();
    assert_eq!(
        seen, listed,
        "{ext}: files on disk vs. MANIFEST.json entries"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    seen
}

#[test]
fn every_hostile_gguf_file_is_a_typed_error() {
    let n = check_all("gguf", |p| gguf::read(p).map(|_| ()));
    assert!(n >= 20, "only {n} hostile GGUF files");
}

#[test]
fn every_hostile_safetensors_file_is_a_typed_error() {
    let src = root().join("tests/fixtures/tiny/llama_f16");
    let dir = std::env::temp_dir().join(format!("onestep-hostile-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // The folder reads fine with the real weights: every failure below is the hostile file's.
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    hf::read(&dir).expect("the tiny llama folder reads");
    let n = check_all("safetensors", |p| {
        std::fs::copy(p, dir.join("model.safetensors")).unwrap();
        hf::read(&dir).map(|_| ())
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(n >= 10, "only {n} hostile safetensors files");
}

#[test]
fn every_hostile_ct2_file_is_a_typed_error() {
    let n = check_all("bin", |p| ct2::Ct2Model::open(p).map(|_| ()));
    assert!(n >= 4, "only {n} hostile CTranslate2 files");
}
