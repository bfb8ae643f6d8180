"""InferenceService against the real control plane, with the operator running as a process.

kwok plays the kubelet: pods become Running and Ready at once, so the Deployment controller
really rolls pods and reports ready replicas. Referenced jobs finish by writing their status
through the ``/status`` subresource (FineTuneJob) or by ending the quantizer pod with a
report (QuantizeJob, reconciled by the operator under test).
"""

from __future__ import annotations

import json

import pytest
import yaml

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

ANN_URI, ANN_REV = "kubeforge.io/model-uri", "kubeforge.io/model-revision"


def apply(cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=True)


def isvc(name: str, model: dict, **spec) -> dict:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"model": model, **spec}}


def finetunejob() -> dict:
    """The FineTuneJob "ft" whose output (s3://models/ft) the tests' InferenceServices serve."""
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "ft"},
            "spec": {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "s3://data/train.jsonl"},
                     "output": {"uri": "s3://models/ft"}}}


def status_of(cluster, namespace: str, kind: str, name: str) -> dict:
    return get_json(cluster, "-n", namespace, kind, name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def get_or_none(cluster, namespace: str, *what: str) -> dict | None:
    out = cluster.kubectl("get", "-n", namespace, *what, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def template_annotations(cluster, namespace: str, name: str) -> dict:
    dep = get_or_none(cluster, namespace, "deployment", name) or {}
    return ((dep.get("spec") or {}).get("template") or {}).get("metadata", {}).get("annotations") or {}


def serving(cluster, namespace: str, name: str, ready: int, uri: str | None = None) -> dict | bool:
    st = status_of(cluster, namespace, "inferenceservice", name)
    ok = (st.get("phase") == "Running" and condition(st, "Ready").get("status") == "True"
          and condition(st, "ModelReady").get("status") == "True"
          and st.get("replicas") == {"ready": ready, "desired": ready} and (uri is None or st.get("modelUri") == uri))
    return st if ok else False


def test_children_are_created_owned_and_status_follows_the_deployment(cluster, namespace, operator_process):
    cluster.kubectl("create", "secret", "generic", "-n", namespace, "llm-key", "--from-literal=key=s3cret", check=True)
    apply(cluster, namespace, isvc("chat", {"uri": "s3://models/base"},
                                   replicas={"min": 1, "max": 3},
                                   autoscaling={"metric": "queueDepth", "target": 4},
                                   resources={"gpus": 1},
                                   apiKeySecretRef={"name": "llm-key", "key": "key"}))
    st = wait_for(lambda: serving(cluster, namespace, "chat", 1), 90, what="chat serving")
    assert st["url"] == f"http://chat.{namespace}.svc:8000/v1"
    assert st["modelUri"] == "s3://models/base" and st["modelRevision"]
    assert st["observedGeneration"] == 1
    assert condition(st, "Accepted")["status"] == "True"

    uid = get_json(cluster, "-n", namespace, "inferenceservice", "chat")["metadata"]["uid"]
    for kind in ("deployment", "service", "horizontalpodautoscaler", "poddisruptionbudget", "configmap/chat-serve-config"):
        what = (kind,) if "/" in kind else (kind, "chat")
        obj = get_json(cluster, "-n", namespace, *what)
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferenceService", uid, True), kind

    dep = get_json(cluster, "-n", namespace, "deployment", "chat")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kubeforge_runtime.serve", "--config", "/etc/kubeforge/config.json"]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "KUBEFORGE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "key"}}} in c["env"]
    assert "s3cret" not in json.dumps(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert dep["spec"]["template"]["metadata"]["annotations"][ANN_URI] == "s3://models/base"

    svc = get_json(cluster, "-n", namespace, "service", "chat")
    assert sorted((p["name"], p["port"]) for p in svc["spec"]["ports"]) == [("grpc", 8001), ("http", 8000)]
    hpa = get_json(cluster, "-n", namespace, "hpa", "chat")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    pdb = get_json(cluster, "-n", namespace, "pdb", "chat")
    assert pdb["spec"]["maxUnavailable"] == 1
    cfg = json.loads(get_json(cluster, "-n", namespace, "configmap", "chat-serve-config")["data"]["config.json"])
    assert cfg["servedModelName"] == "chat" and cfg["model"] == {"uri": "s3://models/base"}

    # A fixed size: the HPA goes, the Deployment scales, status follows the ready replicas.
    cluster.kubectl("patch", "-n", namespace, "inferenceservice", "chat", "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": {"min": 2, "max": 2}}}), check=True)
    st = wait_for(lambda: serving(cluster, namespace, "chat", 2), 90, what="2 ready replicas")
    assert st["observedGeneration"] == 2
    wait_for(lambda: get_or_none(cluster, namespace, "hpa", "chat") is None, 90, what="HPA deleted")

    # A Deployment deleted from under a live InferenceService comes back.
    old_uid = get_json(cluster, "-n", namespace, "deployment", "chat")["metadata"]["uid"]
    cluster.kubectl("delete", "-n", namespace, "deployment", "chat", "--wait=false", check=True)
    wait_for(lambda: (d := get_or_none(cluster, namespace, "deployment", "chat")) and d["metadata"]["uid"] != old_uid,
             90, what="the Deployment re-created")
    wait_for(lambda: serving(cluster, namespace, "chat", 2), 90, what="serving again")


