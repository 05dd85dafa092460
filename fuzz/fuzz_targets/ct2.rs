//! CTranslate2 model.bin reader: parse any bytes; when the tables parse, touch every variable (and every
//! alias) the way the exporter would: look it up, widen it to f32, read scalars and strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onestep_export::source::ct2::Ct2Model;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Ct2Model::from_bytes(bytes::Bytes::copy_from_slice(data), "fuzz/model.bin")
    else {
        return;
    };
    for name in model.variables.keys().chain(model.aliases.keys()) {
        let var = model.get(name).expect("a parsed name resolves");
        assert_eq!(var.data.len(), var.numel() * var.dtype.size());
        assert_eq!(var.to_f32().len(), var.numel());
        let _ = (
            var.scalar_i64(),
            var.scalar_f32(),
            var.as_str(),
            var.source_tensor(),
        );
    }
});
