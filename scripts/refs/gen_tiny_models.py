#!/usr/bin/env python3
"""Generates tiny RANDOM Hugging Face checkpoints + transformers reference logits under tests/fixtures/tiny/.

Dev-time script (the fixtures are committed; CI never runs this). Needs torch, transformers (5.x),
safetensors, tokenizers:

    python3 scripts/refs/gen_tiny_models.py [NAME ...]     (default: every model; names rebuild only those)

Models (2 layers, hidden 64, intermediate 128, 4 heads, 2 KV heads, head_dim 16, vocab 320, unless said):
- `llama`      untied embeddings, f32 weights sharded over 2 safetensors files + model.safetensors.index.json,
               rope_theta 10000 with llama3 rope scaling (factor 8, low 1, high 4, original 64), so the
               three frequency bands (kept, smoothed, divided by 8) all occur at head_dim 16.
               config.json in the classic hub form (`rope_theta` + `rope_scaling`).
- `qwen2`      q/k/v biases, tied embeddings, bf16 weights in one model.safetensors; config.json as
               transformers 5 writes it (`rope_parameters` {rope_theta, rope_type: default}).
- `llama_f16`  tied embeddings, f16 weights in one file, no rope scaling; classic config form.
- `qwen3`      q/k RMSNorm per head, head_dim 32 (independent of hidden / heads = 16), tied embeddings,
               rope_theta 1e6, f32 weights; transformers 5 config form.
- `mistral`    sliding_window 4 (shorter than the 12-id sequence), untied embeddings, f32 weights;
               transformers 5 config form.
- `phi3`       fused qkv_proj and gate_up_proj, LongRoPE (short/long factors of head_dim/2, pretrained
               context 64 of max_position_embeddings 256: attention factor sqrt(1 + ln 4 / ln 64)), untied,
               f32 weights; classic config form (`rope_scaling` type longrope).
- `smollm3`    layer 1 of 2 without rotary embedding (`no_rope_layers` [1, 0]), tied embeddings, bf16
               weights; transformers 5 config form.
- `gemma3`     Gemma3ForCausalLM (model_type gemma3_text), 3 layers: sliding, sliding, full (`layer_types`),
               sliding_window 4, head_dim 32, q/k RMSNorm, rope_theta 1e6 for full and 1e4 for sliding layers
               (`rope_parameters` keyed by layer type), query_pre_attn_scalar 24 (scale 24^-0.5, not
               head_dim^-0.5), gelu_pytorch_tanh, embeddings scaled by sqrt(hidden) = 8, rms eps 1e-6, tied,
               f32 weights; transformers 5 config form; eager attention.
- `gemma2`     Gemma2ForCausalLM, 2 layers: sliding (window 4), full; head_dim 32, query_pre_attn_scalar 24,
               attention logit softcap 5 and final logit softcap 3 (small, so both bite with these weights:
               |logits| < 3), rope_theta 1e4, gelu_pytorch_tanh, tied, bf16 weights; transformers 5 config
               form; eager attention.

The weights are random (seeded) with a std large enough that the logits have a real spread (greedy choices
are not coin flips); the norm weights are random around 1 and biases random, never zero. Gemma's RMSNorms
multiply by (1 + w): there w is random around 0 (std 0.3), except the sandwich post-norms on the sublayer
outputs (around 3), and the tied embeddings have a smaller std (0.4 gemma3, 0.2 gemma2) since the model
multiplies them by 8 on input.

Each folder gets config.json, generation_config.json, model safetensors, tokenizer.json,
tokenizer_config.json (eos `<|im_end|>`, add_bos_token false) and the ChatML chat template — inside
tokenizer_config.json for the classic-form models (llama, llama_f16), in chat_template.jinja for qwen2 (the
transformers 5 layout) — and reference.json:
- `ids`: a fixed 12-token sequence (the tokenized `text`);
- `logits`: [12][320] full logits of one forward over `ids` (f32 compute on the stored weights, i.e. f16/bf16
  weights are upcast exactly);
- `greedy`: 8 ids of greedy continuation (transformers generate with its KV cache), `greedy_logits`:
  [8][320], the logits row that chose each of them; `greedy_min_margin`: smallest top-1/top-2 gap seen.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config,
                          SmolLM3ForCausalLM)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny")
VOCAB = 320
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "<|im_start|>user\nHello there! How are you?<|im_end|>\n<|im_start|>assistant\n"
N_IDS = 12
N_GREEDY = 8


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([os.path.join(OUT, "corpus.txt")], trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i
    return tok


def save_tokenizer(tok: Tokenizer, d: str, classic: bool):
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>",
                                   additional_special_tokens=SPECIALS, model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    # Be explicit about BOS handling (SmolLM2-like: no BOS added; the template starts with <|im_start|>).
    p = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(p))
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    jinja = os.path.join(d, "chat_template.jinja")
    if classic:
        # The classic hub layout: template inside tokenizer_config.json, no chat_template.jinja.
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
        if os.path.exists(jinja):
            os.remove(jinja)
    else:
        # transformers 5 layout: the template lives in chat_template.jinja only.
        cfg.pop("chat_template", None)
        assert open(jinja).read() == CHAT_TEMPLATE
    json.dump(cfg, open(p, "w"), indent=2, ensure_ascii=False)
    return fast


def randomize(model, seed: int, std: float, norm=(1.0, 0.2), embed_std=1.0, post_norm=None):
    """norm: (center, std) of the RMSNorm weights — around 0 for Gemma, whose norms multiply by (1 + w);
    post_norm: (center, std) for Gemma's sandwich norms on the sublayer outputs (post_attention_layernorm,
    post_feedforward_layernorm), which alone set how much each sublayer adds to the residual stream."""
    g = torch.Generator().manual_seed(seed)
    post = (".post_attention_layernorm.weight", ".post_feedforward_layernorm.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if post_norm is not None and name.endswith(post):
                p.copy_(post_norm[0] + post_norm[1] * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(norm[0] + norm[1] * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def to_legacy_rope(d: str, scaling):
    """Rewrites transformers-5 `rope_parameters` into the classic hub form `rope_theta` + `rope_scaling`
    (and `dtype` into `torch_dtype`)."""
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["torch_dtype"] = cfg.pop("dtype")
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = scaling
    json.dump(cfg, open(p, "w"), indent=2, sort_keys=True)
    return cfg


def reference(d: str, cls, ids, attn=None):
    kw = {"attn_implementation": attn} if attn else {}
    model = cls.from_pretrained(d, dtype=torch.float32, **kw)  # upcasts f16/bf16 weights exactly
    model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float().numpy()
        out = model.generate(x, max_new_tokens=N_GREEDY, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=N_GREEDY)
    greedy = out.sequences[0, len(ids):].tolist()
    glog = np.stack([l[0].float().numpy() for l in out.logits])
    # Cross-check the cached generate against full recomputation.
    seq = list(ids)
    for t, row in zip(greedy, glog):
        with torch.no_grad():
            full = model(torch.tensor([seq])).logits[0, -1].numpy()
        assert int(np.argmax(full)) == t
        assert np.max(np.abs(full - row)) <= 1e-4 * np.max(np.abs(full)), np.max(np.abs(full - row))
        seq.append(t)
    margins = [float(np.sort(r)[-1] - np.sort(r)[-2]) for r in np.concatenate([logits, glog])]
    return logits, greedy, glog, min(margins), float(np.max(np.abs(logits)))


def check_tokenizer(d: str, ids):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(d)
    assert t.encode(TEXT, add_special_tokens=True)[:N_IDS] == ids
    r = t.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert r == "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
        "<|im_start|>assistant\n", repr(r)
    assert t.eos_token_id == 2, t.eos_token_id


def floats(a):
    return [[float(np.float32(v)) for v in row] for row in a]


def build(name, cls, config, seed, std, dtype, shard, legacy_scaling, tok, ids, norm=(1.0, 0.2), embed_std=1.0,
          post_norm=None, attn=None):
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed, std, norm, embed_std, post_norm)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                               do_sample=False, max_new_tokens=32)
    model.save_pretrained(d, max_shard_size=shard) if shard else model.save_pretrained(d)
    classic = legacy_scaling is not False
    if classic:
        to_legacy_rope(d, legacy_scaling)
    save_tokenizer(tok, d, classic)
    check_tokenizer(d, ids)
    logits, greedy, glog, margin, maxabs = reference(d, cls, ids, attn)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        assert maxabs < cap, (maxabs, cap)  # the final softcap did squash the logits
    files = sorted(os.listdir(d))
    ref = {
        "name": name,
        "model_type": config.model_type,
        "weights_dtype": str(dtype).replace("torch.", ""),
        "tied": bool(config.tie_word_embeddings),
        "seed": seed,
        "text": TEXT,
        "ids": ids,
        "logits": floats(logits),
        "greedy": greedy,
        "greedy_logits": floats(glog),
        "greedy_min_margin": margin,
        "max_abs_logit": maxabs,
        "files": files,
        "reference": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                     "f32 compute; logits[i] is the row at position i of one forward over ids; greedy via "
                     "generate(do_sample=False) with KV cache (cross-checked against full recompute)",
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{name}: {files}, {size} bytes, min greedy/logit margin {margin:.3f}, max|logit| {maxabs:.2f}, "
          f"greedy {greedy}", file=sys.stderr)
    assert size < 1_000_000, size


def main():
    tok = train_tokenizer()
    ids = tok.encode(TEXT).ids
    assert len(ids) >= N_IDS, (len(ids), ids)
    ids = ids[:N_IDS]
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    # LongRoPE: per-frequency divisors (head_dim 16 → 8 of them); the short set applies up to 64 tokens
    PHI3_ROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0],
                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 20.0]}
    models = {
        "llama": lambda: build(
            "llama", LlamaForCausalLM,
            LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=dict(llama3)),
            seed=1, std=0.25, dtype=torch.float32, shard="300KB", legacy_scaling=llama3, tok=tok, ids=ids),
        "qwen2": lambda: build(
            "qwen2", Qwen2ForCausalLM,
            Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0),
            seed=2, std=0.25, dtype=torch.bfloat16, shard=None, legacy_scaling=False, tok=tok, ids=ids),
        "llama_f16": lambda: build(
            "llama_f16", LlamaForCausalLM,
            LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0),
            seed=3, std=0.25, dtype=torch.float16, shard=None, legacy_scaling=None, tok=tok, ids=ids),
        "qwen3": lambda: build(
            "qwen3", Qwen3ForCausalLM,
            Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1e6,
                        attention_bias=False),
            seed=4, std=0.25, dtype=torch.float32, shard=None, legacy_scaling=False, tok=tok, ids=ids),
        "mistral": lambda: build(
            "mistral", MistralForCausalLM,
            MistralConfig(**common, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4),
            seed=6, std=0.25, dtype=torch.float32, shard=None, legacy_scaling=False, tok=tok, ids=ids),
        "phi3": lambda: build(
            "phi3", Phi3ForCausalLM,
            Phi3Config(**{**common, "max_position_embeddings": 256}, tie_word_embeddings=False,
                       rope_theta=10000.0, original_max_position_embeddings=64, pad_token_id=2,
                       rope_scaling=dict(PHI3_ROPE)),
            seed=7, std=0.25, dtype=torch.float32, shard=None, legacy_scaling=PHI3_ROPE, tok=tok, ids=ids),
        "smollm3": lambda: build(
            "smollm3", SmolLM3ForCausalLM,
            SmolLM3Config(**common, tie_word_embeddings=True, rope_theta=10000.0, no_rope_layers=[1, 0],
                          pad_token_id=2),
            seed=5, std=0.25, dtype=torch.bfloat16, shard=None, legacy_scaling=False, tok=tok, ids=ids),
    }
    # Gemma: (1 + w) RMSNorms with w random around 0, sandwich post-norms centered at 3 (else the sublayers,
    # post-normed to ~unit size, barely move the residual stream and the tied, sqrt(hidden)-scaled input
    # embedding predicts itself), tanh-GELU, query_pre_attn_scalar 24 (not head_dim: scale 24^-0.5).
    gemma = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=24, sliding_window=4, tie_word_embeddings=True)
    gemma_init = dict(norm=(0.0, 0.3), post_norm=(3.0, 0.3), attn="eager")
    models.update({
        "gemma3": lambda: build(
            "gemma3", Gemma3ForCausalLM,
            Gemma3TextConfig(**gemma, num_hidden_layers=3,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             sliding_window_pattern=3,  # else saved as `_sliding_window_pattern`: 6
                             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                             attn_implementation="eager"),
            seed=24, std=0.25, dtype=torch.float32, shard=None, legacy_scaling=False, tok=tok, ids=ids,
            embed_std=0.4, **gemma_init),
        "gemma2": lambda: build(
            "gemma2", Gemma2ForCausalLM,
            Gemma2Config(**gemma, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0, attn_implementation="eager"),
            seed=39, std=0.25, dtype=torch.bfloat16, shard=None, legacy_scaling=False, tok=tok, ids=ids,
            embed_std=0.2, **gemma_init),
    })
    for name in sys.argv[1:] or models:
        models[name]()


if __name__ == "__main__":
    main()
