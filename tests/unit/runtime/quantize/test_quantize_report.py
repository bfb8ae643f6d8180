"""The compact report: where it goes and that it fits a termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge_runtime import contract
from kubeforge_runtime.quantize import report


def test_a_long_message_is_shortened_to_fit_the_termination_message() -> None:
    body = {"method": "int8-dynamic", "reason": "InternalError", "message": "x" * 10_000, "perplexity": {"before": 1.23456789}}
    text = report.compact(body)
    assert len(text.encode()) <= report.MAX_REPORT_BYTES - 1024
    parsed = json.loads(text)
    assert parsed["message"].endswith("...") and parsed["perplexity"]["before"] == 1.23457


def test_non_finite_numbers_become_null() -> None:
    assert json.loads(report.compact({"perplexityIncreasePercent": float("nan")}))["perplexityIncreasePercent"] is None


def test_without_override_or_termination_log_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(contract.ENV_REPORT_PATH, raising=False)
    monkeypatch.setattr(contract, "TERMINATION_LOG", str(tmp_path / "absent" / "termination-log"))
    assert report.write_compact({"reason": "Succeeded"}) is None
    assert not (tmp_path / "absent").exists()
    existing = tmp_path / "termination-log"
    existing.touch()
    monkeypatch.setattr(contract, "TERMINATION_LOG", str(existing))
    assert report.write_compact({"reason": "Succeeded"}) == existing
    assert json.loads(existing.read_text()) == {"reason": "Succeeded"}
