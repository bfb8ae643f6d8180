"""``kubeforge run`` runs a FineTuneJob's data gate pod first, as a cluster does: a crossed
red line stops the run with DataQualityFailed before any worker process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.local.runner import LocalRunError, LocalRunner
from kubeforge.manifests import parse_resource


def test_a_crossed_red_line_stops_the_local_run_before_any_worker(tmp_path: Path) -> None:
    from kubeforge_runtime.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", preset="tiny", seed=0)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"review {i}", "completion": "yes" if i % 5 else "no"}) + "\n"
                            for i in range(20)))
    res = parse_resource({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "gated"},
        "spec": {"model": {"uri": f"file://{model}"},
                 "dataset": {"uri": f"file://{data}", "format": "prompt-completion",
                             "checks": {"maxLabelImbalance": 2, "minRecords": 10}},
                 "output": {"uri": f"file://{tmp_path / 'out'}"}, "nodes": {"min": 2, "max": 2}},
    })
    runner = LocalRunner(workdir=tmp_path / "run", progress=False)
    with pytest.raises(LocalRunError, match="DataQualityFailed") as err:
        runner.run_resource(res)
    assert "maxLabelImbalance: labelImbalance 4 is above the threshold 2" in str(err.value)
    pod_dir = tmp_path / "run" / "pods" / "finetunejob-gated"
    assert (pod_dir / "datacheck.log").exists()
    assert not list(pod_dir.glob("worker-*.log"))  # no worker ever started
    assert not (tmp_path / "out").exists()
