"""Whole flows without a cluster: the rendered pods run as real processes.

* the FineTuneJob builder's pod spec for a 2-node job runs to completion with only the
  rendezvous host mapped (so the operator's command, arguments and environment train),
  with DDP and with DeepSpeed ZeRO-3 partitioning across the two "nodes" (tiny model);
* ``kubeforge run -f examples/pipeline.yaml`` - the README's main job - fine-tunes the
  embedded SmolLM2-135M-Instruct with LoRA, quantizes it to int8 and serves it: the held-out
  accuracy rises to at least 90 % and by at least 20 points, the quantized model keeps it
  (the QuantizeJob takes the fine-tuned model's figure from its lineage rather than measuring it again),
  a positive and a negative review get different, right answers, the data red lines and
  redaction counts are reported, and ``kubeforge audit`` prints the verified chain of the
  three resources;
* the question-answering and code-generation starters run end to end with short settings,
  and their held-out metric rises (the classification starter's fine-tune is the main job's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.torchrun


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero3"])
def test_two_node_rendered_pod_spec_trains(strategy: str, tmp_path: Path, tiny_model: Path):
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

    runner = LocalRunner(workdir=tmp_path, seed_volumes=REPO / "examples" / "volumes", model_dir=tiny_model,
                         progress=False)
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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubeforge_runtime.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", preset="tiny", seed=0)


def run_file(path: Path, workdir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``kubeforge run -f PATH`` as a user runs it (pvc://data seeded from examples/volumes).

    It runs in a session of its own. Each local pod (torchrun, the server) runs in a process
    group of its own too, which no signal to ``kubeforge run`` alone reaches; ``kubeforge run``
    stops them on SIGTERM. So on the timeout, or when the test itself is stopped, its group
    gets SIGTERM first, then SIGKILL after a grace period: no training process outlives the
    test and competes with the next one for the CPU."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge", "run", "-f", str(path), "--workdir", str(workdir),
         "--volumes", str(REPO / "examples" / "volumes")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        cwd=workdir, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stop_group(proc: subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM to ``proc``'s process group (``kubeforge run`` then stops its pods), SIGKILL
    after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    except ProcessLookupError:
        pass


def lineage(run_dir: Path, output: str) -> dict:
    return json.loads((run_dir / "pvc" / "models" / output / "kubeforge.json").read_text())


@pytest.mark.timeout(1200)
def test_main_job_runs_the_whole_chain(tmp_path: Path):
    out = run_file(REPO / "examples" / "pipeline.yaml", tmp_path, 1150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "FineTuneJob/sentiment-ft succeeded" in out.stderr and "gate passed" in out.stderr
    run_dir = tmp_path / "pipeline"
    tuned = lineage(run_dir, "sentiment-ft")["evaluation"]
    assert tuned["metric"] == "accuracy" and tuned["samples"] == 100
    assert tuned["after"] >= 0.90 and tuned["after"] - tuned["before"] >= 0.20, tuned
    report = json.loads((run_dir / "pvc" / "models" / "sentiment-int8" / "quantization-report.json").read_text())
    # The fine-tune measured the very model the QuantizeJob reads, on the same records: its
    # figure is taken from the lineage, not measured again (quantize/inherited.py).
    assert report["task"]["before"] == tuned["after"], report["task"]
    assert report["task"]["beforeSource"].startswith("lineage of FineTuneJob default/sentiment-ft"), report["task"]
    assert report["taskDropPoints"] <= 2 and report["gatePassed"]
    assert "held-out accuracy: base" in out.stderr
    # The data red lines were measured before training and the redaction counts reported.
    assert "data red lines passed (5 checked): records 600" in out.stderr, out.stderr[-3000:]
    assert "dataset.redact: email 0, phone 0, ipAddress 0, creditCard 0, idNumber 0" in out.stderr
    assert lineage(run_dir, "sentiment-ft")["dataset"]["quality"]["passed"] is True
    # The two sample reviews (one positive, one negative) got different, right answers.
    answers = out.stdout.strip().splitlines()[-2:]
    assert answers == ["positive", "negative"], out.stdout[-2000:]
    # The audit chain of the main job's three resources, from this run's outputs (README "Audit").
    audit = subprocess.run([sys.executable, "-m", "kubeforge", "audit", "inferenceservice/sentiment",
                            "-f", str(REPO / "examples" / "pipeline.yaml"), "--workdir", str(tmp_path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    chain = audit.stdout
    assert (chain.index("FineTuneJob default/sentiment-ft") < chain.index("QuantizeJob default/sentiment-int8")
            < chain.index("InferenceService default/sentiment")), chain
    assert chain.count("digests verified") == 2 and "after redaction sha256:" in chain, chain


SHORT = {"maxSteps": 12}
EVAL_SAMPLES = {"question-answering": 16, "code-generation": 30}
"""Held-out records per evaluation in the starters' short runs. Each evaluation decodes its
records as one batch until every row is done, so its cost is about proportional to the rows.
Question answering: 16 (was 30; measured 0 of 16 right before training, 8 of 16 after). Code
generation keeps 30: with 16 its base model passed 2, and the run after training was not
measured to the end (it outlived the test's limit on a machine at load 10-18)."""


# The text-classification starter is not run here: its fine-tune (same data file, format,
# sequence length, metric, LoRA, fsdp) is the main job's above, which asserts more of it;
# what else it holds (validationSplit, serving by fineTuneJobRef) the two starters below run,
# and tests/unit/test_cli.py validates the file itself.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("starter", ["question-answering", "code-generation"])
def test_starter_runs_end_to_end(starter: str, tmp_path: Path):
    docs = list(yaml.safe_load_all((REPO / "examples" / f"starter-{starter}.yaml").read_text()))
    ft = docs[0]["spec"]
    ft["training"].update(SHORT)  # short settings: fewer steps and held-out records than the README's runs
    ft["evaluation"]["maxSamples"] = EVAL_SAMPLES[starter]
    path = tmp_path / f"{starter}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = run_file(path, tmp_path, 1150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    ev = lineage(tmp_path / starter, starter)["evaluation"]
    assert ev["metric"] == ft["evaluation"]["metric"] and ev["samples"] == EVAL_SAMPLES[starter]
    assert ev["after"] > ev["before"], ev
    assert "sample request" in out.stderr and out.stdout.strip()
