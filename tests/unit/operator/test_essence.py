"""The lean last-handled-configuration storage (controllers/essence.py) against kopf's own.

For a KubeForge object it must build exactly kopf's essence (what kopf diffs to call the
change handlers, and what it stores in the annotation); for the children the operator only
watches it builds none, which is only right while no change or spawning handler is registered
for a kind outside the KubeForge group (the last test keeps that so).
"""

from __future__ import annotations

import copy
import json

import kopf
import pytest

from kubeforge.api import API_VERSION, GROUP
from kubeforge.controllers.essence import LeanDiffBaseStorage

KEY = "last-handled-configuration"


def ftj(**extra_meta) -> dict:
    spec = {"model": {"uri": "hf://acme/tiny@main"}, "nodes": {"min": 2, "max": 2}, "template": {"env": [{"name": "A"}]}}
    return {
        "apiVersion": API_VERSION, "kind": "FineTuneJob",
        "metadata": {
            "name": "a", "namespace": "ns", "uid": "u-1", "resourceVersion": "7", "generation": 2,
            "labels": {"team": "x"},
            "annotations": {
                f"{GROUP}/{KEY}": json.dumps({"spec": spec}),  # kopf's own: never part of the essence
                f"{GROUP}/on_spec": '{"started": "..."}',  # kopf's progress
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "note": "kept",
            },
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "ownerReferences": [{"kind": "Thing", "name": "t", "uid": "o"}],
            **extra_meta,
        },
        "spec": spec,
        "status": {"phase": "Running", "conditions": [{"type": "Running", "status": "True"}]},
    }


BODIES = [
    ftj(),
    ftj(labels={}, annotations={}),  # empty stanzas are dropped by both
    {k: v for k, v in ftj().items() if k != "status"},
    {**ftj(), "metadata": {"name": "bare", "namespace": "ns"}},
    {**ftj(), "spec": {}},
]


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("extra", [None, [("spec",)], ["spec.nodes"], [("status", "phase")], ["metadata.generation"]])
def test_same_essence_as_kopf_for_kubeforge_kinds(body, extra):
    ours = LeanDiffBaseStorage(prefix=GROUP, key=KEY)
    theirs = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key=KEY)
    before = copy.deepcopy(body)
    got = ours.build(body=kopf.Body(body), extra_fields=extra)
    assert got == theirs.build(body=kopf.Body(body), extra_fields=extra)
    assert body == before  # the watched object is not touched
    # and the essence is a copy: changing it changes nothing kopf holds
    if (got.get("spec") or {}).get("nodes"):
        got["spec"]["nodes"]["min"] = 99
        assert body["spec"]["nodes"]["min"] == 2


def test_what_is_stored_is_kopfs_format():
    ours, theirs = LeanDiffBaseStorage(prefix=GROUP, key=KEY), kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key=KEY)
    body = kopf.Body(ftj())
    p1, p2 = kopf.Patch(), kopf.Patch()
    ours.store(body=body, patch=p1, essence=ours.build(body=body))
    theirs.store(body=body, patch=p2, essence=theirs.build(body=body))
    assert p1 == p2 and p1["metadata"]["annotations"]
    assert ours.fetch(body=body) == theirs.fetch(body=body) == {"spec": ftj()["spec"]}


@pytest.mark.parametrize("body", [
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": []},
     "status": {"phase": "Running"}},
    {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {"parallelism": 2}},
    {"apiVersion": f"other.{GROUP}/v1", "kind": "Lookalike", "metadata": {"name": "l"}, "spec": {"x": 1}},
])
def test_no_essence_for_the_children(body):
    assert LeanDiffBaseStorage(prefix=GROUP, key=KEY).build(body=kopf.Body(body)) == {}


def test_change_and_spawning_handlers_only_on_kubeforge_kinds():
    import kubeforge.controllers  # noqa: F401 - registers every handler

    registry = kopf.get_default_registry()
    selectors = registry._changing.get_all_selectors() | registry._spawning.get_all_selectors()
    assert selectors, "no change handler found: the registry is not the operator's"
    assert {s.group for s in selectors} == {GROUP}
