"""QuantizeJob against the real control plane, with the operator running as a process.

The FineTuneJob's outcome is simulated by writing its status through the ``/status``
subresource (the reconciler under test only reads it); the quantizer pod's end is simulated
by kwok from test annotations: ``kubeforge.io/test-exit-code`` ends its container with that
code, ``kubeforge.io/test-termination-message`` is the message the kubelet would have copied
from ``/dev/termination-log``.
"""

from __future__ import annotations

import json

import pytest
import yaml

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

REPORT = {
    "originalBytes": 104857600, "quantizedBytes": 27262976, "compressionRatio": 3.84615,
    "latencyMsPerToken": {"before": 12.5, "after": 4.25}, "perplexity": {"before": 20.0, "after": 20.1},
    "perplexityIncreasePercent": 0.5, "maxPerplexityIncreasePercent": 1.0, "gatePassed": True,
    "method": "int8-dynamic", "reason": "Succeeded", "message": "ok", "outputUri": "s3://models/q",
}


def ftj(name: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                 "output": {"uri": "pvc://models/ft-out"}},
    })


def qj(name: str, model: dict, **spec) -> str:
    return yaml.safe_dump({
        "apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": name},
        "spec": {"model": model, "output": {"uri": "s3://models/q"}, **spec},
    })


def status_of(cluster, namespace: str, kind: str, name: str) -> dict:
    return get_json(cluster, "-n", namespace, kind, name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def set_ftj_status(cluster, namespace: str, name: str, status: dict) -> None:
    cluster.kubectl("patch", "-n", namespace, "finetunejob", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}), check=True)


def quantizer_pod(cluster, namespace: str, name: str) -> str:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"kubeforge.io/quantizejob={name}",
                          "--field-selector=status.phase=Running", "-o", "name", check=True).stdout.split()
    return out[0] if out else ""


def end_pod(cluster, namespace: str, pod: str, code: int, message: str | None = None) -> None:
    args = [f"kubeforge.io/test-exit-code={code}"]
    if message is not None:
        args.append(f"kubeforge.io/test-termination-message={message}")
    cluster.kubectl("annotate", "-n", namespace, pod, *args, check=True)


def test_waits_for_finetunejob_then_runs_and_reports_result(cluster, namespace, operator_process):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("ft"), check=True)
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=qj("q", {"fineTuneJobRef": {"name": "ft"}}, method="int8-dynamic"), check=True)

    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "q")).get("phase") == "WaitingForInput" and s,
                  90, what="WaitingForInput")
    assert condition(st, "Accepted")["status"] == "True"
    waiting = condition(st, "InputReady")
    assert waiting["status"] == "False" and waiting["reason"] == "WaitingForInput"
    assert "FineTuneJob ft" in waiting["message"]
    assert cluster.kubectl("get", "job", "-n", namespace, "q-quantize").returncode != 0, "started before its input"

    # Training finishes: the quantizer starts on the FineTuneJob's output.
    set_ftj_status(cluster, namespace, "ft", {"phase": "Succeeded", "output": {"uri": "s3://models/ft-out/final"},
                                              "completionTime": "2026-01-01T00:00:00Z"})
    job = wait_for(lambda: get_json(cluster, "-n", namespace, "job", "q-quantize"), 90, what="the quantizer Job")
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("QuantizeJob", "q", True)
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    c = pod_spec["containers"][0]
    assert c["command"] == ["python", "-m", "kubeforge_runtime.quantize", "--config", "/etc/kubeforge/config.json"]
    assert (c["terminationMessagePath"], c["terminationMessagePolicy"]) == ("/dev/termination-log", "FallbackToLogsOnError")
    cm = get_json(cluster, "-n", namespace, "configmap", "q-quantize-config")
    assert json.loads(cm["data"]["config.json"])["model"] == {"uri": "s3://models/ft-out/final"}

    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "q")).get("phase") == "Running" and s,
                  90, what="Running")
    assert st["modelUri"] == "s3://models/ft-out/final"
    assert condition(st, "InputReady")["status"] == "True"

    # The quantizer exits 0 with its report in the termination message.
    pod = wait_for(lambda: quantizer_pod(cluster, namespace, "q"), 90, what="the quantizer pod")
    end_pod(cluster, namespace, pod, 0, json.dumps(REPORT, separators=(",", ":")))
    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "q")).get("phase") == "Succeeded" and s,
                  90, what="Succeeded")
    assert st["output"] == {"uri": "s3://models/q"}
    assert st["result"]["compressionRatio"] == pytest.approx(3.84615)
    assert st["result"]["latencyMsPerToken"] == {"before": 12.5, "after": 4.25}
    assert st["result"]["perplexity"] == {"before": 20.0, "after": 20.1}
    assert st["result"]["gatePassed"] is True
    assert st["result"]["originalBytes"] == 104857600
    assert condition(st, "Succeeded")["status"] == "True"
    reasons = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=q",
                              "-o", "jsonpath={.items[*].reason}", check=True).stdout.split()
    assert {"WaitingForInput", "JobCreated", "Succeeded"} <= set(reasons)

    # Terminal is terminal: deleting the finished Job does not start the work again.
    cluster.kubectl("delete", "job", "-n", namespace, "q-quantize", "--wait=true", check=True)
    cluster.kubectl("patch", "-n", namespace, "quantizejob", "q", "--type=merge",
                    "-p", json.dumps({"spec": {"method": "int8-weight-only"}}), check=True)
    wait_for(lambda: "SpecChangeIgnored" in cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=q",
        "-o", "jsonpath={.items[*].reason}", check=True).stdout, 90, what="SpecChangeIgnored event")
    assert cluster.kubectl("get", "job", "-n", namespace, "q-quantize").returncode != 0
    assert status_of(cluster, namespace, "quantizejob", "q")["phase"] == "Succeeded"


