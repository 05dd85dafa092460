"""A SmolLM2-135M-shaped Llama with random weights (transformers), for speed runs where the real weights
cannot travel (the device machine takes 64 MiB). Usage: make_smollm2_shape.py OUT_DIR TOKENIZER_DIR
(TOKENIZER_DIR holds tokenizer.json + tokenizer_config.json, e.g. extracted from an export's metadata)."""
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out, tok = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, rms_norm_eps=1e-5,
                  max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
model = LlamaForCausalLM(cfg)
# Larger-than-init weights so logits have real margins (random init gives near-uniform logits).
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.06)
model.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{tok}/{f}", f"{out}/{f}")
print("wrote", out)
