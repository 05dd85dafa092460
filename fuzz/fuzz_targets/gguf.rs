//! GGUF reader: parse any bytes; when the table parses, interpret it as a model (config, tokenizer,
//! tensor checks) and dequantize every tensor the exporter would read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onestep_export::{quant, source::gguf};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = gguf::parse("fuzz.gguf", bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    let Ok(model) = gguf::into_model(&file) else {
        return;
    };
    for (name, t) in &model.tensors {
        let _ = quant::dequantize_source(name, t);
    }
});
