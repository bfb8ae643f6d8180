"""The pod contract's own rules (kubeforge_runtime/contract.py), shared by both sides."""

from __future__ import annotations

from pathlib import Path

from kubeforge_runtime import contract


def test_termination_log_is_the_override_else_the_kubelets_file_else_nowhere(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(contract.ENV_REPORT_PATH, str(tmp_path / "report.json"))
    assert contract.termination_log_path() == tmp_path / "report.json"

    monkeypatch.delenv(contract.ENV_REPORT_PATH)
    kubelet_file = tmp_path / "termination-log"
    monkeypatch.setattr(contract, "TERMINATION_LOG", str(kubelet_file))
    assert contract.termination_log_path() is None  # outside a pod: never create it
    kubelet_file.touch()
    assert contract.termination_log_path() == kubelet_file


def test_exit_codes_are_distinct_and_in_range():
    codes = {contract.EXIT_OK, contract.EXIT_CONFIG_ERROR, contract.EXIT_QUALITY_GATE_FAILED}
    assert len(codes) == 3 and all(0 <= c < 126 for c in codes)
