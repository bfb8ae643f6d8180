"""The kubeforge command line, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from kubeforge import __version__

REPO = Path(__file__).resolve().parents[2]


def kubeforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubeforge", *args], capture_output=True, text=True, cwd=REPO)


def test_help_lists_commands():
    out = kubeforge("--help")
    assert out.returncode == 0
    for cmd in ("version", "crds", "operator", "validate"):
        assert cmd in out.stdout


def test_version():
    out = kubeforge("version")
    assert out.returncode == 0 and out.stdout.strip() == f"kubeforge {__version__} (API kubeforge.io/v1alpha1)"


def test_crds_prints_all_three_matching_the_files():
    out = kubeforge("crds")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["spec"]["names"]["kind"] for d in docs] == ["FineTuneJob", "QuantizeJob", "InferenceService"]
    files = {yaml.safe_load(p.read_text())["metadata"]["name"]: yaml.safe_load(p.read_text())
             for p in (REPO / "crds").glob("*.yaml")}
    for d in docs:
        assert files[d["metadata"]["name"]] == d


def test_validate_reports_errors_with_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
        "spec": {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"},
                 "output": {"uri": "pvc://m/o"}, "nodes": {"min": 4, "max": 2}},
    }))
    out = kubeforge("validate", "-f", str(bad))
    assert out.returncode == 1
    assert "nodes.min must be less than or equal to nodes.max" in out.stderr
