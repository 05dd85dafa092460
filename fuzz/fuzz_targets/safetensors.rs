//! Hugging Face folder reader: the input is written as the folder's only `model.safetensors`, next to
//! the tiny llama's config and tokenizer files, and the whole folder is read.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use onestep_export::{quant, source::hf};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/llama_f16");
        let dir = std::env::temp_dir().join(format!("onestep-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let Ok(model) = hf::read(dir) else {
        return;
    };
    for (name, t) in &model.tensors {
        let _ = quant::dequantize_source(name, t);
    }
});