def test_failed_reference_fails_with_a_clear_reason(cluster, namespace, operator_process):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=ftj("ft"), check=True)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=qj("q", {"fineTuneJobRef": {"name": "ft"}}), check=True)
    wait_for(lambda: status_of(cluster, namespace, "quantizejob", "q").get("phase") == "WaitingForInput", 90,
             what="WaitingForInput")
    set_ftj_status(cluster, namespace, "ft", {"phase": "Failed", "conditions": [{
        "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "workers failed 4 times",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "q")).get("phase") == "Failed" and s,
                  90, what="Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "InputFailed"
    assert "FineTuneJob ft failed" in failed["message"] and "BackoffLimitExceeded" in failed["message"]
    assert cluster.kubectl("get", "job", "-n", namespace, "q-quantize").returncode != 0


def test_quality_gate_and_config_errors_fail_at_once_with_the_numbers(cluster, namespace, operator_process):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=qj("gate", {"uri": "s3://models/base"}, backoffLimit=3),
                    check=True)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=qj("conf", {"uri": "s3://models/base"}, backoffLimit=3),
                    check=True)
    report = {**REPORT, "perplexity": {"before": 20.0, "after": 21.0}, "perplexityIncreasePercent": 5.0,
              "gatePassed": False, "reason": "QualityGateFailed"}
    gate_pod = wait_for(lambda: quantizer_pod(cluster, namespace, "gate"), 90, what="gate pod")
    conf_pod = wait_for(lambda: quantizer_pod(cluster, namespace, "conf"), 90, what="conf pod")
    end_pod(cluster, namespace, gate_pod, 79, json.dumps(report, separators=(",", ":")))
    end_pod(cluster, namespace, conf_pod, 78, json.dumps({
        "method": "int4-weight-only", "reason": "UnsupportedMethod", "gatePassed": False,
        "message": "int4-weight-only needs a CUDA GPU; use int8-weight-only on CPU"}))

    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "gate")).get("phase") == "Failed" and s,
                  90, what="gate Failed")
    failed = condition(st, "Failed")
    assert failed["reason"] == "QualityGateFailed"
    assert "5%" in failed["message"] and "20 -> 21" in failed["message"] and "1% allowed" in failed["message"]
    assert st["result"]["gatePassed"] is False and st["result"]["perplexityIncreasePercent"] == 5.0
    assert "output" not in st
    st = wait_for(lambda: (s := status_of(cluster, namespace, "quantizejob", "conf")).get("phase") == "Failed" and s,
                  90, what="conf Failed")
    assert condition(st, "Failed")["reason"] == "ConfigurationError"
    assert "use int8-weight-only on CPU" in condition(st, "Failed")["message"]
    # podFailurePolicy failed the Jobs on the first pod, despite backoffLimit 3.
    for name in ("gate", "conf"):
        pods = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"kubeforge.io/quantizejob={name}", "-o", "name",
                               check=True).stdout.split()
        assert len(pods) == 1, pods
