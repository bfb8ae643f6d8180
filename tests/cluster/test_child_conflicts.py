"""A resource never takes over an unrelated object that has a child's name (issue 17, takeover by name).

Children are applied by server-side apply with force; before the shared apply path checked
ownership, a FineTuneJob or InferenceService named like an existing Service rewrote that
Service's selector and added its own ownerReference, through which the garbage collector
deleted the Service along with the resource. Here the foreign object is created first, then
the resource: the object must stay exactly as it was (no selector or data change, no
ownerReference), still be there once the resource is deleted and its real children are
garbage-collected, and the resource's ``Accepted`` condition must name it.
"""

from __future__ import annotations

import json

import pytest
import yaml

from support.waiting import get_json, wait_for

pytestmark = pytest.mark.cluster

GROUP = "kubeforge.io/v1alpha1"


def apply(cluster, namespace: str, obj: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj), check=True)


def get_or_none(cluster, namespace: str, kind: str, name: str) -> dict | None:
    out = cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


FOREIGN_SERVICE = {"apiVersion": "v1", "kind": "Service",
                   "spec": {"selector": {"app": "billing"}, "ports": [{"port": 80, "targetPort": 8080}]}}
FOREIGN_CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"owner": "someone else"}}

CASES = {
    # kind: (resource spec, foreign object, its name as a function of the resource's name)
    "FineTuneJob": ({"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "s3://data/train.jsonl"},
                     "output": {"uri": "s3://models/ft"}}, FOREIGN_SERVICE, lambda n: n),
    "InferenceService": ({"model": {"uri": "s3://models/base"}}, FOREIGN_SERVICE, lambda n: n),
    "QuantizeJob": ({"model": {"uri": "s3://models/base"}, "output": {"uri": "s3://models/q"}},
                    FOREIGN_CONFIGMAP, lambda n: f"{n}-quantize-config"),
}


def _kept_fields(obj: dict) -> dict:
    return {"labels": obj["metadata"].get("labels"), "ownerReferences": obj["metadata"].get("ownerReferences"),
            "selector": obj.get("spec", {}).get("selector"), "data": obj.get("data")}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_foreign_object_with_a_childs_name_is_left_alone_and_named(cluster, namespace, operator_process, kind):
    spec, foreign_template, foreign_name = CASES[kind]
    name = "billing"
    foreign = {**foreign_template, "metadata": {"name": foreign_name(name), "labels": {"team": "billing"}}}
    foreign_kind = foreign["kind"]
    apply(cluster, namespace, foreign)
    before = get_json(cluster, "-n", namespace, foreign_kind.lower(), foreign_name(name))

    apply(cluster, namespace, {"apiVersion": GROUP, "kind": kind, "metadata": {"name": name}, "spec": spec})

    def conflict() -> dict | None:
        st = (get_or_none(cluster, namespace, kind.lower(), name) or {}).get("status") or {}
        return next((c for c in st.get("conditions", []) if c["type"] == "Accepted"
                     and c["reason"] == "ChildConflict"), None)

    cond = wait_for(conflict, 60, what=f"{kind} Accepted=False/ChildConflict")
    assert cond["status"] == "False"
    assert f"{foreign_kind} {foreign_name(name)} already exists and is not controlled by this {kind}" in cond["message"]
    events = get_json(cluster, "-n", namespace, "events", "--field-selector",
                      f"involvedObject.name={name},involvedObject.kind={kind}")["items"]
    assert [e["type"] for e in events if e["reason"] == "ChildConflict"] == ["Warning"]

    after = get_json(cluster, "-n", namespace, foreign_kind.lower(), foreign_name(name))
    assert _kept_fields(after) == _kept_fields(before)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not even a no-op apply
    # Checked before anything was applied: no other child exists either.
    for child_kind in ("job", "deployment", "configmap"):
        assert get_json(cluster, "-n", namespace, child_kind, "-l", f"kubeforge.io/{kind.lower()}={name}")["items"] == []

    # Delete the resource; a ConfigMap it really owns shows when the garbage collector has acted.
    owner = get_json(cluster, "-n", namespace, kind.lower(), name)
    apply(cluster, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "gc-witness", "ownerReferences": [{"apiVersion": GROUP, "kind": kind, "name": name,
                                                   "uid": owner["metadata"]["uid"]}]}})
    cluster.kubectl("delete", "-n", namespace, kind.lower(), name, check=True)
    wait_for(lambda: get_or_none(cluster, namespace, "configmap", "gc-witness") is None, 60,
             what="the garbage collector deleting the resource's own dependent")
    survivor = get_or_none(cluster, namespace, foreign_kind.lower(), foreign_name(name))
    assert survivor is not None, f"the foreign {foreign_kind} was garbage-collected with the {kind}"
    assert _kept_fields(survivor) == _kept_fields(before)
