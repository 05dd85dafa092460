//! A failing export leaves nothing behind (no output, no `.tmp`), never damages an existing output it
//! could not replace, and refuses to write over its input.

use std::path::{Path, PathBuf};

use onestep_export::source::{self, SourceModel};
use onestep_export::{export, ExportOptions, NoProgress};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("onestep-atomic-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> ExportOptions {
    ExportOptions {
        max_cache: 16,
        max_chunk: 4,
        ..ExportOptions::default()
    }
}

fn tiny() -> SourceModel {
    source::open(&root().join("tests/fixtures/tiny/llama_f16")).expect("tiny llama reads")
}

/// Every entry of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn output_that_cannot_be_replaced_leaves_no_temp_file() {
    let d = scratch("isdir");
    // The output path is an existing (non-empty) directory: the final rename fails after the whole
    // file was written and synced.
    let out = d.join("model.onnx");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let e = export(&tiny(), &out, &opts(), &mut NoProgress);
    assert!(e.is_err(), "exporting onto a directory must fail");
    assert_eq!(
        listing(&d),
        vec!["model.onnx".to_string()],
        "no temp file left"
    );
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"x");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn output_in_a_missing_directory_creates_nothing() {
    let d = scratch("missing");
    let out = d.join("no/such/dir/model.onnx");
    assert!(export(&tiny(), &out, &opts(), &mut NoProgress).is_err());
    assert!(listing(&d).is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_successful_export_replaces_the_old_file_atomically() {
    let d = scratch("ok");
    let out = d.join("model.onnx");
    std::fs::write(&out, b"old").unwrap();
    let s = export(&tiny(), &out, &opts(), &mut NoProgress).expect("export");
    assert_eq!(listing(&d), vec!["model.onnx".to_string()]);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), s.file_bytes);
    onestep::Model::load(&out).expect("the export loads");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_source_that_fails_leaves_the_old_output_untouched() {
    let d = scratch("badsrc");
    let out = d.join("model.onnx");
    std::fs::write(&out, b"old").unwrap();
    // A hostile GGUF fails while reading, before anything is written.
    let bad = root().join("tests/fixtures/hostile/gguf_data_past_end.gguf");
    assert!(source::open(&bad).is_err());
    // A source whose options are invalid fails inside export, before the write.
    let bad_opts = ExportOptions {
        max_cache: 0,
        ..opts()
    };
    assert!(export(&tiny(), &out, &bad_opts, &mut NoProgress).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(listing(&d), vec!["model.onnx".to_string()]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn refuses_to_overwrite_its_input() {
    let d = scratch("same");
    let input = d.join("tiny.gguf");
    // A real GGUF (the micro model's) exported onto itself, directly and through a symlink.
    let status = std::process::Command::new("python3")
        .arg(root().join("scripts/refs/make_tiny_gguf.py"))
        .arg(&input)
        .args(["--micro", "--type", "q8_0"])
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "scripts/refs/make_tiny_gguf.py failed: it needs python3 with numpy, safetensors and gguf \
         (scripts/setup installs them)"
    );
    let before = std::fs::read(&input).unwrap();
    let src = source::open(&input).expect("micro GGUF reads");
    let e = export(&src, &input, &opts(), &mut NoProgress).unwrap_err();
    assert!(e.to_string().contains("input"), "{e}");
    #[cfg(unix)]
    {
        let link = d.join("link.onnx");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        assert!(export(&src, &link, &opts(), &mut NoProgress).is_err());
    }
    assert_eq!(
        std::fs::read(&input).unwrap(),
        before,
        "the input is untouched"
    );
    let _ = std::fs::remove_dir_all(&d);
}
