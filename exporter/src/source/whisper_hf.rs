//! A Hugging Face Whisper folder (`WhisperForConditionalGeneration`: `config.json`, safetensors,
//! `tokenizer.json`, `generation_config.json`) read into the canonical tensors of
//! [`super::whisper`], the same ones the CTranslate2 reader gives: the graph builder cannot tell them
//! apart.
//!
//! The decoding rules come from `generation_config.json` (older folders keep them in `config.json`):
//! `suppress_tokens` (plus the prompt's own special tokens, as faster-whisper's `suppress_tokens=[-1]`
//! adds them), `begin_suppress_tokens`, and `is_multilingual` (else Whisper's rule: a vocabulary of
//! 51865 ids or more). The output layer is the token embedding: a `proj_out.weight` other than it is
//! refused.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::hf::{read_json, read_json_opt, read_safetensors, show};
use super::whisper::{decoding_rules, special_tokens, WhisperConfig, WhisperSource};
use super::{SourceError, SourceTensor};

/// Whether `dir` holds a Hugging Face Whisper checkpoint (`config.json` with `model_type` whisper).
pub fn is_hf_whisper(dir: &Path) -> bool {
    let p = dir.join("config.json");
    p.is_file()
        && read_json(&p)
            .is_ok_and(|v| v.get("model_type").and_then(Value::as_str) == Some("whisper"))
}

/// Reads a Hugging Face Whisper folder.
pub fn read_hf(dir: &Path) -> Result<WhisperSource, SourceError> {
    let cfg_path = dir.join("config.json");
    let cfg = read_json(&cfg_path)?;
    let gen = read_json_opt(&dir.join("generation_config.json"))?;
    let config = whisper_config(&cfg_path, &cfg)?;
    let mut all = read_safetensors(dir)?;
    let mut tensors = BTreeMap::new();
    let mut take = |hf: &str, canonical: String| -> Result<(), SourceError> {
        let (_, t) = all.remove(hf).ok_or_else(|| SourceError::MissingTensor {
            path: show(dir),
            tensor: hf.to_string(),
        })?;
        tensors.insert(canonical, t);
        Ok(())
    };
    let pair = |take: &mut dyn FnMut(&str, String) -> Result<(), SourceError>,
                hf: &str,
                c: &str|
     -> Result<(), SourceError> {
        take(&format!("{hf}.weight"), format!("{c}.weight"))?;
        take(&format!("{hf}.bias"), format!("{c}.bias"))
    };
    let (e, d) = ("model.encoder", "model.decoder");
    pair(&mut take, &format!("{e}.conv1"), "enc.conv1")?;
    pair(&mut take, &format!("{e}.conv2"), "enc.conv2")?;
    take(&format!("{e}.embed_positions.weight"), "enc.pos".into())?;
    pair(&mut take, &format!("{e}.layer_norm"), "enc.norm")?;
    take(&format!("{d}.embed_positions.weight"), "dec.pos".into())?;
    take(
        &format!("{d}.embed_tokens.weight"),
        "dec.embed.weight".into(),
    )?;
    pair(&mut take, &format!("{d}.layer_norm"), "dec.norm")?;
    let attention = |take: &mut dyn FnMut(&str, String) -> Result<(), SourceError>,
                     hf: &str,
                     c: &str|
     -> Result<(), SourceError> {
        for (p, q) in [
            ("q_proj", "q"),
            ("k_proj", "k"),
            ("v_proj", "v"),
            ("out_proj", "o"),
        ] {
            take(&format!("{hf}.{p}.weight"), format!("{c}.{q}.weight"))?;
            if p != "k_proj" {
                take(&format!("{hf}.{p}.bias"), format!("{c}.{q}.bias"))?;
            }
        }
        Ok(())
    };
    for (layers, hf, c) in [
        (config.encoder_layers, e, "enc"),
        (config.decoder_layers, d, "dec"),
    ] {
        for i in 0..layers {
            let (h, c) = (format!("{hf}.layers.{i}"), format!("{c}.l{i}"));
            attention(&mut take, &format!("{h}.self_attn"), &format!("{c}.attn"))?;
            pair(
                &mut take,
                &format!("{h}.self_attn_layer_norm"),
                &format!("{c}.attn_norm"),
            )?;
            if hf == d {
                attention(
                    &mut take,
                    &format!("{h}.encoder_attn"),
                    &format!("{c}.cross"),
                )?;
                pair(
                    &mut take,
                    &format!("{h}.encoder_attn_layer_norm"),
                    &format!("{c}.cross_norm"),
                )?;
            }
            pair(&mut take, &format!("{h}.fc1"), &format!("{c}.fc1"))?;
            pair(&mut take, &format!("{h}.fc2"), &format!("{c}.fc2"))?;
            pair(
                &mut take,
                &format!("{h}.final_layer_norm"),
                &format!("{c}.ffn_norm"),
            )?;
        }
    }
    if let Some((file, p)) = all.remove("proj_out.weight") {
        if p.data != tensors["dec.embed.weight"].data {
            return Err(SourceError::Unsupported {
                path: show(&file),
                what: "an output layer (`proj_out.weight`) other than the token embedding".into(),
            });
        }
    }
    if let Some((name, (file, _))) = all.iter().next() {
        return Err(SourceError::Unsupported {
            path: show(file),
            what: format!("tensor `{name}` (not part of WhisperForConditionalGeneration)"),
        });
    }
    check_shapes(dir, &config, &tensors)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json =
        std::fs::read_to_string(&tokenizer_path).map_err(|source| SourceError::Io {
            path: show(&tokenizer_path),
            source,
        })?;
    let (tokens, languages, sot_lm) = special_tokens(&tokenizer_json, &show(&tokenizer_path))?;
    let rules = gen.as_ref().unwrap_or(&cfg);
    let ids = |key: &str| -> Result<Option<Vec<u32>>, SourceError> {
        let present = |c: &Value| c.get(key).filter(|v| !v.is_null()).cloned();
        let Some(v) = present(rules).or_else(|| present(&cfg)) else {
            return Ok(None);
        };
        let bad = || SourceError::Key {
            path: show(&cfg_path),
            key: key.into(),
            detail: "not a list of token ids".into(),
        };
        let list = v.as_array().ok_or_else(bad)?;
        list.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
    };
    let (suppress, suppress_begin) = decoding_rules(
        &tokens,
        sot_lm,
        ids("suppress_tokens")?,
        ids("begin_suppress_tokens")?,
    );
    if let Some(&bad) = suppress
        .iter()
        .chain(&suppress_begin)
        .find(|&&t| t as usize >= config.vocab_size)
    {
        return Err(SourceError::Key {
            path: show(&cfg_path),
            key: "suppress_tokens".into(),
            detail: format!(
                "token {bad} is outside the vocabulary of {}",
                config.vocab_size
            ),
        });
    }
    let multilingual = rules
        .get("is_multilingual")
        .and_then(Value::as_bool)
        .unwrap_or(config.vocab_size >= 51865);
    Ok(WhisperSource {
        origin: show(dir),
        config,
        tensors,
        tokens,
        languages,
        multilingual,
        suppress,
        suppress_begin,
        tokenizer_json,
    })
}

