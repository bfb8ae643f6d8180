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
"""A figure that measuring the tiny model on the records below does not give (f1 over four
records whose references its random weights do not write): a report holding it took it from
the lineage record."""


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
    config = write_config("bf16", model={"uri": f"file://{model}"})  # the cheapest method: the figure is what is tested
    cfg = json.loads(config.read_text())
    cfg["evaluation"].update(task={"uri": f"file://{task_file}", "metric": "f1", "maxSamples": 4},
                             maxAccuracyDropPoints=100)
    config.write_text(json.dumps(cfg))
    assert runner.main(["--config", str(config)]) == contract.EXIT_OK
    report = json.loads(report_file.read_text())
    assert report["task"]["before"] == RECORDED and report["task"]["beforeSource"].startswith("lineage of FineTuneJob")
    assert "from its lineage" in report["message"]
    assert report["taskDropPoints"] == pytest.approx((RECORDED - report["task"]["after"]) * 100)
    # A job that measures its input says so too: test_quantize_runner.py's task-metric test
    # (its tiny model has no lineage record); the cases that refuse the record are above.
