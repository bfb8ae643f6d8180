"""Generate the three starter datasets in examples/volumes/data/ (deterministic, no downloads).

* text-classification.jsonl  - prompt-completion: a short review -> " positive"/" negative"
* question-answering.jsonl   - chat: a question about a small fact table -> its answer
* code-generation.jsonl      - prompt-completion: a one-line task -> a Python function

Each set is small (a few hundred records) so a fine-tune of the tiny model finishes on a CPU
in a minute; the structure is regular enough that the loss visibly falls. Regenerate with
``python examples/make_starters.py``. ``kubeforge run`` seeds each pvc:// claim from
``examples/volumes/<claim>``, so ``pvc://data/code-generation.jsonl`` is the file here..
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "poor", "disappointing", "bland", "broken"]
THINGS = ["movie", "book", "hotel", "meal", "concert", "phone", "game", "service", "course", "show"]

FACTS = {
    "France": ("Paris", "euro"), "Japan": ("Tokyo", "yen"), "Kenya": ("Nairobi", "shilling"),
    "Peru": ("Lima", "sol"), "Norway": ("Oslo", "krone"), "India": ("New Delhi", "rupee"),
    "Egypt": ("Cairo", "pound"), "Canada": ("Ottawa", "dollar"), "Poland": ("Warsaw", "zloty"),
    "Chile": ("Santiago", "peso"), "Vietnam": ("Hanoi", "dong"), "Morocco": ("Rabat", "dirham"),
}

OPS = [("add", "+", "sum of"), ("sub", "-", "difference of"), ("mul", "*", "product of")]


def classification(rng: random.Random, n: int = 400) -> list[dict]:
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        thing = rng.choice(THINGS)
        rows.append({"prompt": f"Review: The {thing} was {word}.\nSentiment:",
                     "completion": " positive" if positive else " negative"})
    return rows


def question_answering(rng: random.Random, n: int = 300) -> list[dict]:
    rows = []
    for _ in range(n):
        country = rng.choice(sorted(FACTS))
        capital, currency = FACTS[country]
        if rng.random() < 0.5:
            q, a = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
        else:
            q, a = f"What currency does {country} use?", f"{country} uses the {currency}."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def code_generation(rng: random.Random, n: int = 300) -> list[dict]:
    rows = []
    for _ in range(n):
        name, op, words = rng.choice(OPS)
        a, b = rng.choice("xyabmn"), rng.choice("pqrstuv")
        rows.append({"prompt": f"# Write a function {name}({a}, {b}) returning the {words} {a} and {b}.\n",
                     "completion": f"def {name}({a}, {b}):\n    return {a} {op} {b}\n"})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(1234)
    write(HERE / "volumes" / "data" / "text-classification.jsonl", classification(rng))
    write(HERE / "volumes" / "data" / "question-answering.jsonl", question_answering(rng))
    write(HERE / "volumes" / "data" / "code-generation.jsonl", code_generation(rng))


if __name__ == "__main__":
    main()
