//! Phi-3: llama whose checkpoints fuse the q/k/v projections (`qkv_proj`) and the MLP's gate and up
//! (`gate_up_proj`), split here into the canonical tensors as row slices of the same bytes; its layers
//! may attend a sliding window, and its rotary tables may be LongRoPE's (read with the common
//! `rope_scaling`). The graph is the shared llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;

use super::family::HfLayerTensor;
use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::hf::HfKeys;
use crate::source::{canonical, ModelConfig, SourceError, SourceTensor};
use crate::trace::TraceError;

/// Phi-3 and Phi-3.5 (mini).
pub struct Phi3;

impl Arch for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["phi3"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["Phi3ForCausalLM"]
    }
    fn read_hf(&self, c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.sliding_window = c.positive("sliding_window")?;
        Ok(())
    }
    /// The fused `qkv_proj` and `gate_up_proj` weights as the canonical q/k/v and gate/up tensors.
    fn hf_layer_tensor(
        &self,
        cfg: &ModelConfig,
        name: &str,
        layer: usize,
        suffix: &str,
        t: &SourceTensor,
    ) -> HfLayerTensor {
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        let rows: &[(&str, usize)] = match suffix {
            "self_attn.qkv_proj.weight" => &[
                ("attn_q.weight", q),
                ("attn_k.weight", kv),
                ("attn_v.weight", kv),
            ],
            "mlp.gate_up_proj.weight" => &[("ffn_gate.weight", f), ("ffn_up.weight", f)],
            _ => return Ok(None),
        };
        let parts = t.split_rows(name, rows)?;
        let names = rows.iter().map(|(s, _)| canonical::blk(layer, s));
        Ok(Some(names.zip(parts).collect()))
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::source::SourceDType;

    #[test]
    fn fused_projections_split_into_rows() {
        // 4 heads and 2 KV heads of 8: q 32 rows, k and v 16 each; the MLP 48 wide.
        let c = crate::arch::tests::config("phi3");
        let t = SourceTensor {
            dtype: SourceDType::F32,
            shape: vec![64, 32],
            data: Bytes::from((0..64 * 32 * 4).map(|i| i as u8).collect::<Vec<u8>>()),
        };
        let name = "model.layers.0.self_attn.qkv_proj.weight";
        let parts = Phi3
            .hf_layer_tensor(&c, name, 0, "self_attn.qkv_proj.weight", &t)
            .unwrap()
            .unwrap();
        let names: Vec<_> = parts.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.0.attn_q.weight",
                "blk.0.attn_k.weight",
                "blk.0.attn_v.weight"
            ]
        );
        assert_eq!(parts[1].1.shape, [16, 32]);
        assert_eq!(parts[1].1.data[..], t.data[32 * 128..48 * 128]);
        let name = "model.layers.0.mlp.gate_up_proj.weight";
        let e = Phi3
            .hf_layer_tensor(&c, name, 0, "mlp.gate_up_proj.weight", &t)
            .unwrap_err();
        assert!(e.contains("gate_up_proj") && e.contains("96 rows"), "{e}");
        let other = Phi3.hf_layer_tensor(&c, "x", 0, "self_attn.q_proj.weight", &t);
        assert!(matches!(other, Ok(None)));
    }
}
