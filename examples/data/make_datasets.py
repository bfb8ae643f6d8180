"""Generate the small example datasets shipped in examples/data/ (deterministic).

The records are templated facts with a learnable structure (counting, arithmetic, capitals,
sentiment labels), so a fine-tune of the tiny test model lowers its validation loss within
a few dozen steps on a CPU. Used by the runtime tests and the examples; regenerate with

    python examples/data/make_datasets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"),
    ("Canada", "Ottawa"), ("India", "New Delhi"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"),
]
GOOD = ["wonderful", "great", "delightful", "excellent", "lovely", "fantastic"]
BAD = ["terrible", "awful", "boring", "dreadful", "poor", "disappointing"]
THINGS = ["movie", "meal", "book", "service", "concert", "hotel"]


def text_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            a = rng.randrange(1, 20)
            out.append({"text": "Counting: " + " ".join(str(a + i) for i in range(8)) + "."})
        elif kind == 1:
            country, capital = rng.choice(CAPITALS)
            out.append({"text": f"The capital of {country} is {capital}. {capital} is in {country}."})
        else:
            a, b = rng.randrange(10), rng.randrange(10)
            out.append({"text": f"Question: What is {a} plus {b}? Answer: {a + b}."})
    return out


def prompt_completion_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(GOOD if positive else BAD)
        thing = rng.choice(THINGS)
        out.append({"prompt": f"Review: The {thing} was {word}.\nSentiment:",
                    "completion": " positive" if positive else " negative"})
    return out


def chat_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        country, capital = rng.choice(CAPITALS)
        msgs = [{"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {capital}."}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "Answer briefly."})
        out.append({"messages": msgs})
    return out


def write(name: str, records: list[dict]) -> None:
    with (HERE / name).open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def main() -> None:
    write("text.jsonl", text_records(random.Random(1), 400))
    write("prompt_completion.jsonl", prompt_completion_records(random.Random(2), 300))
    write("chat.jsonl", chat_records(random.Random(3), 300))


if __name__ == "__main__":
    main()
