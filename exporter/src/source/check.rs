//! Shape checks shared by the readers: every tensor the architecture needs is present and has the shape
//! the config implies.

use std::collections::BTreeMap;

use super::{canonical, ModelConfig, SourceError, SourceTensor};

/// Checks the presence and shape of every tensor the decoder needs, and that no q/k norms or Gemma
/// post-norms come with an architecture that would not apply them.
pub(crate) fn check_tensors(
    path: &str,
    c: &ModelConfig,
    tensors: &BTreeMap<String, SourceTensor>,
) -> Result<(), SourceError> {
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let h = c.hidden_size;
    let f = c.intermediate_size;
    let want = |name: &str, expected: Vec<usize>| -> Result<(), SourceError> {
        let t = tensors
            .get(name)
            .ok_or_else(|| SourceError::MissingTensor {
                path: path.into(),
                tensor: name.into(),
            })?;
        if t.shape != expected {
            return Err(SourceError::Shape {
                path: path.into(),
                tensor: name.into(),
                actual: t.shape.clone(),
                expected,
            });
        }
        Ok(())
    };
    want(canonical::TOKEN_EMBD, vec![c.vocab_size, h])?;
    want(canonical::OUTPUT_NORM, vec![h])?;
    if !c.tie_word_embeddings {
        want(canonical::OUTPUT, vec![c.vocab_size, h])?;
    }
    for i in 0..c.num_layers {
        let b = |s: &str| canonical::blk(i, s);
        want(&b("attn_norm.weight"), vec![h])?;
        want(&b("attn_q.weight"), vec![q, h])?;
        want(&b("attn_k.weight"), vec![kv, h])?;
        want(&b("attn_v.weight"), vec![kv, h])?;
        want(&b("attn_output.weight"), vec![h, q])?;
        if c.attention_bias {
            want(&b("attn_q.bias"), vec![q])?;
            want(&b("attn_k.bias"), vec![kv])?;
            want(&b("attn_v.bias"), vec![kv])?;
        }
        for norm in ["attn_q_norm.weight", "attn_k_norm.weight"] {
            if c.qk_norm {
                want(&b(norm), vec![c.head_dim])?;
            } else if tensors.contains_key(&b(norm)) {
                return Err(SourceError::Unsupported {
                    path: path.into(),
                    what: format!(
                        "tensor `{}` (q/k norms) in a `{}` model",
                        b(norm),
                        c.architecture
                    ),
                });
            }
        }
        for norm in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
            if c.architecture.starts_with("gemma") {
                want(&b(norm), vec![h])?;
            } else if tensors.contains_key(&b(norm)) {
                return Err(SourceError::Unsupported {
                    path: path.into(),
                    what: format!(
                        "tensor `{}` (a norm after attention or the MLP) in a `{}` model",
                        b(norm),
                        c.architecture
                    ),
                });
            }
        }
        want(&b("ffn_norm.weight"), vec![h])?;
        want(&b("ffn_gate.weight"), vec![f, h])?;
        want(&b("ffn_up.weight"), vec![f, h])?;
        want(&b("ffn_down.weight"), vec![h, f])?;
    }
    // Layers beyond the configured count mean the config and the weights disagree.
    let extra = canonical::blk(c.num_layers, "");
    if let Some(name) = tensors.keys().find(|k| k.starts_with(&extra)) {
        return Err(SourceError::Format {
            path: path.into(),
            detail: format!(
                "tensor `{name}` belongs to a layer beyond the configured {} layers",
                c.num_layers
            ),
        });
    }
    Ok(())
}
