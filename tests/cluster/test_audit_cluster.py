"""``kubeforge audit`` against the real control plane: the chain from status alone.

The operator runs as a process. The FineTuneJob's end is simulated through its ``/status``
subresource with the result the operator would have copied from the trainer's termination
log (so the API server's schema must keep ``result.lineageDigest``: unknown status fields
are pruned); the quantizer pod's end is simulated by kwok from test annotations, and the
operator copies its report, with ``lineageDigest``, into ``status.result`` itself. Then
``kubeforge audit`` runs as a user would, with the admin kubeconfig.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
FT_DIGEST = "sha256:" + "1" * 64
Q_DIGEST = "sha256:" + "2" * 64
REPORT = {"originalBytes": 400, "quantizedBytes": 130, "compressionRatio": 3.07, "perplexity": {"before": 20.0, "after": 20.1},
          "perplexityIncreasePercent": 0.5, "maxPerplexityIncreasePercent": 1.0, "gatePassed": True,
          "method": "int8-weight-only", "reason": "Succeeded", "message": "ok", "outputUri": "s3://models/q",
          "lineageDigest": Q_DIGEST}


def doc(kind: str, name: str, spec: dict) -> str:
    return yaml.safe_dump({"apiVersion": "kubeforge.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})


def audit(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig),
               PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer_image")]))
    return subprocess.run([sys.executable, "-m", "kubeforge", "audit", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_audit_prints_the_chain_from_the_cluster(cluster, namespace, operator_process):
    kubectl = cluster.kubectl
    kubectl("apply", "-n", namespace, "-f", "-", check=True, input=doc("FineTuneJob", "ft", {
        "model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "pvc://data/train.jsonl"},
        "output": {"uri": "s3://models/ft"}}))
    kubectl("apply", "-n", namespace, "-f", "-", check=True, input=doc("QuantizeJob", "q", {
        "model": {"fineTuneJobRef": {"name": "ft"}}, "method": "int8-weight-only", "output": {"uri": "s3://models/q"}}))
    kubectl("apply", "-n", namespace, "-f", "-", check=True, input=doc("InferenceService", "svc", {
        "model": {"quantizeJobRef": {"name": "q"}}}))

    kubectl("patch", "-n", namespace, "finetunejob", "ft", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": {"phase": "Succeeded", "output": {"uri": "s3://models/ft"},
                                         "completionTime": "2026-01-01T00:00:00Z",
                                         "result": {"steps": 8, "initialValidationLoss": 2.0, "finalValidationLoss": 1.2,
                                                    "datasetDigest": "sha256:" + "d" * 64,
                                                    "evaluation": {"metric": "accuracy", "before": 0.36, "after": 0.95,
                                                                   "samples": 100},
                                                    "lineageDigest": FT_DIGEST}}}), check=True)
    ft_status = get_json(cluster, "-n", namespace, "finetunejob", "ft")["status"]
    assert ft_status["result"]["lineageDigest"] == FT_DIGEST, "the CRD keeps result.lineageDigest"

    def running_pod() -> str:
        out = kubectl("get", "pods", "-n", namespace, "-l", "kubeforge.io/quantizejob=q",
                      "--field-selector=status.phase=Running", "-o", "name", check=True).stdout.split()
        return out[0] if out else ""

    pod = wait_for(running_pod, 90, what="the quantizer pod")
    kubectl("annotate", "-n", namespace, pod, "kubeforge.io/test-exit-code=0",
            f"kubeforge.io/test-termination-message={json.dumps(REPORT, separators=(',', ':'))}", check=True)
    st = wait_for(lambda: (s := get_json(cluster, "-n", namespace, "quantizejob", "q").get("status") or {})
                  .get("phase") == "Succeeded" and s, 90, what="QuantizeJob Succeeded")
    assert st["result"]["lineageDigest"] == Q_DIGEST, "the operator copies the quantizer's lineage digest"

    # From any resource of the chain, the whole chain, in order.
    for ref in ("finetunejob/ft", "qj/q", "inferenceservice/svc"):
        out = audit(cluster, ref, "-n", namespace, "--full")
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert (text.index(f"FineTuneJob {namespace}/ft") < text.index(f"QuantizeJob {namespace}/q")
                < text.index(f"InferenceService {namespace}/svc")), text
        assert f"lineage {FT_DIGEST}" in text and f"lineage {Q_DIGEST}" in text
        assert f"serves lineage {Q_DIGEST}" in text
        assert "accuracy 0.36 -> 0.95" in text and "gate passed" in text
        print(f"$ kubeforge audit {ref} -n {namespace} --full\n{text}")  # shown with pytest -s

    tree = json.loads(audit(cluster, "ftj/ft", "-n", namespace, "--json").stdout)
    q = tree["children"][0]
    assert (tree["lineageDigest"], q["lineageDigest"]) == (FT_DIGEST, Q_DIGEST)
    assert q["children"][0]["kind"] == "InferenceService" and q["children"][0]["servedLineageDigest"] == Q_DIGEST

    missing = audit(cluster, "finetunejob/nope", "-n", namespace)
    assert missing.returncode == 2 and "FineTuneJob/nope not found" in missing.stderr
