"""The QuantizeJob takes its input's task figure from the input's lineage only when that
record measured the very same files on the same records with the same evaluator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from kubeforge_runtime import contract
from kubeforge_runtime import lineage as lineage_mod
from kubeforge_runtime.quantize import inherited, runner

RECORDED = 0.123
"""A figure no measurement of the tiny model gives here (its f1 on the references below is
well above it): a report holding it took it from the lineage record, not from a measurement."""


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"})
                            + "\n" for i in range(4)))
    return path


def fine_tuned(tiny_model: Path, tmp_path: Path, task_file: Path, **evaluation: Any) -> Path:
    """A copy of the tiny model with the sealed lineage record a FineTuneJob writes (its
    evaluation measured on ``task_file``), fields of ``evaluation`` overriding."""
    out = tmp_path / "fine-tuned"
    shutil.copytree(tiny_model, out)
    record = {
        "kind": "FineTuneJob", "name": "ft", "namespace": "default",
        "evaluation": {"uri": f"file://{task_file}", "metric": "f1", "maxSamples": 4, "before": 0.0,
                       "after": RECORDED, "samples": 4, "dataDigest": lineage_mod.file_digest(task_file),
                       **evaluation},
        "code": lineage_mod.code_version(),
        "output": {"uri": f"file://{out}", **lineage_mod.model_files_digest(out)},
    }
    lineage_mod.write(out, lineage_mod.seal(record))
    return out


def recorded(model_dir: Path, task_file: Path, metric: str = "f1", max_samples: int = 4) -> tuple[Any, str]:
    digest = lineage_mod.model_files_digest(model_dir)["digest"]
    return inherited.recorded_task_metric(model_dir, digest, task_file, metric, max_samples)


def test_the_recorded_figure_is_taken_when_files_records_and_evaluator_match(
    tiny_model: Path, tmp_path: Path, task_file: Path
) -> None:
    model = fine_tuned(tiny_model, tmp_path, task_file)
    result, source = recorded(model, task_file)
    assert result == {"metric": "f1", "value": RECORDED, "samples": 4}
    assert source.startswith("lineage of FineTuneJob default/ft (sha256:")


@pytest.mark.parametrize("change", ["data", "model", "metric", "samples", "tampered", "no-digest", "code", "none"])
def test_anything_different_means_measuring_again(
    change: str, tiny_model: Path, tmp_path: Path, task_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fine_tuned(tiny_model, tmp_path, task_file, **({"dataDigest": None} if change == "no-digest" else {}))
    metric, max_samples = ("exactMatch" if change == "metric" else "f1"), (3 if change == "samples" else 4)
    if change == "data":
        task_file.write_text(task_file.read_text().replace(" 6", " 7"))
    elif change == "model":
        (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    elif change == "tampered":
        record = json.loads((model / lineage_mod.LINEAGE_FILE).read_text())
        record["evaluation"]["after"] = 0.99
        (model / lineage_mod.LINEAGE_FILE).write_text(json.dumps(record))
    elif change == "code":
        monkeypatch.setattr(lineage_mod, "code_version", lambda: {"package": "kubeforge", "version": "0", "commit": None})
    elif change == "none":
        (model / lineage_mod.LINEAGE_FILE).unlink()
    result, why = recorded(model, task_file, metric, max_samples)
    assert result is None and why, why


def test_the_runner_reports_where_the_input_figure_came_from(
    write_config: Callable[..., Path], report_file: Path, tiny_model: Path, tmp_path: Path, task_file: Path
) -> None:
    model = fine_tuned(tiny_model, tmp_path, task_file)
    config = write_config("int8-weight-only", model={"uri": f"file://{model}"})
    cfg = json.loads(config.read_text())
    cfg["evaluation"].update(task={"uri": f"file://{task_file}", "metric": "f1", "maxSamples": 4},
                             maxAccuracyDropPoints=100)
    config.write_text(json.dumps(cfg))
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    assert report["task"]["before"] == RECORDED and report["task"]["beforeSource"].startswith("lineage of FineTuneJob")
    assert "from its lineage" in report["message"]
    assert report["taskDropPoints"] == pytest.approx((RECORDED - report["task"]["after"]) * 100)

    # The same job on other records measures the input itself and says so.
    other = tmp_path / "other.jsonl"
    other.write_text(task_file.read_text())
    other.write_text(other.read_text().replace(" 6", " 7"))
    cfg["evaluation"]["task"]["uri"] = f"file://{other}"
    config.write_text(json.dumps(cfg))
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    assert report["task"]["beforeSource"] == inherited.MEASURED and report["task"]["before"] != RECORDED
    assert "from its lineage" not in report["message"]