def test_waits_for_the_finetunejob_and_rolls_out_each_new_output(cluster, namespace, operator_process):
    apply(cluster, namespace, finetunejob())
    apply(cluster, namespace, isvc("ftsvc", {"fineTuneJobRef": {"name": "ft"}}))
    st = wait_for(lambda: (s := status_of(cluster, namespace, "inferenceservice", "ftsvc")).get("phase")
                  == "WaitingForInput" and s, 90, what="WaitingForInput")
    assert condition(st, "Ready")["reason"] == "WaitingForInput"
    assert condition(st, "ModelReady")["reason"] == "WaitingForInput"
    assert "FineTuneJob ft" in condition(st, "Ready")["message"]
    assert get_or_none(cluster, namespace, "deployment", "ftsvc") is None

    def finish(uri: str, at: str) -> None:
        cluster.kubectl("patch", "-n", namespace, "finetunejob", "ft", "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"phase": "Succeeded", "output": {"uri": uri}, "completionTime": at}}),
                        check=True)

    finish("s3://models/ft/v1", "2026-01-01T00:00:00Z")
    st = wait_for(lambda: serving(cluster, namespace, "ftsvc", 1, "s3://models/ft/v1"), 90, what="serving v1")
    first = template_annotations(cluster, namespace, "ftsvc")
    assert first[ANN_URI] == "s3://models/ft/v1" and first[ANN_REV] == st["modelRevision"]

    # A new output: the pod template changes, so the Deployment rolls the pods.
    finish("s3://models/ft/v2", "2026-01-02T00:00:00Z")
    st = wait_for(lambda: serving(cluster, namespace, "ftsvc", 1, "s3://models/ft/v2"), 90, what="serving v2")
    second = template_annotations(cluster, namespace, "ftsvc")
    assert second[ANN_URI] == "s3://models/ft/v2" and second[ANN_REV] != first[ANN_REV]
    dep = get_json(cluster, "-n", namespace, "deployment", "ftsvc")
    assert dep["metadata"]["generation"] >= 2
    rs = cluster.kubectl("get", "rs", "-n", namespace, "-l", "kubeforge.io/inferenceservice=ftsvc", "-o", "name",
                         check=True).stdout.split()
    assert len(rs) == 2, rs  # one ReplicaSet per rolled-out revision
    reasons = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=ftsvc",
                              "-o", "jsonpath={.items[*].reason}", check=True).stdout.split()
    assert "RollingOut" in reasons

    # The FineTuneJob is re-created and succeeds with the same URI: new bytes behind it, so a
    # new revision. While it is gone, the last output keeps serving.
    cluster.kubectl("delete", "-n", namespace, "finetunejob", "ft", "--wait=true", check=True)
    apply(cluster, namespace, finetunejob())
    st = status_of(cluster, namespace, "inferenceservice", "ftsvc")
    assert st["phase"] == "Running" and st["modelUri"] == "s3://models/ft/v2"
    finish("s3://models/ft/v2", "2026-01-03T00:00:00Z")
    wait_for(lambda: template_annotations(cluster, namespace, "ftsvc")[ANN_REV] != second[ANN_REV], 90,
             what="a new revision for the re-created job")
    wait_for(lambda: serving(cluster, namespace, "ftsvc", 1, "s3://models/ft/v2"), 90, what="serving the new v2")


def test_serves_the_output_of_a_quantizejob_once_it_succeeds(cluster, namespace, operator_process):
    apply(cluster, namespace, {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "q"},
                               "spec": {"model": {"uri": "s3://models/base"}, "output": {"uri": "s3://models/q8"}}})
    apply(cluster, namespace, isvc("qsvc", {"quantizeJobRef": {"name": "q"}}))
    wait_for(lambda: status_of(cluster, namespace, "inferenceservice", "qsvc").get("phase") == "WaitingForInput", 90,
             what="WaitingForInput")

    def quantizer_pod() -> str:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubeforge.io/quantizejob=q",
                              "--field-selector=status.phase=Running", "-o", "name", check=True).stdout.split()
        return out[0] if out else ""

    pod = wait_for(quantizer_pod, 90, what="quantizer pod")
    report = {"compressionRatio": 3.5, "gatePassed": True, "perplexityIncreasePercent": 0.2}
    cluster.kubectl("annotate", "-n", namespace, pod, "kubeforge.io/test-exit-code=0",
                    f"kubeforge.io/test-termination-message={json.dumps(report)}", check=True)
    st = wait_for(lambda: serving(cluster, namespace, "qsvc", 1, "s3://models/q8"), 90, what="serving the quantized model")
    assert condition(st, "ModelReady")["reason"] == "ModelLoaded"


def test_an_output_produced_while_the_operator_is_down_rolls_out_when_it_returns(cluster, namespace, operator_process):
    apply(cluster, namespace, finetunejob())
    apply(cluster, namespace, isvc("svc", {"fineTuneJobRef": {"name": "ft"}}))

    def finish(uri: str, at: str) -> None:
        cluster.kubectl("patch", "-n", namespace, "finetunejob", "ft", "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"phase": "Succeeded", "output": {"uri": uri}, "completionTime": at}}),
                        check=True)

    wait_for(lambda: status_of(cluster, namespace, "inferenceservice", "svc").get("phase") == "WaitingForInput", 90,
             what="WaitingForInput")
    finish("s3://models/ft/v1", "2026-01-01T00:00:00Z")
    wait_for(lambda: serving(cluster, namespace, "svc", 1, "s3://models/ft/v1"), 90, what="serving v1")

    operator_process.kill()  # no watch sees what happens next
    finish("s3://models/ft/v2", "2026-01-02T00:00:00Z")
    operator_process.start()
    wait_for(lambda: serving(cluster, namespace, "svc", 1, "s3://models/ft/v2"), 90, what="serving v2 after the restart")
    assert template_annotations(cluster, namespace, "svc")[ANN_URI] == "s3://models/ft/v2"
