"""The operator process against the real control plane: acceptance and surviving restarts."""

from __future__ import annotations

import yaml

import pytest

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster


def ftj(name: str, lr: float = 1e-4) -> str:
    return yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                 "output": {"uri": "pvc://models/out"}, "training": {"learningRate": lr}},
    })


def accepted_generation(cluster, namespace: str, name: str) -> int | None:
    obj = get_json(cluster, "-n", namespace, "finetunejob", name)
    status = obj.get("status", {})
    cond = next((c for c in status.get("conditions", []) if c["type"] == "Accepted"), None)
    if cond and cond["status"] == "True" and status.get("observedGeneration") == obj["metadata"]["generation"]:
        return status["observedGeneration"]
    return None


def test_valid_job_is_accepted_and_survives_operator_restart(cluster, namespace, operator_process):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("first"), check=True)
    assert wait_for(lambda: accepted_generation(cluster, namespace, "first"), 60, what="first accepted") == 1
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.name=first,reason=Accepted", "-o", "name", check=True).stdout
    assert events.strip(), "no Accepted event was posted"

    # The operator dies; work arrives while it is down; a new process picks everything up.
    operator_process.kill()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("second"), check=True)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("first", lr=2e-4), check=True)
    operator_process.start()
    assert wait_for(lambda: accepted_generation(cluster, namespace, "second"), 60, what="second accepted") == 1
    assert wait_for(lambda: accepted_generation(cluster, namespace, "first"), 60, what="first re-accepted") == 2
