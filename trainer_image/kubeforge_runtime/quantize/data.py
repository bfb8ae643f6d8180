"""Evaluation data for a QuantizeJob: read texts, cut token windows, pick latency prompts.

Called by the runner and the benchmark. The evaluation set is JSONL (a file, or a directory
of ``*.jsonl`` files read in name order): each record has ``"text"``, or ``"prompt"`` and
``"completion"`` (concatenated, as a fine-tuning record is). The first ``maxSamples``
records are tokenized, joined with the EOS token and cut into windows of
``sequenceLength`` tokens; a final shorter window is kept if it has at least two tokens.
With no evaluation URI a small built-in English text is used, which is enough to compare a
model with its quantized self but says nothing about task quality - give a real set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import storage

log = logging.getLogger(__name__)


class EvaluationDataError(ValueError):
    """The evaluation set cannot be used; the message says what to change."""


BUILTIN_TEXT: tuple[str, ...] = (
    "The river runs past the old mill and under the stone bridge before it reaches the sea. "
    "In spring the water rises and the fields along its banks turn green again.",
    "A scheduler places each pod on a node that has room for it. When a node fails, the "
    "controller notices the missing pods and creates new ones somewhere else.",
    "Question: What is the boiling point of water at sea level? Answer: One hundred degrees "
    "Celsius. Question: How many days are in a week? Answer: Seven.",
    "def mean(values):\n    total = sum(values)\n    return total / len(values)\n\n"
    "print(mean([1, 2, 3, 4]))\n",
    "She opened the window, listened to the rain for a while, and then went back to the "
    "letter she had been writing since the morning.",
    "Smaller numbers take less memory. A weight stored in eight bits instead of thirty-two "
    "needs a quarter of the space, and a good method loses very little accuracy.",
    "The committee met on Tuesday to discuss the budget for next year. Most members agreed "
    "that the library should stay open later in the evening.",
    "To make bread, mix flour, water, salt and yeast, knead the dough until it is smooth, "
    "let it rise for an hour, shape it, and bake it in a hot oven.",
)


def _record_text(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise EvaluationDataError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"] + record["completion"]
    raise EvaluationDataError(
        f"{where}: a record needs a string 'text', or strings 'prompt' and 'completion'; "
        f"got keys {sorted(record)}"
    )


def load_texts(uri: str | None, max_samples: int) -> list[str]:
    """The first ``max_samples`` evaluation texts at ``uri`` (built-in text when None)."""
    if uri is None:
        log.info("no evaluation.uri: using the built-in text (%d passages)", len(BUILTIN_TEXT))
        return list(BUILTIN_TEXT[:max_samples])
    path = storage.resolve(uri)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise EvaluationDataError(f"{uri!r}: directory {path} holds no *.jsonl files")
    texts: list[str] = []
    for file in files:
        with Path(file).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if len(texts) >= max_samples:
                    return texts
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvaluationDataError(f"{where}: not valid JSON ({exc})") from exc
                texts.append(_record_text(record, where))
    if not texts:
        raise EvaluationDataError(f"{uri!r}: no records found")
    return texts


def make_windows(tokenizer: Any, texts: list[str], sequence_length: int) -> list[Any]:
    """Tokenize, join with EOS, cut into windows of ``sequence_length`` token ids."""
    import torch

    stream: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    windows = [
        torch.tensor(stream[start : start + sequence_length], dtype=torch.long)
        for start in range(0, len(stream), sequence_length)
    ]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise EvaluationDataError("the evaluation texts tokenize to fewer than two tokens")
    return windows


def latency_prompts(windows: list[Any], count: int = 4, length: int = 32) -> list[Any]:
    """The first ``count`` windows cut to ``length`` tokens: the same prompts before and after."""
    return [w[:length] for w in windows[:count]]
