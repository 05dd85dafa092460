//! Every tensor of a real K-quant GGUF — Gemma 3 270M Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K and f32 tensors) —
//! kept losslessly: each matrix's stored form dequantizes to llama.cpp's values (`quant::ggml`, checked
//! bit for bit against gguf-py in its unit tests), exactly for every form but the 4-bit one with an f32
//! zero point (Q4_K), which stays within its one rounding. Prints the stored size against the GGUF's.
//!
//! The GGUF comes from env `ONESTEP_GEMMA3_GGUF`, else where `scripts/fetch-gemma3` puts it
//! (`$ONESTEP_CACHE` or `<repo>/cache`, then `gemma3/gemma-3-270m-q4_k_m.gguf`); a missing file fails the
//! test unless `ONESTEP_SKIP_MODEL_TESTS=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onestep_export::quant::{self, ggml, Form, Quantize};
use onestep_export::source::{gguf, SourceDType};

fn gguf_path() -> Option<PathBuf> {
    let path = std::env::var_os("ONESTEP_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ONESTEP_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../cache"))
                .join("gemma3/gemma-3-270m-q4_k_m.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "Gemma 3 GGUF not found at {} (run scripts/fetch-gemma3, or set ONESTEP_GEMMA3_GGUF; \
         ONESTEP_SKIP_MODEL_TESTS=1 skips)",
        path.display()
    );
    if std::env::var("ONESTEP_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
        eprintln!("{msg}: skipped");
        return None;
    }
    panic!("{msg}");
}

#[test]
fn every_gemma3_tensor_is_kept_losslessly() {
    let Some(path) = gguf_path() else { return };
    let file = gguf::open(&path).unwrap();
    let tensors = gguf::tensors(&file).unwrap();
    // per source type: (tensors, GGUF bytes, stored bytes)
    let mut sizes: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (name, t) in &tensors {
        let src = quant::dequantize_source(name, t).unwrap();
        let e = sizes.entry(format!("{:?}", t.dtype)).or_default();
        e.0 += 1;
        e.1 += t.data.len();
        if t.shape.len() != 2 {
            e.2 += 4 * src.len(); // vectors are stored f32
            continue;
        }
        let m = quant::encode_matrix(name, t, Quantize::Keep).unwrap();
        e.2 += m.stored_bytes();
        let got = quant::dequantize(&m);
        assert_eq!(got.len(), src.len(), "{name}");
        if !matches!(m.form, Form::Block4 { .. }) || t.dtype == SourceDType::Q4_0 {
            let bad = got
                .iter()
                .zip(&src)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(
                bad.is_none(),
                "{name} ({:?}) element {bad:?} differs",
                t.dtype
            );
            continue;
        }
        // 4-bit with an f32 zero point: within 2^-22·(|s·q| + |m|) of ggml's s·q − m
        let mut bounds = Vec::with_capacity(src.len());
        for blk in t.data.chunks_exact(t.dtype.block_bytes()) {
            ggml::for_each_sub_block(t.dtype, blk, |sb| {
                let m = match sb.offset {
                    ggml::Offset::Zero(_) => 0.0,
                    ggml::Offset::Min(m) => m.abs(),
                };
                bounds.extend((0..sb.len).map(|i| (sb.scale * f32::from(sb.q[i])).abs() + m));
            });
        }
        for (i, ((a, b), bound)) in got.iter().zip(&src).zip(&bounds).enumerate() {
            assert!(
                (a - b).abs() <= bound * 2f32.powi(-22),
                "{name} element {i}: {a} vs llama.cpp's {b}"
            );
        }
    }
    eprintln!("type  tensors  GGUF MB  stored MB  ratio");
    let (mut g, mut s) = (0, 0);
    for (ty, (n, gb, sb)) in &sizes {
        eprintln!(
            "{ty:5} {n:8} {:8.2} {:10.2} {:6.2}",
            *gb as f64 / 1e6,
            *sb as f64 / 1e6,
            *sb as f64 / *gb as f64
        );
        g += gb;
        s += sb;
    }
    eprintln!(
        "all         {:8.2} {:10.2} {:6.2}",
        g as f64 / 1e6,
        s as f64 / 1e6,
        s as f64 / g as f64
    );
    assert!(sizes.contains_key("Q4_K") && sizes.contains_key("Q6_K") && sizes.contains_key("Q5_0"));
}
