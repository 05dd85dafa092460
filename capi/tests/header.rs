//! The committed C header is exactly what cbindgen generates from the source (CI fails when stale).
//! Regenerate with `ONESTEP_BLESS=1 cargo test -p onestep-capi --test header`.

use std::path::Path;

#[test]
fn committed_header_is_fresh() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("capi/cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen failed on capi/src/lib.rs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = dir.join("include/onestep.h");
    if std::env::var_os("ONESTEP_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/onestep.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "capi/include/onestep.h is stale: regenerate with \
         `ONESTEP_BLESS=1 cargo test -p onestep-capi --test header`"
    );
}
