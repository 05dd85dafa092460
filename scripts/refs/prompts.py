"""Chat prompts shared by the SmolLM2 reference generators (dev-time; see gen_llamacpp_refs.py)."""

LONG_TEXT = (
    "The city library opened in 1887 with a single room and fewer than two thousand books, most of them "
    "donated by local merchants. Over the next century it moved three times, first to a former bank on "
    "Market Street, then to a purpose-built hall near the river, and finally, in 1994, to the glass building "
    "it occupies today. Each move followed a surge in membership: the first after the railway brought new "
    "workers to the mills, the second after the university expanded, and the third after the library began "
    "lending music and films. Today it holds more than four hundred thousand items, runs evening classes "
    "for adults, and keeps a small archive of letters written by the founders."
)

# Each entry: (name, messages). The system prompt is the template's default unless given.
PROMPTS = [
    ("capital", [{"role": "user", "content": "What is the capital of France? Answer in one sentence, then add one fact about the city."}]),
    ("story", [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]),
    ("code", [{"role": "user", "content": "Write a Python function `is_prime(n)` that returns True when n is prime, with a short docstring."}]),
    ("math", [{"role": "user", "content": "What is 17 * 23? Show your working step by step."}]),
    ("french", [{"role": "user", "content": "Explique en quelques phrases pourquoi le ciel est bleu."}]),
    ("long", [{"role": "user", "content": "Summarize the following text in two sentences.\n\n" + LONG_TEXT}]),
    ("system_multiturn", [
        {"role": "system", "content": "You are a terse assistant who answers in lists."},
        {"role": "user", "content": "Name three primary colors."},
        {"role": "assistant", "content": "- Red\n- Blue\n- Yellow"},
        {"role": "user", "content": "Now give three secondary colors and how to mix each."},
    ]),
]