/// The hyper-parameters `config.json` gives; Whisper's exact GELU and unscaled embeddings only.
fn whisper_config(path: &Path, c: &Value) -> Result<WhisperConfig, SourceError> {
    let n = |key: &str| -> Result<usize, SourceError> {
        c.get(key)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .filter(|&x| x > 0)
            .ok_or_else(|| SourceError::Key {
                path: show(path),
                key: key.into(),
                detail: "missing or not a positive integer".into(),
            })
    };
    let act = c
        .get("activation_function")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    if act != "gelu" {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: format!("activation_function `{act}` (Whisper's is gelu)"),
        });
    }
    if c.get("scale_embedding").and_then(Value::as_bool) == Some(true) {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: "scale_embedding true (Whisper's embeddings are not scaled)".into(),
        });
    }
    let ffn = n("encoder_ffn_dim")?;
    if n("decoder_ffn_dim")? != ffn {
        return Err(SourceError::Unsupported {
            path: show(path),
            what: "encoder_ffn_dim and decoder_ffn_dim that differ".into(),
        });
    }
    let d_model = n("d_model")?;
    let config = WhisperConfig {
        mel_bins: n("num_mel_bins")?,
        d_model,
        encoder_layers: n("encoder_layers")?,
        encoder_heads: n("encoder_attention_heads")?,
        decoder_layers: n("decoder_layers")?,
        decoder_heads: n("decoder_attention_heads")?,
        ffn,
        vocab_size: n("vocab_size")?,
        audio_ctx: n("max_source_positions")?,
        text_ctx: n("max_target_positions")?,
    };
    for (key, h) in [
        ("encoder_attention_heads", config.encoder_heads),
        ("decoder_attention_heads", config.decoder_heads),
    ] {
        if d_model % h != 0 {
            return Err(SourceError::Key {
                path: show(path),
                key: key.into(),
                detail: format!("{h} does not divide d_model {d_model}"),
            });
        }
    }
    Ok(config)
}

