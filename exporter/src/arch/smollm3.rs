//! SmolLM3: llama with some layers that apply no rotary embedding ("NoPE"): config.json
//! `no_rope_layers` (1 where a layer rotates, 0 where not), else every `no_rope_layer_interval`-th
//! layer (transformers' default, 4). The graph is the shared llama-shaped decoder (decoder.rs).

use onestep_format::graph::Graph;
use serde_json::Value;

use super::{decoder, Arch, ArchOptions, Weights};
use crate::source::hf::HfKeys;
use crate::source::{ModelConfig, SourceError};
use crate::trace::TraceError;

/// SmolLM3.
pub struct SmolLM3;

impl Arch for SmolLM3 {
    fn name(&self) -> &'static str {
        "smollm3"
    }
    fn hf_model_types(&self) -> &'static [&'static str] {
        &["smollm3"]
    }
    fn hf_classes(&self) -> &'static [&'static str] {
        &["SmolLM3ForCausalLM"]
    }
    fn read_hf(&self, c: &HfKeys<'_>, cfg: &mut ModelConfig) -> Result<(), SourceError> {
        cfg.no_rope_layers = no_rope_layers(c, cfg.num_layers)?;
        Ok(())
    }
    fn build(&self, cfg: &ModelConfig, w: &Weights, o: &ArchOptions) -> Result<Graph, TraceError> {
        decoder::build(cfg, w, o)
    }
}

/// The layers without a rotary embedding, ascending.
fn no_rope_layers(c: &HfKeys<'_>, layers: usize) -> Result<Vec<usize>, SourceError> {
    if let Some(v) = c.get("no_rope_layers") {
        let flags: Option<Vec<u64>> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect());
        return match flags {
            Some(f) if f.len() == layers && f.iter().all(|&x| x <= 1) => {
                Ok((0..layers).filter(|&i| f[i] == 0).collect())
            }
            _ => Err(c.err(
                "no_rope_layers",
                format!("must hold one 0 or 1 per layer ({layers}), got {v}"),
            )),
        };
    }
    match c.usize("no_rope_layer_interval")?.unwrap_or(4) {
        0 => Err(c.err("no_rope_layer_interval", "must be positive")),
        n => Ok((0..layers).filter(|i| (i + 1) % n == 0).collect()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn no_rope_layers_from_the_list_or_the_interval() {
        let get = |extra: &str, layers: usize| {
            let v: Value =
                serde_json::from_str(&format!("{{\"model_type\": \"smollm3\"{extra}}}")).unwrap();
            no_rope_layers(&HfKeys::new(Path::new("config.json"), &v), layers)
        };
        assert_eq!(
            get(r#", "no_rope_layers": [1, 0, 1, 0]"#, 4).unwrap(),
            [1, 3]
        );
        assert_eq!(get("", 8).unwrap(), [3, 7]);
        assert_eq!(get(r#", "no_rope_layer_interval": 2"#, 4).unwrap(), [1, 3]);
        for bad in [
            r#", "no_rope_layers": [1, 0]"#,
            r#", "no_rope_layers": [1, 2, 1, 1]"#,
            r#", "no_rope_layer_interval": 0"#,
        ] {
            let e = get(bad, 4).unwrap_err().to_string();
            assert!(e.contains("no_rope_layer"), "{e}");
        }
    }
}
