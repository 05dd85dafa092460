//! Shape checks shared by the readers: every tensor the architecture needs is present and has the shape
//! the config implies.

use std::collections::BTreeMap;

use super::{canonical, ModelConfig, SourceError, SourceTensor};
use crate::arch::{family, Arch};

/// The source's tensors by canonical name, and the path errors name.
struct Tensors<'a> {
    path: &'a str,
    map: &'a BTreeMap<String, SourceTensor>,
}

impl Tensors<'_> {
    /// `name` must be present with shape `expected`.
    fn want(&self, name: &str, expected: Vec<usize>) -> Result<(), SourceError> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| SourceError::MissingTensor {
                path: self.path.into(),
                tensor: name.into(),
            })?;
        if t.shape != expected {
            return Err(SourceError::Shape {
                path: self.path.into(),
                tensor: name.into(),
                actual: t.shape.clone(),
                expected,
            });
        }
        Ok(())
    }

    /// `name` (`what` it is) must be absent from a model of `c`'s family, which would not apply it.
    fn refuse(&self, name: &str, what: &str, c: &ModelConfig) -> Result<(), SourceError> {
        if !self.map.contains_key(name) {
            return Ok(());
        }
        Err(SourceError::Unsupported {
            path: self.path.into(),
            what: format!("tensor `{name}` ({what}) in a `{}` model", c.architecture),
        })
    }
}

/// Checks the presence and shape of every tensor the decoder of `arch` needs, and that no q/k norms
/// or another family's norms come with a model that would not apply them.
pub(crate) fn check_tensors(
    path: &str,
    arch: &dyn Arch,
    c: &ModelConfig,
    tensors: &BTreeMap<String, SourceTensor>,
) -> Result<(), SourceError> {
    let ts = Tensors { path, map: tensors };
    let h = c.hidden_size;
    ts.want(canonical::TOKEN_EMBD, vec![c.vocab_size, h])?;
    ts.want(canonical::OUTPUT_NORM, vec![h])?;
    if !c.tie_word_embeddings {
        ts.want(canonical::OUTPUT, vec![c.vocab_size, h])?;
    }
    for i in 0..c.num_layers {
        check_layer(&ts, arch, c, i)?;
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

/// Layer `i`'s tensors: llama's, the biases and q/k norms the config asks for, the family's own norms.
fn check_layer(
    ts: &Tensors<'_>,
    arch: &dyn Arch,
    c: &ModelConfig,
    i: usize,
) -> Result<(), SourceError> {
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let b = |s: &str| canonical::blk(i, s);
    ts.want(&b("attn_norm.weight"), vec![h])?;
    ts.want(&b("attn_q.weight"), vec![q, h])?;
    ts.want(&b("attn_k.weight"), vec![kv, h])?;
    ts.want(&b("attn_v.weight"), vec![kv, h])?;
    ts.want(&b("attn_output.weight"), vec![h, q])?;
    if c.attention_bias {
        ts.want(&b("attn_q.bias"), vec![q])?;
        ts.want(&b("attn_k.bias"), vec![kv])?;
        ts.want(&b("attn_v.bias"), vec![kv])?;
    }
    for norm in ["attn_q_norm.weight", "attn_k_norm.weight"] {
        match c.qk_norm {
            true => ts.want(&b(norm), vec![c.head_dim])?,
            false => ts.refuse(&b(norm), "q/k norms", c)?,
        }
    }
    for extra in family::all_extra_layer_norms() {
        match arch.extra_layer_norms().contains(&extra) {
            true => ts.want(&b(extra.0), vec![h])?,
            false => ts.refuse(&b(extra.0), extra.1, c)?,
        }
    }
    ts.want(&b("ffn_norm.weight"), vec![h])?;
    ts.want(&b("ffn_gate.weight"), vec![f, h])?;
    ts.want(&b("ffn_up.weight"), vec![f, h])?;
    ts.want(&b("ffn_down.weight"), vec![h, f])
}
