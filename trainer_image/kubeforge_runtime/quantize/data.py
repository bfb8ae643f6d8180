"""Evaluation data for a QuantizeJob: read texts, cut token windows, pick latency prompts.

Called by the runner and the benchmark. The evaluation set is JSONL (a file, or a directory
of ``*.jsonl`` files read in name order): each record has ``"text"``, or ``"prompt"`` and
``"completion"`` (concatenated, as a fine-tuning record is). The first ``maxSamples``
records are tokenized, joined with the EOS token and cut into windows of
``sequenceLength`` tokens; a final shorter window is kept if it has at least two tokens.
With no evaluation URI the bundled reference text is used (``assets/reference-text.jsonl``:
40 paragraphs of real English prose, none written by this project and none in a starter's
training data - CPython's Language Reference and permissively licensed packages'
descriptions, each record naming its source and licence; ``hack/make-reference-text.py``
says how it was made). That is enough to compare a model with its quantized self, but says
nothing about task quality - give the task's own held-out set for that.
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


REFERENCE_TEXT = "reference-text.jsonl"
"""Real English prose in ``kubeforge_runtime/assets/``: 40 paragraphs from CPython's Language
Reference (``pydoc_data.topics``) and from permissively licensed packages' descriptions, each
record with its ``source`` and ``license`` (how it was made: ``hack/make-reference-text.py``)."""


def reference_texts() -> list[str]:
    """The paragraphs of the bundled reference text, in file order."""
    from importlib.resources import files

    lines = files("kubeforge_runtime").joinpath("assets", REFERENCE_TEXT).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


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
    """The first ``max_samples`` evaluation texts at ``uri`` (the bundled reference text when None)."""
    if uri is None:
        texts = reference_texts()
        log.info("no evaluation.uri: using the bundled reference text (%d of %d paragraphs)",
                 min(max_samples, len(texts)), len(texts))
        return texts[:max_samples]
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
