"""Whole flows without a cluster: the rendered pods run as real processes.

* the FineTuneJob builder's pod spec for a 2-node job runs to completion with only the
  rendezvous host mapped (so the operator's command, arguments and environment train),
  with DDP and with DeepSpeed ZeRO-3 partitioning across the two "nodes";
* ``kubeforge run -f examples/pipeline.yaml`` - the README's main job - completes the chain
  fine-tune -> quantize -> serve and prints a generated answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.torchrun


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero3"])
def test_two_node_rendered_pod_spec_trains(strategy: str, tmp_path: Path):
    from kubeforge.builders import finetune as b
    from kubeforge.local.runner import LocalRunner
    from kubeforge.manifests import parse_resource

    doc = {
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "two-node"},
        "spec": {
            "model": {"uri": "pvc://models/base"},
            "dataset": {"uri": "pvc://data/text-classification.jsonl", "format": "prompt-completion",
                        "sequenceLength": 64},
            "method": "full", "parallelism": {"strategy": strategy},
            "nodes": {"min": 2, "max": 2}, "procsPerNode": 1,
            "training": {"maxSteps": 4, "globalBatchSize": 4, "microBatchSize": 2, "learningRate": 0.001,
                         "precision": "fp32"},
            "checkpoint": {"intervalSteps": 2, "keepLast": 1},
            "output": {"uri": "pvc://models/two-node", "format": "merged"},
        },
    }
    res = parse_resource(doc)
    # What the cluster would run: the builder's own pod spec.
    children = b.build(res.name, "default", "uid-1", res.spec)
    job = next(c for c in children if c["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert "--nnodes=2:2" in container["command"] + container.get("args", [])

    runner = LocalRunner(workdir=tmp_path, seed_volumes=REPO / "examples" / "volumes", progress=False)
    result = runner.run_resource(res)
    out = tmp_path / "pvc" / "models" / "two-node"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    lineage = json.loads((out / "kubeforge.json").read_text())
    assert lineage["steps"] == 4
    assert lineage["parallel"]["strategy"] == strategy and lineage["parallel"]["data"] == 2
    assert result.report.get("step") == 4
    # Both "pods" took part: each wrote its own log, and each ran torchrun with world size 2.
    for log in result.logs:
        assert log.exists() and log.stat().st_size > 0


@pytest.mark.timeout(1200)
def test_main_job_runs_the_whole_chain(tmp_path: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "kubeforge", "run", "-f", str(REPO / "examples" / "pipeline.yaml"),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1150,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "FineTuneJob/sentiment-ft succeeded" in out.stderr
    assert "gate passed" in out.stderr
    assert "answer:" in out.stderr
    answer = out.stdout.strip().splitlines()[-1].strip()
    # The fine-tune taught the tiny random model the label vocabulary of the data set.
    assert answer in ("positive", "negative"), f"unexpected answer {answer!r}"
    run_dir = tmp_path / "pipeline" / "pvc" / "models"
    assert (run_dir / "sentiment-ft" / "config.json").exists()
    assert (run_dir / "sentiment-int8" / "config.json").exists()
