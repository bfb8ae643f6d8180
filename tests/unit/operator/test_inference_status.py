"""InferenceService status (``inference_status``): validation, status from the Deployment,
load failures (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubeforge.api import InvalidSpec
from kubeforge.builders import inference as ib
from kubeforge.controllers import inference_status as ic
from kubeforge.controllers.conditions import reject
from kubeforge.controllers.references import Resolution, resolve_uri

AT = "2026-01-01T00:00:00Z"
READY = resolve_uri("s3://m/base")
WAITING = Resolution("waiting", reason="WaitingForInput", message="waiting for FineTuneJob ft to succeed (it is Running)")
FAILED = Resolution("failed", reason="InputFailed", message="FineTuneJob ft failed: BackoffLimitExceeded")


def isvc(name="chat", status=None, generation=1, **spec):
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "ns", "uid": "u1", "generation": generation},
            "spec": {"model": {"uri": "s3://m/base"}, **spec}, "status": status or {}}


def deployment(replicas=1, ready=1, updated=None, available=None, total=None, generation=1, observed=1,
               revision="rev1", uri="s3://m/base", conditions=()):
    return {"metadata": {"generation": generation},
            "spec": {"replicas": replicas, "template": {"metadata": {"annotations": {
                ib.ANNOTATION_MODEL_URI: uri, ib.ANNOTATION_MODEL_REVISION: revision}}}},
            "status": {"observedGeneration": observed, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated,
                       "availableReplicas": ready if available is None else available,
                       "replicas": replicas if total is None else total, "conditions": list(conditions)}}


def pod(name="p1", revision="rev1", waiting=None, terminated=None, last=None):
    cs = {"name": "server", "state": {}}
    if waiting:
        cs["state"]["waiting"] = waiting
    if terminated:
        cs["state"]["terminated"] = terminated
    if last:
        cs["lastState"] = {"terminated": last}
    return {"metadata": {"name": name, "annotations": {ib.ANNOTATION_MODEL_REVISION: revision}},
            "status": {"containerStatuses": [cs]}}


def cond(st, t):
    return next(c for c in st["conditions"] if c["type"] == t)


def compute_status(obj, resolution, deployment, pods, at):
    return ic.compute(obj, resolution=resolution, deployment=deployment, pods=pods, now=at)


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["9lives", "a" * 64, "Upper"])
def test_name_must_be_a_dns_1035_label(name):
    with pytest.raises(InvalidSpec, match="DNS-1035"):
        ic.validate(isvc(name))


def test_adapter_names_unique_and_distinct_from_the_service():
    with pytest.raises(InvalidSpec, match="repeated: a"):
        ic.validate(isvc(adapters=[{"name": "a", "uri": "s3://x/a"}, {"name": "a", "uri": "s3://x/b"}]))
    with pytest.raises(InvalidSpec, match="clashes"):
        ic.validate(isvc(adapters=[{"name": "chat", "uri": "s3://x/a"}]))
    with pytest.raises(ValidationError):
        ic.validate(isvc(replicas={"min": 1, "max": 1, "extra": 2}))


def test_kv_block_size_the_server_refuses_is_rejected_by_the_api():
    from kubeforge_runtime.serve.config import EngineConfig

    from kubeforge.api.inference import EngineSpec

    # The API's lower bound is the server's: the API server itself refuses what would crash-loop.
    assert EngineSpec.model_fields["kv_block_size"].metadata[0].ge == EngineConfig.model_fields["kv_block_size"].metadata[0].ge
    with pytest.raises(ValidationError, match="kv_block_size|kvBlockSize"):
        ic.validate(isvc(engine={"kvBlockSize": 2}))
    ic.validate(isvc(engine={"kvBlockSize": 4}))


def test_invalid_status_is_written_once():
    out = reject(isvc(), "bad", AT)
    c = cond(out.status, "Accepted")
    assert (c["status"], c["reason"], c["message"]) == ("False", "InvalidSpec", "bad")
    assert [e.reason for e in out.events] == ["InvalidSpec"]
    again = reject(isvc(status=out.status), "bad", AT)
    assert again.events == [] and again.status == out.status


# --- before a Deployment exists ----------------------------------------------------------------------
def test_waiting_for_the_reference():
    out = compute_status(isvc(), WAITING, None, [], AT)
    st = out.status
    assert st["phase"] == "WaitingForInput"
    assert cond(st, "ModelReady")["reason"] == "WaitingForInput" and cond(st, "Ready")["status"] == "False"
    assert "FineTuneJob ft" in cond(st, "Ready")["message"]
    assert st["url"] == "http://chat.ns.svc:8000/v1" and st["replicas"] == {"ready": 0, "desired": 0}
    assert {"Accepted", "WaitingForInput"} <= {e.reason for e in out.events}


def test_failed_reference_without_anything_served_is_failed():
    st = compute_status(isvc(), FAILED, None, [], AT).status
    assert st["phase"] == "Failed" and cond(st, "Ready")["reason"] == "InputFailed"


# --- with a Deployment ------------------------------------------------------------------------------
def test_serving_when_rolled_out_and_ready():
    out = compute_status(isvc(), READY, deployment(replicas=2, ready=2), [], AT)
    st = out.status
    assert st["phase"] == "Running"
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ("True", "Serving")
    assert (cond(st, "ModelReady")["status"], cond(st, "ModelReady")["reason"]) == ("True", "ModelLoaded")
    assert st["replicas"] == {"ready": 2, "desired": 2}
    assert (st["modelUri"], st["modelRevision"], st["observedGeneration"]) == ("s3://m/base", "rev1", 1)


def test_loading_before_any_replica_is_ready():
    st = compute_status(isvc(), READY, deployment(ready=0, available=0), [], AT).status
    assert st["phase"] == "Pending"
    assert cond(st, "ModelReady")["reason"] == "Loading" and cond(st, "Ready")["reason"] == "Loading"


def test_rolling_out_a_new_revision_keeps_serving():
    old = compute_status(isvc(), READY, deployment(), [], AT).status
    dep = deployment(replicas=1, ready=1, updated=0, total=2, generation=2, observed=2, revision="rev2", uri="s3://m/v2")
    out = compute_status(isvc(status=old), READY, dep, [], AT)
    st = out.status
    assert st["phase"] == "Running" and cond(st, "Ready")["status"] == "True"
    assert "rolling out revision rev2" in cond(st, "Ready")["message"]
    assert cond(st, "ModelReady")["reason"] == "Loading"
    assert st["modelRevision"] == "rev2"
    assert "RollingOut" in {e.reason for e in out.events}


def test_deployment_not_yet_observed_is_not_rolled_out():
    dep = deployment(generation=3, observed=2)
    assert not ic.rollout_complete(dep)
    assert ic.rollout_complete(deployment())


def test_crash_looping_current_revision_is_model_load_failed():
    p = pod(waiting={"reason": "CrashLoopBackOff", "message": "back-off 5m0s"},
            last={"exitCode": 78, "reason": "Error", "message": "invalid serving config: unknown key 'x'"})
    out = compute_status(isvc(), READY, deployment(ready=0, available=0), [p], AT)
    st = out.status
    assert st["phase"] == "Failed"
    mr = cond(st, "ModelReady")
    assert mr["reason"] == "ModelLoadFailed" and "configuration error" in mr["message"]
    assert "unknown key 'x'" in mr["message"] and "CrashLoopBackOff" in mr["message"]
    assert cond(st, "Ready")["reason"] == "ModelLoadFailed"
    assert any(e.type == "Warning" and e.reason == "ModelLoadFailed" for e in out.events)


def test_failed_new_revision_while_old_replicas_serve():
    dep = deployment(replicas=1, ready=1, updated=1, total=2, revision="rev2")
    p_new = pod("new", "rev2", terminated={"exitCode": 1, "reason": "Error", "message": "CUDA out of memory"})
    p_old = pod("old", "rev1")
    st = compute_status(isvc(), READY, dep, [p_old, p_new], AT).status
    assert st["phase"] == "Running" and cond(st, "Ready")["status"] == "True"
    assert cond(st, "ModelReady")["reason"] == "ModelLoadFailed" and "out of memory" in cond(st, "ModelReady")["message"]


def test_old_revision_failures_are_ignored():
    p_old = pod("old", "rev0", terminated={"exitCode": 1})
    st = compute_status(isvc(), READY, deployment(), [p_old], AT).status
    assert cond(st, "ModelReady")["status"] == "True"


def test_progress_deadline_is_model_load_failed():
    dep = deployment(ready=0, available=0, conditions=[{"type": "Progressing", "status": "False",
                                                         "reason": "ProgressDeadlineExceeded",
                                                         "message": "ReplicaSet has timed out progressing."}])
    st = compute_status(isvc(), READY, dep, [], AT).status
    assert cond(st, "ModelReady")["reason"] == "ModelLoadFailed" and "timed out" in cond(st, "ModelReady")["message"]


def test_waiting_for_a_new_output_keeps_serving_the_last_one():
    st = compute_status(isvc(), WAITING, deployment(), [], AT).status
    assert st["phase"] == "Running" and cond(st, "ModelReady")["status"] == "True"
    assert "waiting for FineTuneJob ft" in cond(st, "ModelReady")["message"]


def test_zero_replicas_is_suspended():
    st = compute_status(isvc(), READY, deployment(replicas=0, ready=0, available=0), [], AT).status
    assert st["phase"] == "Suspended" and cond(st, "Ready")["reason"] == "ScaledToZero"


def test_same_observation_gives_the_same_status_and_no_events():
    first = compute_status(isvc(), READY, deployment(), [], AT).status
    again = compute_status(isvc(status=first), READY, deployment(), [], "2026-02-01T00:00:00Z")
    assert again.status == first and again.events == []


def test_served_model_reads_the_template_annotations():
    assert ic.served_model(deployment(revision="r9", uri="s3://x")) == ib.ModelRef("s3://x", "r9")
    assert ic.served_model(None) is None
    assert ic.served_model({"spec": {"template": {"metadata": {}}}}) is None


# --- the table: what one sync reads -> phase, conditions, events ----------------------------------
ACCEPTED = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "spec is valid",
            "lastTransitionTime": AT, "observedGeneration": 1}
CRASHING = pod(waiting={"reason": "CrashLoopBackOff"}, last={"exitCode": 1, "message": "boom"})

TABLE = [
    # id, previous phase (None: new), input, Deployment, pods -> phase, ModelReady, Ready, events
    ("new, input running", None, WAITING, None, [],
     "WaitingForInput", ("False", "WaitingForInput"), ("False", "WaitingForInput"), ["Accepted", "WaitingForInput"]),
    ("new, input failed", None, FAILED, None, [],
     "Failed", ("False", "InputFailed"), ("False", "InputFailed"), ["Accepted", "InputFailed"]),
    ("input ready, no Deployment yet", "WaitingForInput", READY, None, [],
     "Pending", ("False", "Loading"), ("False", "Loading"), ["Loading"]),
    ("rolling out, nothing ready", "Pending", READY, deployment(ready=0, available=0), [pod()],
     "Pending", ("False", "Loading"), ("False", "Loading"), []),
    ("ready", "Pending", READY, deployment(), [],
     "Running", ("True", "ModelLoaded"), ("True", "Serving"), ["Serving"]),
    ("crash looping", "Pending", READY, deployment(ready=0, available=0), [CRASHING],
     "Failed", ("False", "ModelLoadFailed"), ("False", "ModelLoadFailed"), ["ModelLoadFailed"]),
    ("recovered", "Failed", READY, deployment(), [],
     "Running", ("True", "ModelLoaded"), ("True", "Serving"), ["Serving"]),
    ("scaled to zero", "Running", READY, deployment(replicas=0, ready=0, available=0), [],
     "Suspended", ("False", "ScaledToZero"), ("False", "ScaledToZero"), ["ScaledToZero"]),
    ("new output awaited, old one serves", "Running", WAITING, deployment(), [],
     "Running", ("True", "ModelLoaded"), ("True", "Serving"), []),
]


@pytest.mark.parametrize("prev_phase, resolution, dep, pods, phase, model_ready, ready, events",
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_status_table(prev_phase, resolution, dep, pods, phase, model_ready, ready, events):
    prev = {"phase": prev_phase, "conditions": [ACCEPTED], "observedGeneration": 1} if prev_phase else {}
    out = ic.compute(isvc(status=prev), resolution=resolution, deployment=dep, pods=pods, now=AT)
    st = out.status
    assert st["phase"] == phase
    assert (cond(st, "ModelReady")["status"], cond(st, "ModelReady")["reason"]) == model_ready
    assert (cond(st, "Ready")["status"], cond(st, "Ready")["reason"]) == ready
    assert [e.reason for e in out.events] == events
    # Nothing new seen: the same status, no event (a sync writes nothing).
    again = ic.compute(isvc(status=st), resolution=resolution, deployment=dep, pods=pods, now="2026-03-03T00:00:00Z")
    assert again.status == st and again.events == []
