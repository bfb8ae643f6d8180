"""InferenceService with ``engine.backend: vllm`` against the real control plane.

The operator runs as a process (as in test_inference_operator.py); kwok plays the kubelet, so
pods become Running and Ready at once and the Deployment controller really rolls them. What
is checked here is the cluster's side: the vLLM pod is what the API server, the Deployment
controller and the restricted Pod Security admission get; that vLLM answers requests is
tests/e2e/test_local_vllm.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from kubeforge.api.inference import InferenceServiceSpec
from kubeforge.builders import inference as ib
from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

ANN_URI, ANN_REV = "kubeforge.io/model-uri", "kubeforge.io/model-revision"
VLLM = {"backend": "vllm", "dtype": "bfloat16", "maxModelLength": 2048}


def apply(cluster, namespace: str, obj: dict, check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=check)


def isvc(name: str, model: dict, **spec) -> dict:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"model": model, "engine": dict(VLLM), **spec}}


def status_of(cluster, namespace: str, name: str) -> dict:
    return get_json(cluster, "-n", namespace, "inferenceservice", name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def serving(cluster, namespace: str, name: str, ready: int, uri: str | None = None) -> dict | bool:
    st = status_of(cluster, namespace, name)
    ok = (st.get("phase") == "Running" and condition(st, "Ready").get("status") == "True"
          and st.get("replicas") == {"ready": ready, "desired": ready} and (uri is None or st.get("modelUri") == uri))
    return st if ok else False


def test_vllm_children_are_created_owned_rolled_and_status_follows(cluster, namespace, operator_process):
    cluster.kubectl("create", "secret", "generic", "-n", namespace, "vkey", "--from-literal=key=s3cret", check=True)
    apply(cluster, namespace, {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "ft"},
                               "spec": {"model": {"uri": "hf://acme/tiny@main"},
                                        "dataset": {"uri": "s3://data/train.jsonl"},
                                        "output": {"uri": "s3://models/ft"}}})
    apply(cluster, namespace, isvc("vchat", {"fineTuneJobRef": {"name": "ft"}},
                                   replicas={"min": 1, "max": 2}, resources={"gpus": 2},
                                   adapters=[{"name": "sql", "uri": "s3://adapters/sql"}],
                                   apiKeySecretRef={"name": "vkey", "key": "key"}))
    wait_for(lambda: status_of(cluster, namespace, "vchat").get("phase") == "WaitingForInput", 90,
             what="WaitingForInput")

    def finish(uri: str, at: str) -> None:
        cluster.kubectl("patch", "-n", namespace, "finetunejob", "ft", "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"phase": "Succeeded", "output": {"uri": uri}, "completionTime": at}}),
                        check=True)

    finish("s3://models/ft/v1", "2026-01-01T00:00:00Z")
    st = wait_for(lambda: serving(cluster, namespace, "vchat", 1, "s3://models/ft/v1"), 90, what="serving v1")
    assert st["url"] == f"http://vchat.{namespace}.svc:8000/v1"

    uid = get_json(cluster, "-n", namespace, "inferenceservice", "vchat")["metadata"]["uid"]
    for kind in ("deployment", "service", "horizontalpodautoscaler", "poddisruptionbudget"):
        (owner,) = get_json(cluster, "-n", namespace, kind, "vchat")["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferenceService", uid, True), kind

    dep = get_json(cluster, "-n", namespace, "deployment", "vchat")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "vllm/vllm-openai:v0.32.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "2"
    assert "sql=/workspace/models/sql" in c["args"]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vkey", "key": "key"}}} in c["env"]
    assert "s3cret" not in json.dumps(dep)
    assert [p["httpGet"]["path"] for p in (c["startupProbe"], c["readinessProbe"], c["livenessProbe"])] == ["/health"] * 3
    assert pod["initContainers"][0]["command"][-2:] == ["base=s3://models/ft/v1", "sql=s3://adapters/sql"]
    svc = get_json(cluster, "-n", namespace, "service", "vchat")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("http", 8000)]
    hpa = get_json(cluster, "-n", namespace, "hpa", "vchat")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_running"
    first = dep["spec"]["template"]["metadata"]["annotations"]

    # A new output of the referenced job: the fetch step and the annotations change, the pods roll.
    finish("s3://models/ft/v2", "2026-01-02T00:00:00Z")
    wait_for(lambda: serving(cluster, namespace, "vchat", 1, "s3://models/ft/v2"), 90, what="serving v2")
    dep = get_json(cluster, "-n", namespace, "deployment", "vchat")
    second = dep["spec"]["template"]["metadata"]["annotations"]
    assert second[ANN_URI] == "s3://models/ft/v2" and second[ANN_REV] != first[ANN_REV]
    assert "base=s3://models/ft/v2" in dep["spec"]["template"]["spec"]["initContainers"][0]["command"]
    rs = cluster.kubectl("get", "rs", "-n", namespace, "-l", "kubeforge.io/inferenceservice=vchat", "-o", "name",
                         check=True).stdout.split()
    assert len(rs) == 2, rs

    # Status follows readiness: scaled to two fixed replicas, both ready.
    cluster.kubectl("patch", "-n", namespace, "inferenceservice", "vchat", "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": {"min": 2, "max": 2}}}), check=True)
    wait_for(lambda: serving(cluster, namespace, "vchat", 2), 90, what="2 ready replicas")


def test_the_api_server_refuses_kubeforge_only_settings_with_vllm(cluster, namespace):
    out = apply(cluster, namespace, isvc("bad", {"uri": "s3://m/x"},
                                         engine={"backend": "vllm", "maxQueuedRequests": 5}), check=False)
    assert out.returncode != 0
    assert "engine.maxQueuedRequests: vLLM's server has no waiting-queue limit" in out.stderr, out.stderr
    out = apply(cluster, namespace, isvc("bad", {"uri": "s3://m/x"},
                                         engine={"backend": "vllm", "batching": "dynamic"}), check=False)
    assert out.returncode != 0 and "engine.batching" in out.stderr, out.stderr
    # Defaults written out explicitly are fine, and so are the same settings on the KubeForge server.
    apply(cluster, namespace, isvc("ok", {"uri": "s3://m/x"}, engine={"backend": "vllm", "requestTimeoutSeconds": 120,
                                                                     "kvBlockSize": 16}))
    apply(cluster, namespace, isvc("kf", {"uri": "s3://m/x"}, engine={"backend": "kubeforge", "maxQueuedRequests": 5}))


def test_a_quantize_output_vllm_cannot_load_fails_the_service(cluster, namespace, operator_process):
    apply(cluster, namespace, {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "q4"},
                               "spec": {"model": {"uri": "s3://models/base"}, "method": "int4-weight-only",
                                        "output": {"uri": "s3://models/q4"}}})
    apply(cluster, namespace, isvc("q4svc", {"quantizeJobRef": {"name": "q4"}}))
    st = wait_for(lambda: (s := status_of(cluster, namespace, "q4svc")).get("phase") == "Failed" and s, 90,
                  what="Failed")
    msg = condition(st, "Ready")["message"]
    assert "vllm cannot load a int4-weight-only QuantizeJob output" in msg and "int8-weight-only" in msg, msg
    assert cluster.kubectl("get", "-n", namespace, "deployment", "q4svc").returncode != 0


def test_restricted_pod_security_admits_the_vllm_pod(cluster, namespace):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest", check=True)
    spec = InferenceServiceSpec.model_validate({"model": {"uri": "pvc://models/base"}, "engine": VLLM,
                                                "resources": {"gpus": 2, "cpu": "1", "memory": "1Gi"},
                                                "adapters": [{"name": "sql", "uri": "pvc://adapters/sql"}]})
    dep = ib.build_deployment("pss-vllm", namespace, "00000000-0000-0000-0000-000000000000", spec,
                              ib.ModelRef("pvc://models/base", "r1"))
    dep["metadata"].pop("ownerReferences")  # no InferenceService object here: the pod alone is under test
    apply(cluster, namespace, dep)

    def pods() -> list[dict]:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-l", "kubeforge.io/inferenceservice=pss-vllm",
                              "-o", "json", check=True)
        return json.loads(out.stdout)["items"]

    [pod] = wait_for(pods, 60, what="the vLLM pod")
    assert pod["spec"]["initContainers"][0]["name"] == "fetch-model"
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate", "-o", "json",
                             check=True)
    assert [e["message"] for e in json.loads(events.stdout)["items"] if "PodSecurity" in e["message"]] == []
