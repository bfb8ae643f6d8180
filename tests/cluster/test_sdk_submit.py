"""The SDK against the real control plane: submit() creates the resource, wait() follows it."""

from __future__ import annotations

import json

import pytest

from support.waiting import wait_for

pytestmark = pytest.mark.cluster


def test_finetuner_submit_and_wait(cluster, namespace, operator_process, monkeypatch):
    from kubeforge import kube
    from kubeforge.sdk import FineTuner

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setattr(kube, "_api", None)  # a fresh client for this cluster

    tuner = FineTuner(base_model="hf://acme/tiny-llama@main", training_data="s3://data/train.jsonl",  # no PVCs in the test cluster
                      output="s3://models/sdk-out", name="sdk-job", nodes=2, data_format="text")
    job = tuner.submit(namespace=namespace, epochs=2, batch_size=16)
    assert (job.kind, job.name, job.namespace) == ("FineTuneJob", "sdk-job", namespace)

    obj = json.loads(cluster.kubectl("get", "-n", namespace, "finetunejob", "sdk-job", "-o", "json", check=True).stdout)
    assert obj["spec"]["training"]["epochs"] == 2 and obj["spec"]["training"]["globalBatchSize"] == 16
    assert obj["spec"]["nodes"] == {"min": 2, "max": 2}

    # The operator starts two workers; the test plays their containers finishing well.
    def worker_pods():
        out = cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubeforge.io/finetunejob=sdk-job",
                              "-o", "jsonpath={range .items[?(@.status.phase=='Running')]}{.metadata.name} {end}")
        pods = out.stdout.split()
        return pods if len(pods) == 2 else None

    for pod in wait_for(worker_pods, 90, what="two running workers"):
        cluster.kubectl("annotate", "-n", namespace, "pod", pod, "kubeforge.io/test-exit-code=0", check=True)
    status = job.wait(timeout=120, poll=0.5)
    assert status["phase"] == "Succeeded"
    assert status.get("completionTime")
