"""Perplexity, bytes and latency against independent computations."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubeforge_runtime import models
from kubeforge_runtime.quantize import data, metrics


class _UniformModel(torch.nn.Module):
    """Logits that are all equal: every token has probability 1/vocab, so perplexity = vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> Any:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


def test_uniform_logits_give_perplexity_equal_to_vocabulary() -> None:
    windows = [torch.arange(10), torch.arange(10), torch.arange(3)]
    result = metrics.perplexity(_UniformModel(37), windows, batch_size=2)
    assert result.tokens == 9 + 9 + 2
    assert result.perplexity == pytest.approx(37.0, rel=1e-6)


def test_perplexity_matches_the_models_own_loss(tiny_model: Path, eval_jsonl: Path) -> None:
    model = models.load_causal_lm(tiny_model).eval()
    tokenizer = models.load_tokenizer(tiny_model)
    texts = data.load_texts(f"file://{eval_jsonl}", 64)
    windows = data.make_windows(tokenizer, texts, 24)
    assert len({len(w) for w in windows}) == 2, "want a shorter last window to exercise batching"
    result = metrics.perplexity(model, windows, batch_size=3)

    # Independent: transformers' own shifted cross-entropy per window, token-weighted.
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            loss = model(input_ids=window[None], labels=window[None]).loss
            nll += float(loss) * (len(window) - 1)
            count += len(window) - 1
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_windows_cover_the_records_joined_by_eos(tiny_model: Path) -> None:
    tokenizer = models.load_tokenizer(tiny_model)
    texts = ["hello world", "the quick brown fox"]
    windows = data.make_windows(tokenizer, texts, 4)
    stream = [t for w in windows for t in w.tolist()]
    expected: list[int] = []
    for text in texts:
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream == expected
    assert all(len(w) == 4 for w in windows[:-1])


def test_records_may_be_prompt_and_completion(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "Q: 2+2? ", "completion": "A: 4"}\n\n{"text": "plain"}\n{"text": "dropped"}\n')
    assert data.load_texts(str(path), 2) == ["Q: 2+2? A: 4", "plain"]
    (tmp_path / "bad.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(data.EvaluationDataError, match="'text'"):
        data.load_texts(str(tmp_path / "bad.jsonl"), 2)


def test_without_a_uri_the_bundled_reference_text_is_used() -> None:
    """Real prose with its provenance, shipped as package data, and in no starter's training file."""
    import json
    from importlib.resources import files

    records = [json.loads(line) for line in
               files("kubeforge_runtime").joinpath("assets", data.REFERENCE_TEXT).read_text().splitlines()]
    assert len(records) >= 30 and all(r["source"] and r["license"] and len(r["text"]) >= 200 for r in records)
    texts = data.load_texts(None, 64)
    assert texts == [r["text"] for r in records] and data.load_texts(None, 5) == texts[:5]
    starters = Path(__file__).resolve().parents[4] / "examples" / "volumes" / "data"
    training = " ".join(p.read_text() for p in starters.glob("*.jsonl"))
    assert not any(t[:80] in training for t in texts)


def test_state_dict_bytes_counts_plain_tensors() -> None:
    layer = torch.nn.Linear(8, 4)  # 32 + 4 float32 values
    assert metrics.state_dict_bytes(layer) == 36 * 4


def test_latency_reports_the_median_of_the_timed_runs(tiny_model: Path) -> None:
    model = models.load_causal_lm(tiny_model).eval()
    prompts = [torch.arange(3, 11)]
    result = metrics.latency(model, prompts, new_tokens=4, warmup=1, repeats=3, pad_token_id=0)
    assert len(result.runs_ms_per_token) == 3 and result.warmup == 1
    assert result.ms_per_token == sorted(result.runs_ms_per_token)[1] > 0
