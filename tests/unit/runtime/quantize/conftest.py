"""Fixtures for the quantization runtime tests: one tiny model and evaluation set per session.

The tiny preset (4 layers, hidden 64, ~0.1 M parameters) keeps the whole directory at well
under a minute of CPU on two cores; every test that needs a model shares this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from kubeforge_runtime import contract

GROUP_SIZE = 64
"""Divides every linear layer's input width in the tiny preset (64 and 128)."""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def eval_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both record shapes the runtime accepts: "text", and "prompt" + "completion"."""
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    records = [
        {"text": "The quick brown fox jumps over the lazy dog. Kubernetes schedules pods onto nodes."},
        {"prompt": "Question: What is the capital of France? ", "completion": "Answer: Paris."},
        {"text": "Quantization stores weights in fewer bits so the model is smaller and often faster."},
        {"text": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n"},
    ] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def write_config(tmp_path: Path, tiny_model: Path, eval_jsonl: Path) -> Callable[..., Path]:
    """Write a QuantizeJob config for the tiny model; keyword overrides replace sections."""

    def write(method: str, **overrides: Any) -> Path:
        cfg: dict[str, Any] = {
            "kind": "QuantizeJob",
            "name": "demo",
            "namespace": "default",
            "model": {"uri": f"file://{tiny_model}"},
            "method": method,
            "groupSize": GROUP_SIZE,
            "calibration": {"uri": None, "samples": 128},
            "evaluation": {
                "uri": f"file://{eval_jsonl}",
                "maxPerplexityIncreasePercent": 1.0,
                "maxSamples": 64,
                "sequenceLength": 64,
            },
            "output": {"uri": f"file://{tmp_path / ('out-' + method)}"},
        }
        cfg.update(overrides)
        path = tmp_path / f"config-{method}.json"
        path.write_text(json.dumps(cfg))
        return path

    return write


@pytest.fixture
def report_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the report at a temp file instead of /dev/termination-log."""
    path = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(path))
    return path


@pytest.fixture(autouse=True)
def short_latency_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer, shorter latency passes: the tests check that latency is measured and reported,
    not its value, and generate() loops dominate the runtime on a shared 2-core machine."""
    from kubeforge_runtime.quantize import runner

    monkeypatch.setattr(runner, "LATENCY_PROMPTS", 2)
    monkeypatch.setattr(runner, "LATENCY_NEW_TOKENS", 4)
    monkeypatch.setattr(runner, "LATENCY_REPEATS", 3)
