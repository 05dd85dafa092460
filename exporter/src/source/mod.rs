//! Model sources: a GGUF file or a Hugging Face folder, read into one [`SourceModel`].
//!
//! Tensors stay in their source encoding (GGUF block types included) and their bytes stay in the
//! memory-mapped file until the ONNX writer needs them.

use std::collections::BTreeMap;

use bytes::Bytes;

mod check;
pub mod ct2;
pub mod gguf;
pub mod hf;
pub mod tokenizer;
pub mod whisper;
pub mod whisper_hf;

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic non-zero pseudo-random bytes (xorshift), for test tensors.
    pub fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 | 1
            })
            .collect()
    }
}

/// How a source tensor's bytes are encoded (the block types keep ggml's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum SourceDType {
    /// f32.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// GGUF Q8_0: blocks of 32 — f16 d, 32 × i8.
    Q8_0,
    /// GGUF Q4_0: blocks of 32 — f16 d, 16 bytes (element j low nibble of byte j, j+16 high), value (q−8)·d.
    Q4_0,
    /// GGUF Q4_1: blocks of 32 — f16 d, f16 m, 16 bytes (same nibble order as Q4_0), value q·d + m.
    Q4_1,
    /// GGUF Q5_0: blocks of 32 — f16 d, 32 high bits, 16 bytes of low nibbles; value (q−16)·d.
    Q5_0,
    /// GGUF Q5_1: blocks of 32 — f16 d, f16 m, 32 high bits, 16 bytes of low nibbles; value q·d + m.
    Q5_1,
    /// GGUF Q4_K: super-blocks of 256 — f16 d and dmin, eight 6-bit scales and mins, 4-bit codes;
    /// value (d·sc)·q − dmin·m per sub-block of 32.
    Q4_K,
    /// GGUF Q5_K: as Q4_K with a fifth bit per code (32 bytes of high bits).
    Q5_K,
    /// GGUF Q6_K: super-blocks of 256 — 6-bit codes, sixteen i8 scales, f16 d; value (d·sc)·(q−32)
    /// per sub-block of 16.
    Q6_K,
}

impl SourceDType {
    /// Elements per stored block (1 for the float types).
    pub fn block_elems(self) -> usize {
        match self {
            SourceDType::F32 | SourceDType::F16 | SourceDType::BF16 => 1,
            SourceDType::Q8_0
            | SourceDType::Q4_0
            | SourceDType::Q4_1
            | SourceDType::Q5_0
            | SourceDType::Q5_1 => 32,
            SourceDType::Q4_K | SourceDType::Q5_K | SourceDType::Q6_K => 256,
        }
    }

    /// Bytes per stored block.
    pub fn block_bytes(self) -> usize {
        match self {
            SourceDType::F32 => 4,
            SourceDType::F16 | SourceDType::BF16 => 2,
            SourceDType::Q8_0 => 34,
            SourceDType::Q4_0 => 18,
            SourceDType::Q4_1 => 20,
            SourceDType::Q5_0 => 22,
            SourceDType::Q5_1 => 24,
            SourceDType::Q4_K => 144,
            SourceDType::Q5_K => 176,
            SourceDType::Q6_K => 210,
        }
    }
}

/// One tensor of the source, in its stored encoding.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    /// Encoding.
    pub dtype: SourceDType,
    /// Shape in row-major order, outermost first (`[out, in]` for linear weights — the HF/PyTorch order;
    /// GGUF's reversed `ne` order is already flipped by the reader).
    pub shape: Vec<usize>,
    /// The stored bytes (a slice of the mapped file).
    pub data: Bytes,
}

impl SourceTensor {
    /// A fused matrix (`name` in messages) split into row slices of the same bytes, one per
    /// `(part, rows)` in order; `Err` says why not (rows that do not add up, a block type).
    pub fn split_rows(&self, name: &str, parts: &[(&str, usize)]) -> Result<Vec<Self>, String> {
        let total: usize = parts.iter().map(|r| r.1).sum();
        if self.shape.len() != 2 || self.shape[0] != total || self.dtype.block_elems() != 1 {
            return Err(format!(
                "tensor `{name}` {:?} {:?}: expected {total} rows of a float type to split into {}",
                self.dtype,
                self.shape,
                parts.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
            ));
        }
        let row_bytes = self.data.len() / total;
        let mut at = 0;
        Ok(parts
            .iter()
            .map(|&(_, n)| {
                let part = SourceTensor {
                    dtype: self.dtype,
                    shape: vec![n, self.shape[1]],
                    data: self.data.slice(at * row_bytes..(at + n) * row_bytes),
                };
                at += n;
                part
            })
            .collect())
    }
}

/// Architecture hyper-parameters, named as in HF `config.json`: the llama decoder's, and the features
/// families add to it (each off by default; which family sets which is said in its `arch/` file).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family's name (`crate::arch::Arch::name`), written in the exported file's metadata.
    pub architecture: String,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head dimension (usually hidden / heads).
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling (`rope_scaling` of config.json), if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Training context length.
    pub max_position_embeddings: usize,
    /// Whether the output layer reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases.
    pub attention_bias: bool,
    /// Rotary layout of the q/k weights: `true` = adjacent pairs (GGUF's permuted rows), `false` =
    /// rotate_half (HF).
    pub rope_interleaved: bool,
    /// Whether each head's q and k are RMS-normalized (weights `[head_dim]`) before the rotation.
    pub qk_norm: bool,
    /// Layers whose attention applies no rotary embedding ("NoPE" layers), ascending.
    pub no_rope_layers: Vec<usize>,
    /// Layers attend only keys less than this many positions behind the query: every layer but
    /// [`ModelConfig::global_layers`].
    pub sliding_window: Option<usize>,
    /// Layers that attend the whole context although `sliding_window` is set (empty: every layer
    /// attends the window).
    pub global_layers: Vec<usize>,
    /// RoPE base of the sliding-window layers, where their rotation differs from the global layers'
    /// (they then take no scaling; the global layers use `rope_theta` and `rope_scaling`).
    pub local_rope_theta: Option<f32>,
    /// Added to every RMSNorm weight: 1 for norms that scale by `1 + w` read from a checkpoint that
    /// stores `w` (GGUF converters store `1 + w`: 0).
    pub norm_offset: f32,
    /// Attention scores' scale where it is not `head_dim^-0.5` (`query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f32>,
    /// Soft cap on attention scores (`c·tanh(s/c)`).
    pub attn_softcap: Option<f32>,
    /// Soft cap on the logits.
    pub final_softcap: Option<f32>,
}

