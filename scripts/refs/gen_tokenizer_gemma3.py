#!/usr/bin/env python3
"""Records llama.cpp's token ids for Gemma 3's SentencePiece vocabulary (the Gemma 3 tokenizer parity fixture).

Usage: python3 scripts/refs/gen_tokenizer_gemma3.py [GGUF] [OUT]
Defaults: cache/gemma3/gemma-3-270m-q4_k_m.gguf (scripts/fetch-gemma3), tests/fixtures/tokenizer_gemma3.json.
Needs llama-cpp-python. The strings are deterministic (a fixed seed drives the random mixes).

Every case is `tokenize(text, add_bos=False, special=True)`; a few also carry `ids_bos` (add_bos=True). The
fixture also records llama.cpp's BOS id, whether it adds BOS, and its end-of-generation ids
(`llama_vocab_is_eog` over the whole vocabulary).
"""
import json
import random
import sys
from pathlib import Path


def strings():
    s = []
    # ASCII prose.
    s += [
        "Hello world",
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "It's a test; isn't it? We're sure they've done it, I'm told, we'll see, he'd know.",
        "IT'S LOUD. ISN'T IT? WE'RE HERE.",
        "don't Don't DON'T 'tis 's 't 're 've 'm 'll 'd",
        "A sentence.\nAnother one.\n\nA new paragraph.",
        "Mr. Smith went to Washington D.C. on Jan. 3rd, 1999 at 4:30 p.m.",
        "e-mail: john.doe+test@example.com, url: https://example.org/path?q=1&r=two#frag",
        "CamelCaseIdentifiersAndsnake_case_names and SCREAMING_CASE",
        "a",
        "ab",
        "",
        " ",
        "\n",
        "\t",
        "▁",
        "▁▁ literal lower-one-eighth blocks ▁x",
        "Supercalifragilisticexpialidocious antidisestablishmentarianism",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "abababababababababababababababababababab",
        "thethethethethethethethe inininininin",
        "xyzzyplughfoobarbazquxquuxcorgegraultgarplywaldofredplughxyzzythud" * 3,
        "The year 2024 had 366 days; 1,000,000 people; 3.14159; -42; +7; 1e-9; 0x1F; 0b1010.",
    ]
    # Code.
    s += [
        "def foo(x, y=2):\n    return x ** y  # power\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!(\"{:?}\", v);\n}\n",
        "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
        "const f = async (a) => { await fetch(`/api/${a}`); };",
        "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
        "<html><body><div class=\"x\">Hi &amp; bye</div></body></html>",
        "<table><tr><td>1</td><td>2</td></tr></table>",
        "<h1>Title</h1><p><strong>bold</strong> <em>it</em> <code>x</code> <a href=\"#\">l</a></p>",
        "<b>b</b><i>i</i><u>u</u><s>s</s><sub>2</sub><sup>3</sup><blockquote>q</blockquote>",
        "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n\telse:\n\t\tpass\n",
        "x = [1, 2, 3]; y = {'a': 1, \"b\": [2, 3]}; z = (4,)",
        "$ ls -la | grep '^d' && echo \"done\" || exit 1",
        "{\"key\": [true, false, null, 1.5e10, \"\\u00e9\"]}",
        "    indented four\n        indented eight\n",
        "a += b; c -= d; e *= f; g /= h; i %= j; k <<= 1; l >>= 2;",
        "if (a != b && c === d || !e) { return a?.b ?? c; }",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
        "\\begin{equation} E = mc^2 \\end{equation}",
        "// comment\n/* block */\n-- sql comment\n# shell\n<!-- html -->",
        "@decorator\nclass A(B, metaclass=M):\n    __slots__ = ('x',)\n",
        "std::vector<std::pair<int, std::string>> v{{1, \"a\"}};",
        "    def __init__(self):\n        self.x = 1\n\n    def f(self):\n        return self.x\n",
    ]
    # Many scripts.
    s += [
        "Olá, coração! Ça va? Größe, Straße, naïve, façade, résumé, Ångström, Øresund, Łódź",
        "Zażółć gęślą jaźń; Příliš žluťoučký kůň; İstanbul ılık",
        "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.",
        "Γειά σου Κόσμε· Ελληνικά ΑΒΓ αβγ ϐϑϕ",
        "مرحبا بالعالم، كيف حالك؟",
        "שלום עולם, מה שלומך?",
        "नमस्ते दुनिया, आप कैसे हैं?",
        "বাংলা ভাষা আমার মাতৃভাষা",
        "தமிழ் மொழி மிகவும் பழமையானது",
        "తెలుగు భాష",
        "ಕನ್ನಡ ಭಾಷೆ",
        "മലയാളം ഭാഷ",
        "ગુજરાતી ભાષા",
        "ਪੰਜਾਬੀ ਭਾਸ਼ਾ",
        "සිංහල භාෂාව",
        "สวัสดีชาวโลก ภาษาไทยไม่มีช่องว่างระหว่างคำ",
        "ພາສາລາວ",
        "ភាសាខ្មែរ",
        "မြန်မာဘာသာ",
        "ქართული ენა",
        "Հայերեն լեզու",
        "አማርኛ ቋንቋ",
        "ᚠᛇᚻ᛫ᛒᛦᚦ runes",
        "ᠮᠣᠩᠭᠣᠯ mongolian",
        "ꯃꯤꯇꯩ ꯂꯣꯟ meitei",
        "Xin chào thế giới, Tiếng Việt có dấu",
        "Tôi yêu tiếng Việt; Đà Nẵng",
        "Kiswahili ni lugha nzuri; Yorùbá; Hausa; isiZulu",
        "ئۇيغۇرچە; فارسی زبان شیرین است; اردو",
        "ܠܫܢܐ ܣܘܪܝܝܐ syriac",
        "ߒߞߏ nko; ⵜⴰⵎⴰⵣⵉⵖⵜ tifinagh",
        "ᏣᎳᎩ cherokee; ᐃᓄᒃᑎᑐᑦ inuktitut",
        "e\u0301 combining acute, n\u0303 tilde, a\u030a ring",
        "ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ①②③, ½ ¾, Ⅻ",
        "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛",
    ]
    # CJK.
    s += [
        "你好，世界！",
        "我爱自然语言处理。今天天气很好。",
        "こんにちは世界、カタカナとひらがな。",
        "東京都渋谷区 2024年1月1日",
        "안녕하세요 세계",
        "한국어 문장입니다. 123개",
        "中文English混合text测试",
        "「引用」『二重』【括弧】〈山〉《書名》",
        "全角スペース\u3000が入る",
        "繁體中文與简体中文",
        "ｶﾀｶﾅ半角",
        "㍻㍼㍽㍾ ㈱ ㊙",
    ]
    # Rare / unknown characters (byte fallback).
    s += [
        "\U0002A6A5\U0002A6A6\U0002B820 ext-B/E CJK",
        "\ue000\ue001\uf8ff private use",
        "\U000F0000\U0010FFFD supplementary private use",
        "\U0001D11E\U0001D160 music \U0001F0A1 card",
        "\U00013000\U00013001 hieroglyphs \U00012000 cuneiform",
        "\u0378 unassigned? \u2ff0 ideographic description",
        "𐍈𐌰𐌿𐍃 gothic; 𐎀𐎁 ugaritic",
        "<0x41> <0xE4> literal byte-token text",
        "\x00\x01\x02\x7f controls",
    ]
    # Emoji.
    s += [
        "😀😃😄😁",
        "I ❤️ Rust 🦀",
        "👨‍👩‍👧‍👦 family",
        "👩🏽‍💻 coder, 🧑🏿‍🚀 astronaut",
        "🇺🇸🇫🇷🇯🇵🇩🇪 flags",
        "🏳️‍🌈 🏴‍☠️ 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
        "✌🏻✌🏼✌🏽✌🏾✌🏿",
        "emoji at end 🎉",
        "🎉 emoji at start",
        "keycaps 1️⃣ 2️⃣ #️⃣",
        "🫠🫶🪿🫎 newer emoji",
    ]
    # Whitespace runs: spaces, tabs, newlines (Gemma has user-defined tokens for runs of each).
    for n in range(1, 36, 2):
        s.append("a" + " " * n + "b")
    for n in (1, 2, 3, 5, 8, 13, 31, 32, 40):
        s.append("x" + "\t" * n + "y")
    for n in (1, 2, 3, 4, 7, 15, 31, 33):
        s.append("line" + "\n" * n + "next")
    s += [
        " " * 63 + "z",
        "  leading two",
        "   leading three",
        " leading one",
        "trailing one ",
        "trailing three   ",
        " \n \n ",
        "\r\n\r\nwindows\r\nlines\r\n",
        "\t \t mixed \t\n\t",
        "   ",
        "\n\n\n",
        "word \n word",
        "end with newline\n",
        " \tX",
        "\n \n  \n   \n",
        "\t\t\n\n  \t\n ",
        "a\u00a0b nbsp, a\u2009b thin, a\u3000b ideographic",
        "vt\x0bff\x0cfs\x1cgs\x1dus\x1frs\x1e nel\x85 ls\u2028 ps\u2029",
        "zw\u200bsp zwnj\u200c zwj\u200d bom\ufeff",
    ]
    # Numbers.
    for n in range(1, 17):
        s.append("".join(str((i * 7 + n) % 10) for i in range(n)))
    s += ["3.14159265358979", "1,234,567.89", "-0.0001", "10^100", "v1.2.3-beta.4", "٠١٢٣٤٥ ۱۲۳ १२३"]
    # Punctuation.
    s += [
        "!!!???...",
        "---===+++",
        "(((nested)))",
        "\"quoted\" 'single' `back`",
        "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
        "«guillemets» „low“ ‹single›",
        "—em dash– en dash‐hyphen",
        "¿Qué? ¡Sí!",
    ]
    # Special (control / user-defined) tokens inside text.
    s += [
        "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\nRoses are red<end_of_turn><eos>",
        "text<eos>more",
        "<pad><pad>x<unk>y<mask>z",
        "a <start_of_turn> b",
        "<end_of_turn>",
        "<start_of_image><end_of_image> [multimodal]",
        "<unused0><unused1><unused10><unused100>x<unused6241>",
        "<unused1>0 <unused99999>",
        "</s> and <s>",
        "<start_of_turn",
        "<start_of_turn>>",
        "<<end_of_turn>>",
        " <eos> ",
        "<eos>\n\n<eos>",
        "<bbox>1,2,3,4</bbox><img></img><span>s</span>",
        "<end_of_turn >",
        "<START_OF_TURN>",
    ]
    # Mixed.
    s += [
        "Price: $1,299.99 (was €1.499,00) — save 13%!",
        "Temperature: -3°C / 26.6°F at 06:45:00Z",
        "The café's crème brûlée costs ¥500 😋 #yum @chef",
        "Math: ∑_{i=1}^{n} i = n(n+1)/2, ∀x∈ℝ: x²≥0",
        "Mixed 中文 and English and 日本語 and 한국어 123 🎌",
        "https://例え.jp/パス?クエリ=値",
        "C:\\Users\\name\\Documents\\file (1).txt",
        "He said, \"It's 5 o'clock somewhere!\" and left...",
        "TODO(alice): fix #1234 — see PR#56 & issue#78",
        "αβγ123def456ghi",
    ]
    # Deterministic random mixes.
    rng = random.Random(31337)
    atoms = [
        "a", "Z", " ", "  ", "   ", "\n", "\n\n", "\t", "'s", "1", "23", "456", "é", "ß", "中", "の", "한", "ж",
        "ש", "ع", "क", "ก", "😀", "👍🏽", "🇯🇵", "!", "?", "...", "<start_of_turn>", "<end_of_turn>", "<eos>",
        "<b>", "</td>", "__", "->", "the", " The", "ing", "tion", "\r\n", "\u00a0", "▁", "\U0002A6A5", "\ue000",
    ]
    for _ in range(60):
        s.append("".join(rng.choice(atoms) for _ in range(rng.randint(2, 16))))
    return s


# Cases that also record add_bos=True.
BOS_CASES = {"Hello world", "", "<bos><start_of_turn>user\nWrite a poem.<end_of_turn>\n<start_of_turn>model\nRoses are red<end_of_turn><eos>", " leading one"}


def main():
    root = Path(__file__).resolve().parent.parent.parent
    gguf = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "cache/gemma3/gemma-3-270m-q4_k_m.gguf"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "tests/fixtures/tokenizer_gemma3.json"
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    cases = []
    texts = strings()
    assert len(set(texts)) == len(texts), "duplicate strings"
    for text in texts:
        case = {"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)}
        if text in BOS_CASES:
            case["ids_bos"] = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        cases.append(case)
    doc = {
        "source": gguf.name,
        "generator": f"llama-cpp-python {llama_cpp.__version__}: tokenize(text, add_bos=False, special=True)",
        "bos_id": llama_cpp.llama_vocab_bos(vocab),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "eog_ids": eog,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
