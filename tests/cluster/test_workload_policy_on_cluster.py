"""Pod template pass-through and NetworkPolicies against the real control plane (issue 17).

* The API server itself (the CRDs' CEL) refuses ``LD_PRELOAD``/``PYTHONPATH`` in
  ``template.env`` and AppArmor/seccomp annotations, naming the field.
* Without the webhook, the operator refuses a ``hostPath`` volume with
  ``Accepted=False/InvalidSpec`` naming ``spec.template.volumes[0]``, and creates no child.
* A FineTuneJob and an InferenceService get an owned NetworkPolicy whose selector picks
  exactly their pods (listed by the API server with that selector). NetworkPolicies are not
  *enforced* here: this control plane has no CNI plugin (kwok plays the kubelet), so the test
  shows the objects and what they select, not that traffic is dropped.
"""

from __future__ import annotations

import json

import pytest
import yaml

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

FINETUNE = {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://models/ft"}, "nodes": {"min": 2, "max": 2}, "resources": {"gpus": 1}}


def resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def apply(cluster, namespace: str, obj: dict):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))


def get_or_none(cluster, namespace: str, *what: str) -> dict | None:
    out = cluster.kubectl("get", "-n", namespace, *what, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def accepted_condition(cluster, namespace: str, kind: str, name: str) -> dict:
    status = (get_or_none(cluster, namespace, kind, name) or {}).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Accepted"), {})


@pytest.mark.parametrize("template,message", [
    ({"env": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]},
     "template.env: LD_PRELOAD changes which code the interpreter or the dynamic loader runs"),
    ({"env": [{"name": "PYTHONPATH", "value": "/tmp"}]},
     "template.env: PYTHONPATH changes which code the interpreter"),
    ({"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}},
     "template.annotations: AppArmor/seccomp profile annotations"),
])
def test_api_server_refuses_static_rules_naming_the_field(cluster, namespace, template, message):
    out = apply(cluster, namespace, resource("FineTuneJob", "static", {**FINETUNE, "template": template}))
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_operator_refuses_hostpath_without_the_webhook_and_creates_nothing(cluster, namespace, operator_process):
    spec = {**FINETUNE, "template": {"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}],
                                     "volumeMounts": [{"name": "host", "mountPath": "/host"}]}}
    assert apply(cluster, namespace, resource("FineTuneJob", "escape", spec)).returncode == 0  # no webhook here
    cond = wait_for(lambda: accepted_condition(cluster, namespace, "finetunejob", "escape") or None, 60,
                    what="an Accepted condition")
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert cond["message"].startswith("spec.template.volumes[0] (host): hostPath volumes are not allowed"), cond
    for kind in ("job", "service", "configmap", "networkpolicy", "pod"):
        assert get_json(cluster, "-n", namespace, kind, "-l", "kubeforge.io/finetunejob")["items"] == [], kind
    assert get_or_none(cluster, namespace, "job", "escape") is None
    events = get_json(cluster, "-n", namespace, "events", "--field-selector", "involvedObject.name=escape")["items"]
    assert any(e["reason"] == "InvalidSpec" and "hostPath" in e["message"] for e in events)


def selected_pods(cluster, namespace: str, policy: dict) -> set[str]:
    selector = ",".join(f"{k}={v}" for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    return {p["metadata"]["name"] for p in get_json(cluster, "-n", namespace, "pods", "-l", selector)["items"]}


def owned_policy(cluster, namespace: str, kind: str, name: str) -> dict | None:
    pol = get_or_none(cluster, namespace, "networkpolicy", name)
    owner = get_or_none(cluster, namespace, kind, name)
    if not pol or not owner:
        return None
    refs = pol["metadata"].get("ownerReferences") or []
    return pol if any(r["uid"] == owner["metadata"]["uid"] and r.get("controller") for r in refs) else None


def test_workloads_get_network_policies_selecting_their_pods(cluster, namespace, operator_process):
    assert apply(cluster, namespace, resource("FineTuneJob", "ft", FINETUNE)).returncode == 0
    assert apply(cluster, namespace, resource("InferenceService", "chat", {"model": {"uri": "s3://models/base"}})
                 ).returncode == 0
    # A pod of neither, which no policy may select.
    cluster.kubectl("run", "bystander", "-n", namespace, "--image=busybox", "--labels=app.kubernetes.io/name=kubeforge",
                    check=True)

    ft = wait_for(lambda: owned_policy(cluster, namespace, "finetunejob", "ft"), 60, what="the FineTuneJob's policy")
    workers = wait_for(lambda: selected_pods(cluster, namespace, ft) if len(selected_pods(cluster, namespace, ft)) == 2
                       else None, 60, what="two workers selected")
    job_pods = {p["metadata"]["name"] for p in get_json(cluster, "-n", namespace, "pods", "-l", "job-name=ft")["items"]}
    assert workers == job_pods
    rules = ft["spec"]["ingress"]
    assert rules[0] == {"from": [{"podSelector": ft["spec"]["podSelector"]}]}  # rendezvous, torch: own pods only
    assert all(r.get("ports") == [{"protocol": "TCP", "port": 9090}] for r in rules[1:])

    isvc = wait_for(lambda: owned_policy(cluster, namespace, "inferenceservice", "chat"), 60,
                    what="the InferenceService's policy")
    dep = wait_for(lambda: get_or_none(cluster, namespace, "deployment", "chat"), 60, what="the Deployment")
    dep_selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
    servers = wait_for(lambda: {p["metadata"]["name"] for p in
                                get_json(cluster, "-n", namespace, "pods", "-l", dep_selector)["items"]} or None,
                       60, what="server pods")
    assert selected_pods(cluster, namespace, isvc) == servers
    assert isvc["spec"]["ingress"][0] == {"from": [{"podSelector": {}}],
                                          "ports": [{"protocol": "TCP", "port": 8000}, {"protocol": "TCP", "port": 8001}]}
    assert "bystander" not in workers | servers
