"""Prompts shared by the reference generators (dev-time; see gen_llamacpp_refs.py): SmolLM2 chat prompts
and raw text prompts for base models."""

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

# Raw (no chat template) prompts for base models such as Gemma 3 270M; see gen_llamacpp_refs.py --model gemma3.
# Each entry: (name, text). The tokenizer adds BOS itself. "long" is ~300 tokens; "window" is ~540 tokens so
# that, with Gemma 3's 512-token sliding window, the rows that predict the generated tokens attend across the
# window edge in the local layers (while the global layers still see the whole sequence).
LONG_RAW = (
    "The printing press reached Venice in 1469, barely fifteen years after Gutenberg finished his Bible in "
    "Mainz, and within a generation the city had become the busiest centre of printing in Europe. More than "
    "a hundred and fifty workshops operated there by 1500, crowded into the streets between the Rialto and "
    "San Marco. Venetian printers enjoyed several advantages: the republic was wealthy, its merchants could "
    "finance long print runs, its ships carried books to every port of the Mediterranean, and its government "
    "granted privileges that protected a printer's edition from copies for a number of years. The most famous "
    "of these printers, Aldus Manutius, arrived in the 1490s with the ambition of publishing the Greek "
    "classics in reliable editions. He hired scholars who had fled Constantinople, commissioned a new Greek "
    "typeface, and in 1501 introduced a slanted, compact letter that we now call italic. His small octavo "
    "volumes, cheap enough for students and light enough to carry, changed how people read: a book no longer "
    "had to sit on a lectern in a library but could travel in a coat pocket. Competitors soon copied his "
    "designs, sometimes line for line, and Aldus complained bitterly about the counterfeits printed in Lyon. "
    "By the middle of the sixteenth century, however, censorship, rising costs and competition from "
    "printers in Antwerp, Paris and Frankfurt had begun to erode the Venetian lead, and"
)

WINDOW_RAW = (
    "Chapter One. The lighthouse on Gull Point had been dark for eleven years when Mara Ellison bought it at "
    "auction for less than the price of a used car. Everyone in the village of Westerhaven told her it was a "
    "mistake. The stone tower leaned a little to the east, the keeper's cottage had lost half its roof in the "
    "storm of 2009, and the only road to the point washed out every spring when the marsh flooded. Mara "
    "listened politely, thanked them for their advice, and moved in anyway, with two suitcases, a box of "
    "tools, and a cat named Ferdinand who disliked the sea.\n\n"
    "The first winter was hard. She slept in the kitchen, the one room whose windows still closed, and heated "
    "it with an iron stove that smoked whenever the wind came from the north. In the mornings she climbed the "
    "hundred and twelve steps of the tower to look at the lamp room, where the great brass lens still sat in "
    "its cradle, green with salt and covered in the droppings of gulls. She wanted to see it lit.\n\n"
    "Old Tobias Wren, who had been the last keeper, lived in a small house behind the harbour. He was ninety "
    "years old and nearly blind, but when Mara knocked on his door in February and told him what she "
    "planned, he laughed for a long time and then invited her in for tea. He explained how the clockwork "
    "had turned the lens, how the weights had to be wound every four hours through the night, how the wicks "
    "were trimmed and the glass polished with a soft cloth and a little spirit. He drew diagrams on the backs "
    "of envelopes, his hand shaking, and told her which parts would have rusted and which could be saved.\n\n"
    "By April the roof of the cottage was whole again and the road had dried. Mara spent the spring taking "
    "the clockwork apart, piece by piece, laying every gear and spring on an old sheet in the order she had "
    "removed them. The lens she cleaned last, panel by panel, over three weeks, until the morning sun "
    "passing through it threw bright bands of colour across the floor of the lamp room and Ferdinand "
    "chased them from wall to wall.\n\n"
    "In the middle of June, on the shortest night of the year, she invited the village to the point. Nearly "
    "everyone came, some out of curiosity and some, she suspected, hoping to see her fail. Tobias Wren was "
    "driven up in his grandson's truck and sat in a folding chair at the foot of the tower, wrapped in a "
    "blanket. At half past ten, when the sky had finally gone dark, Mara climbed the steps, lit the lamp, "
    "released the brake on the clockwork, and"
)

RAW_PROMPTS = [
    ("encyclopedia", "Photosynthesis is the process by which green plants, algae and some bacteria convert light "
                     "energy into chemical energy. During photosynthesis,"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number (fibonacci(0) == 0).\"\"\"\n"
             "    if n < 2:\n        return n\n"),
    ("list", "Things to pack for a weekend camping trip:\n1. A tent and sleeping bag\n2. A flashlight with spare "
             "batteries\n3."),
    ("french", "La tour Eiffel, construite pour l'Exposition universelle de 1889 à Paris, est"),
    ("math", "Theorem. For every positive integer n, 1 + 2 + ... + n = n(n + 1)/2.\nProof. We argue by "
             "induction on n. For n = 1,"),
    ("dialogue", "Alice: Did you remember to bring the map?\nBob: I thought you had it. You said you would "
                 "print it last night.\nAlice:"),
    ("turns", "<start_of_turn>user\nWhat is the capital of Japan?<end_of_turn>\n<start_of_turn>model\n"),
    ("long", LONG_RAW),
    ("window", WINDOW_RAW),
]
