"""Regenerates the generate-layer test fixtures from the SmolLM2 GGUF (run once; outputs are committed).

    python3 make_fixtures.py "$(scripts/fetch-smollm2 | tail -n1)"     # from the repository root

Writes, next to this script:
  smollm2_chat_template.jinja  the GGUF's `tokenizer.chat_template`, verbatim
  smollm2_tokenizer.json       transformers' tokenizer (read from the GGUF) saved as tokenizer.json
  chat_expected.json           transformers `apply_chat_template` renderings (SmolLM2 template and a
                               feature-rich test template) and the token ids of texts
"""
import json
import os
import sys
import tempfile

import gguf
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
gguf_path = sys.argv[1]

reader = gguf.GGUFReader(gguf_path)
field = reader.fields["tokenizer.chat_template"]
template = bytes(field.parts[field.data[0]]).decode("utf-8")
with open(os.path.join(HERE, "smollm2_chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(template)

tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
with tempfile.TemporaryDirectory() as d:
    tok.save_pretrained(d)
    with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
with open(os.path.join(HERE, "smollm2_tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump(tj, f, ensure_ascii=False, separators=(",", ":"))

# A template exercising the HF conventions our renderer must support: python string methods,
# namespace, tojson, raise_exception, bos/eos tokens, loop variables, filters.
RICH = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content.strip() %}{% endif %}{% endfor %}"
    "{% if ns.sys %}[SYS]{{ ns.sys.upper() }}[/SYS]\n{% endif %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m.role) }}{% endif %}"
    "{% if m.role == 'user' %}<u{{ loop.index }}>{{ m.content | trim }}"
    "{% if m.content.startswith('Q:') %} (question, {{ m.content.split(':') | length }} parts){% endif %}</u>"
    "{% else %}<a>{{ m.content.replace('  ', ' ').rstrip() }}</a>{{ eos_token }}{% endif %}"
    "{% if loop.last %}\n{{ {'n': messages | length, 'last': m.role} | tojson }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)

convs = {
    "single": [{"role": "user", "content": "Hello!"}],
    "with_system": [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "Q: what is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!  How can I help?  "},
        {"role": "user", "content": "Tell me a joke 😀 about 日本語."},
    ],
}

renders = []
for name, msgs in convs.items():
    for agp in (False, True):
        renders.append({
            "template": "smollm2", "name": name, "add_generation_prompt": agp, "messages": msgs,
            "text": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp),
        })
        renders.append({
            "template": "rich", "name": name, "add_generation_prompt": agp, "messages": msgs,
            "text": tok.apply_chat_template(msgs, chat_template=RICH, tokenize=False,
                                            add_generation_prompt=agp),
        })

texts = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "emoji 😀🎉 and CJK 日本語のテキスト, accents: café naïve",
    "  leading and trailing spaces  \n\ttabs\n",
]
# Rendered SmolLM2 chat prompts (special tokens in the text), as `Session::chat` tokenizes them.
texts += [r["text"] for r in renders if r["template"] == "smollm2" and r["add_generation_prompt"]]
encodings = [{"text": t, "ids": tok.encode(t, add_special_tokens=True)} for t in texts]

out = {
    "bos_token": tok.bos_token,
    "eos_token": tok.eos_token,
    "rich_template": RICH,
    "renders": renders,
    "encodings": encodings,
}
with open(os.path.join(HERE, "chat_expected.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
print("ok", len(renders), "renders", len(encodings), "encodings")