/// Every tensor has the shape `config` says (a checkpoint whose config and weights disagree is named,
/// not traced into a graph that fails later).
fn check_shapes(
    dir: &Path,
    c: &WhisperConfig,
    t: &BTreeMap<String, SourceTensor>,
) -> Result<(), SourceError> {
    let d = c.d_model;
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("enc.conv1.weight".into(), vec![d, c.mel_bins, 3]),
        ("enc.conv2.weight".into(), vec![d, d, 3]),
        ("enc.pos".into(), vec![c.audio_ctx, d]),
        ("dec.pos".into(), vec![c.text_ctx, d]),
        ("dec.embed.weight".into(), vec![c.vocab_size, d]),
    ];
    for (layers, p) in [(c.encoder_layers, "enc"), (c.decoder_layers, "dec")] {
        for i in 0..layers {
            let attn: &[&str] = if p == "dec" {
                &["attn", "cross"]
            } else {
                &["attn"]
            };
            for a in attn {
                for q in ["q", "k", "v", "o"] {
                    want.push((format!("{p}.l{i}.{a}.{q}.weight"), vec![d, d]));
                }
            }
            want.push((format!("{p}.l{i}.fc1.weight"), vec![c.ffn, d]));
            want.push((format!("{p}.l{i}.fc2.weight"), vec![d, c.ffn]));
        }
    }
    for (name, shape) in want {
        let have = &t[&name].shape;
        if *have != shape {
            return Err(SourceError::Shape {
                path: show(dir),
                tensor: name,
                actual: have.clone(),
                expected: shape,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the tiny fixture folder with `config.json` edited by `edit` (and files left out).
    fn variant(tag: &str, edit: impl Fn(&mut Value), leave_out: &[&str]) -> std::path::PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/whisper");
        let dir =
            std::env::temp_dir().join(format!("onestep-whisper-hf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
        ] {
            if !leave_out.contains(&f) {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        let mut c: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        edit(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_config_the_weights_disagree_with_names_the_tensor() {
        let dir = variant(
            "ffn",
            |c| {
                c["encoder_ffn_dim"] = 96.into();
                c["decoder_ffn_dim"] = 96.into();
            },
            &[],
        );
        let e = read_hf(&dir).unwrap_err().to_string();
        assert!(e.contains("enc.l0.fc1.weight"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_the_graph_does_not_compute_is_refused() {
        for (tag, key, value, want) in [
            (
                "act",
                "activation_function",
                Value::from("relu"),
                "activation_function",
            ),
            (
                "scale",
                "scale_embedding",
                Value::from(true),
                "scale_embedding",
            ),
            (
                "heads",
                "encoder_attention_heads",
                Value::from(5),
                "does not divide",
            ),
            ("mels", "num_mel_bins", Value::from(0), "num_mel_bins"),
        ] {
            let dir = variant(tag, |c| c[key] = value.clone(), &[]);
            let e = read_hf(&dir).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn without_generation_config_the_vocabulary_rule_decides() {
        let dir = variant("nogen", |_| {}, &["generation_config.json"]);
        let s = read_hf(&dir).unwrap();
        assert!(
            !s.multilingual,
            "1812 ids < 51865: English-only by Whisper's rule"
        );
        assert!(s.suppress.contains(&93), "config.json's suppress_tokens");
        let _ = std::fs::remove_dir_all(&dir);
        // Neither file has the lists: the prompt's specials only, and the end of text first.
        let dir = variant(
            "nolists",
            |c| {
                c["suppress_tokens"] = Value::Null;
                c.as_object_mut().unwrap().remove("begin_suppress_tokens");
            },
            &["generation_config.json"],
        );
        let s = read_hf(&dir).unwrap();
        assert_eq!(s.suppress, vec![301, 305, 306, 307, 308]);
        assert_eq!(s.suppress_begin, vec![s.tokens.eot]);
        let _ = std::fs::remove_dir_all(&dir);
        // A list naming ids past the vocabulary (the real model's, in a tiny one) is an error.
        let dir = variant(
            "badlist",
            |c| c["begin_suppress_tokens"] = serde_json::json!([220, 50256]),
            &["generation_config.json"],
        );
        let e = read_hf(&dir).unwrap_err().to_string();
        assert!(e.contains("50256"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let dir = variant("notok", |_| {}, &["tokenizer.json"]);
        let e = read_hf(&dir).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
