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


def _labels_file(tmp_path: Path, yes: int, no: int) -> Path:
    import json

    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"review {i}", "completion": "yes" if i < yes else "no"}) + "\n"
                            for i in range(yes + no)) + "{broken\n")
    return path


def test_data_check_prints_a_table_and_fails_on_a_crossed_line(tmp_path):
    path = _labels_file(tmp_path, yes=10, no=3)
    out = kubeforge("data", "check", str(path), "--max-label-imbalance", "3", "--min-records", "13",
                    "--max-unparseable-share", "0.1")
    assert out.returncode == 1, out.stderr
    for words in ("label imbalance", "3.333", "FAIL", "records", "13", "pass", "unparseable share", "0.07143"):
        assert words in out.stdout, (words, out.stdout)
    assert "labelImbalance 3.33333 is above the threshold 3" in " ".join(out.stdout.split())
    assert f"{path}:14: invalid JSON" in out.stdout
    # At the threshold it passes; unset lines are measured but not judged.
    path = _labels_file(tmp_path, yes=9, no=3)
    out = kubeforge("data", "check", str(path), "--max-label-imbalance", "3")
    assert out.returncode == 0, out.stdout
    assert "note: a FineTuneJob without dataset.checks.maxUnparseableShare fails on any bad line" in out.stdout


def test_data_check_json_and_usage_errors(tmp_path):
    import json

    path = _labels_file(tmp_path, yes=4, no=4)
    out = kubeforge("data", "check", str(path), "--min-records", "9", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 1 and report["passed"] is False and report["format"] == "prompt-completion"
    assert report["violations"] == ["minRecords: records 8 is below the threshold 9"]
    out = kubeforge("data", "check", str(path), "--max-overlong-share", "0.1")
    assert out.returncode == 2 and "needs --tokenizer" in out.stderr
    out = kubeforge("data", "check", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_data_check_without_a_tokenizer_needs_no_torch(tmp_path):
    """The control plane's install has no torch: every check but overlong works there. A
    blocked import (sys.modules entry None) plays the missing package."""
    import os

    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nfor m in ('torch', 'transformers'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "kubeforge", "data", "check", str(_labels_file(tmp_path, 6, 3)),
                          "--max-label-imbalance", "2", "--max-duplicate-share", "0"],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr


def test_data_check_measures_overlong_with_a_tokenizer(tmp_path):
    from kubeforge_runtime.tiny import build_tokenizer

    build_tokenizer(tmp_path / "tok")
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "short"}\n' * 3 + '{"text": "' + "a much longer record " * 20 + '"}\n')
    args = ("data", "check", str(path), "--tokenizer", str(tmp_path / "tok"), "--sequence-length", "16")
    out = kubeforge(*args, "--max-overlong-share", "0.25")
    assert out.returncode == 0 and "1 record(s) over 16 tokens" in out.stdout, out.stdout + out.stderr
    out = kubeforge(*args, "--max-overlong-share", "0.2")
    assert out.returncode == 1 and "overlongShare 0.25 is above the threshold 0.2" in " ".join(out.stdout.split())


def test_every_example_validates_offline(capsys):
    """Every shipped example passes ``kubeforge validate`` (the API models and the fit check),
    the text-classification starter included, whose whole run CI does not repeat (its
    fine-tune is the main job's: tests/e2e/test_local_flows.py)."""
    from kubeforge.cli import main

    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert len(examples) >= 7, examples
    for path in examples:
        assert main(["validate", "-f", str(path)]) == 0, (path.name, capsys.readouterr().err)