impl Default for ModelConfig {
    /// Every size 0, RoPE base 10,000, and every feature off: what a reader starts from.
    fn default() -> Self {
        ModelConfig {
            architecture: String::new(),
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            vocab_size: 0,
            rms_eps: 0.0,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 0,
            tie_word_embeddings: false,
            attention_bias: false,
            rope_interleaved: false,
            qk_norm: false,
            no_rope_layers: Vec::new(),
            sliding_window: None,
            global_layers: Vec::new(),
            local_rope_theta: None,
            norm_offset: 0.0,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
        }
    }
}

/// RoPE scaling variants.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3 frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// Original context length.
        original_max_position_embeddings: usize,
    },
    /// Linear position interpolation.
    Linear {
        /// Scale factor.
        factor: f32,
    },
    /// LongRoPE (Phi-3/3.5/4): per-frequency divisors, one set for contexts up to the pretrained length
    /// and one beyond it, and a factor on cos/sin.
    LongRope {
        /// Divisors (`head_dim / 2`) used while the context fits the pretrained length.
        short_factor: Vec<f32>,
        /// Divisors used beyond it.
        long_factor: Vec<f32>,
        /// The pretrained context length.
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin (`sqrt(1 + ln(max / original) / ln(original))` unless the config says).
        attention_factor: f32,
    },
}

/// Tokenizer and chat data.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerData {
    /// A complete Hugging Face `tokenizer.json`.
    pub tokenizer_json: String,
    /// Chat template (Jinja), if the source has one.
    pub chat_template: Option<String>,
    /// BOS id.
    pub bos_id: Option<u32>,
    /// Whether to prepend BOS to prompts.
    pub add_bos: bool,
    /// EOS id.
    pub eos_id: u32,
    /// All ids that end generation (EOS, EOT, …).
    pub stop_ids: Vec<u32>,
}

/// Everything read from a source.
#[derive(Debug, Clone)]
pub struct SourceModel {
    /// Where it came from (for messages and metadata).
    pub origin: String,
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Tensors by canonical name (see [`canonical`]).
    pub tensors: BTreeMap<String, SourceTensor>,
    /// Tokenizer and chat template.
    pub tokenizer: TokenizerData,
    /// Generation defaults from the source (generation_config.json), if any.
    pub generation: Option<onestep_format::GenerationDefaults>,
}

/// Canonical tensor names every reader maps its own names to (llama.cpp's GGUF names):
/// `token_embd.weight`, `output_norm.weight`, `output.weight` (absent when tied), and per layer `blk.{i}.`
/// followed by `attn_norm.weight`, `attn_q.weight`, `attn_k.weight`, `attn_v.weight`, `attn_output.weight`,
/// `attn_q.bias`, `attn_k.bias`, `attn_v.bias` (with `attention_bias`), `attn_q_norm.weight`,
/// `attn_k_norm.weight` (with `qk_norm`), `ffn_norm.weight`, `ffn_gate.weight`, `ffn_up.weight`,
/// `ffn_down.weight`, and the norms a family adds (`crate::arch::Arch::extra_layer_norms`).
pub mod canonical {
    /// Token embedding table `[vocab, hidden]`.
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    /// Final norm `[hidden]`.
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    /// Output layer `[vocab, hidden]`.
    pub const OUTPUT: &str = "output.weight";
    /// Per-layer tensor name.
    pub fn blk(i: usize, suffix: &str) -> String {
        format!("blk.{i}.{suffix}")
    }
}

/// Errors while reading a source; each names the file and the tensor or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// OS-level failure.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is malformed (truncated, bad magic, bad offsets...).
    #[error("{path}: {detail}")]
    Format {
        /// File.
        path: String,
        /// What is wrong, with offset/tensor where known.
        detail: String,
    },
    /// A required tensor is absent.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor {
        /// File or folder.
        path: String,
        /// Tensor name (source naming).
        tensor: String,
    },
    /// A required metadata/config key is absent or malformed.
    #[error("{path}: key `{key}`: {detail}")]
    Key {
        /// File.
        path: String,
        /// Key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The source uses something we do not support (architecture, tensor type...).
    #[error("{path}: unsupported {what}")]
    Unsupported {
        /// File.
        path: String,
        /// What (e.g. "architecture `gpt2`", "tensor type Q5_K in `blk.0.attn_q.weight`").
        what: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, config implies {expected:?}")]
    Shape {
        /// File.
        path: String,
        /// Tensor.
        tensor: String,
        /// Found.
        actual: Vec<usize>,
        /// Expected.
        expected: Vec<usize>,
    },
}

/// Reads a GGUF file or a Hugging Face folder, chosen by what `path` is.
pub fn open(path: &std::path::Path) -> Result<SourceModel, SourceError> {
    if path.is_dir() {
        hf::read(path)
    } else {
        gguf::read(path)
    }
}
