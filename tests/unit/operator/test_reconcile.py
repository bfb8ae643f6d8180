"""The shared reconcile loop (controllers/reconcile.py) against an in-memory API: accept and
reject, the resourceVersion-guarded write and its retry, forgetting deleted objects, metrics
for every kind, serialised syncs, debounced and coalesced syncs, reference fan-out, and the
apply path that never takes over a foreign object of a child's name."""

from __future__ import annotations

import asyncio
import json

import copy
import threading
import time

import pytest
from kubernetes.client.rest import ApiException
from prometheus_client import REGISTRY

from kubeforge import kube
from kubeforge.api import QuantizeJob
from kubeforge.controllers import quantize_status
from kubeforge.controllers.conditions import Event, Outcome, accept, reject
from kubeforge.controllers import events, reconcile
from kubeforge.controllers.reconcile import (
    ChildConflict, ChildRefused, Debouncer, Reconciler, apply_children, controlled_by, merge_hints, owned_by,
)

AT = "2026-01-01T00:00:00Z"


class FakeAPI:
    """Just enough of the API server: objects with resourceVersions, status writes, events."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.events: list[dict] = []
        self.applied: list[dict] = []
        self.refused: set[tuple[str, str]] = set()  # (kind, name) the API server answers 422
        self.dry_creates: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.reads: list[tuple[str, str]] = []
        self.status_writes = 0
        self.conflicts = 0
        """Writes still to fail with 409 (another writer got there first)."""
        self._rv = 100  # as on a real API server, no object has resourceVersion "1" (etcd's first write is revision 2)

    def put(self, kind: str, obj: dict) -> None:
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self.objects[(kind, obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def get(self, kind, namespace, name):
        self.reads.append((kind, name))
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list_(self, kind, namespace, label_selector=None):
        return [copy.deepcopy(o) for (k, ns, _n), o in self.objects.items() if (k, ns) == (kind, namespace)]

    def patch_merge(self, kind, namespace, name, patch, subresource=None):
        obj = self.objects[(kind, namespace, name)]
        if self.conflicts:
            self.conflicts -= 1
            self.put(kind, obj)  # someone else wrote it: a new resourceVersion
            raise ApiException(status=409, reason="Conflict")
        if patch.get("metadata", {}).get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
            raise ApiException(status=409, reason="Conflict")
        obj = copy.deepcopy(obj)
        if subresource == "status":
            obj["status"] = patch["status"]
            self.status_writes += 1
        self.put(kind, obj)
        return self.get(kind, namespace, name)

    def create(self, kind, namespace, obj, name=None, subresource=None, dry_run=False):
        if dry_run:  # a dry-run create of a child: 409 when the name is taken, 422 when refused
            self.dry_creates.append((kind, obj["metadata"]["name"]))
            if (kind, obj["metadata"]["name"]) in self.refused:
                raise ApiException(status=422, reason="Unprocessable Entity")
            if (kind, namespace, obj["metadata"]["name"]) in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
            return obj
        self.events.append(obj)
        return obj

    def server_side_apply(self, obj, dry_run=False):
        meta = obj["metadata"]
        if (obj["kind"], meta["name"]) in self.refused:
            raise ApiException(status=422, reason="Unprocessable Entity")
        existing = self.objects.get((obj["kind"], meta["namespace"], meta["name"]))
        if existing is not None and meta.get("resourceVersion") not in (None, existing["metadata"]["resourceVersion"]):
            raise ApiException(status=409, reason="Conflict")  # a resourceVersion in an apply is a precondition
        if dry_run:
            return obj
        self.applied.append(obj)
        obj = copy.deepcopy(obj)
        obj["metadata"].pop("resourceVersion", None)  # a create stores none of the caller's
        obj["metadata"].setdefault("uid", f"uid-{obj['kind']}-{meta['name']}")
        self.put(obj["kind"], obj)
        return self.get(obj["kind"], meta["namespace"], meta["name"])

    def delete(self, kind, namespace, name, propagation="Background", uid=None):
        obj = self.objects.get((kind, namespace, name))
        if obj is None or (uid is not None and obj["metadata"].get("uid") != uid):
            return False
        del self.objects[(kind, namespace, name)]
        self.deleted.append((kind, name))
        return True

    def names(self, *kinds) -> list[tuple[str, str]]:
        return sorted((k, n) for (k, _ns, n) in self.objects if k in kinds)


@pytest.fixture
def api(monkeypatch) -> FakeAPI:
    fake = FakeAPI()
    for fn in ("get", "list_", "patch_merge", "create", "server_side_apply", "delete"):
        monkeypatch.setattr(kube, fn, getattr(fake, fn))
    return fake


def qj(name="q", namespace="ns-rec", **spec) -> dict:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
            "spec": {"model": {"uri": "s3://b/base"}, "output": {"uri": "s3://b/q"}, **spec}}


class Steps:
    """A kind's step that records its calls and reports the phase it is told."""

    def __init__(self, phase="Running", delay=0.0) -> None:
        self.phase, self.delay = phase, delay
        self.calls: list[dict] = []
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, obj, spec, **hints):
        with self._lock:
            self.calls.append(hints)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay)
        with self._lock:
            self.active -= 1
        accepted, events = accept((obj.get("status") or {}).get("conditions"), 1, AT)
        return Outcome({**(obj.get("status") or {}), "phase": self.phase, "conditions": accepted},
                       events + ([Event("Normal", self.phase, "now")] if obj.get("status", {}).get("phase") != self.phase else []))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reasons(api: FakeAPI) -> list[str]:
    events.drain()  # posted in the background
    return [e["reason"] for e in api.events]


# --- accept / reject (pure) ------------------------------------------------------------------------
def test_accept_posts_one_event_per_generation():
    conds, events = accept(None, 1, AT)
    assert [e.reason for e in events] == ["Accepted"] and conds[0]["observedGeneration"] == 1
    assert accept(conds, 1, AT)[1] == []
    conds2, events = accept(conds, 2, AT)
    assert [e.message for e in events] == ["generation 2 accepted"]
    assert conds2[0]["lastTransitionTime"] == AT  # still True: no transition


def test_reject_keeps_the_phase_and_warns_once_per_message():
    out = reject({**qj(), "status": {"phase": "Running"}}, "spec.method: bad", AT)
    c = out.status["conditions"][0]
    assert (c["status"], c["reason"], c["message"]) == ("False", "InvalidSpec", "spec.method: bad")
    assert out.status["phase"] == "Running" and out.status["observedGeneration"] == 1
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "InvalidSpec")]
    assert reject({**qj(), "status": out.status}, "spec.method: bad", AT).events == []
    assert len(reject({**qj(), "status": out.status}, "spec.method: worse", AT).events) == 1
    assert reject(qj(), "x", AT).status["phase"] == "Pending"


def test_merge_hints_and_owned_by():
    assert merge_hints({"apply": True}, {"apply": False, "job_hint": {"a": 1}}) == {"apply": True, "job_hint": {"a": 1}}
    assert merge_hints({"job_hint": {"old": 1}}, {"job_hint": {"new": 1}}) == {"job_hint": {"new": 1}}
    owner = qj()
    assert owned_by({"metadata": {"ownerReferences": [{"uid": "uid-q"}]}}, owner)
    assert not owned_by({"metadata": {"ownerReferences": [{"uid": "other"}]}}, owner)
    assert not owned_by(None, owner)


# --- the loop ---------------------------------------------------------------------------------------
def test_valid_spec_is_stepped_written_guarded_and_measured(api):
    api.put("QuantizeJob", qj("ok"))
    steps = Steps("Running")
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=steps)
    durations = sample("kubeforge_reconcile_duration_seconds_count", kind="QuantizeJob")
    r.request("ns-rec", "ok", job_hint={"x": 1})
    assert steps.calls == [{"job_hint": {"x": 1}}]
    assert api.get("QuantizeJob", "ns-rec", "ok")["status"]["phase"] == "Running"
    assert reasons(api) == ["Accepted", "Running"]
    assert sample("kubeforge_jobs", kind="QuantizeJob", phase="Running") >= 1
    assert sample("kubeforge_reconcile_duration_seconds_count", kind="QuantizeJob") == durations + 1
    # Again: nothing new, nothing written, no event.
    r.request("ns-rec", "ok")
    assert api.status_writes == 1 and reasons(api) == ["Accepted", "Running"]
    r.forget("ns-rec", "ok")


def test_invalid_spec_is_rejected_once_and_never_stepped(api):
    api.put("QuantizeJob", qj("bad", method="int3"))
    steps = Steps()
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=steps)
    r.request("ns-rec", "bad")
    r.request("ns-rec", "bad")
    st = api.get("QuantizeJob", "ns-rec", "bad")["status"]
    assert st["conditions"][0]["reason"] == "InvalidSpec" and "spec.method" in st["conditions"][0]["message"]
    assert st["phase"] == "Pending" and steps.calls == [] and reasons(api) == ["InvalidSpec"]
    assert api.status_writes == 1
    r.forget("ns-rec", "bad")


def test_a_conflicting_write_is_redone_on_a_fresh_read(api):
    api.put("QuantizeJob", qj("busy"))
    steps = Steps()
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=steps)
    api.conflicts = 2
    r.request("ns-rec", "busy")
    assert len(steps.calls) == 3 and api.status_writes == 1
    assert reasons(api) == ["Accepted", "Running"]  # events only for the write that happened
    r.forget("ns-rec", "busy")


def test_a_conflicting_write_recomputes_the_status_without_applying_the_children_again(api):
    api.put("QuantizeJob", qj("busy2"))
    steps = Steps()
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=steps)
    api.conflicts = 1
    r.request("ns-rec", "busy2", apply=True, job_hint={"j": 1})
    assert steps.calls == [{"apply": True, "job_hint": {"j": 1}}, {"job_hint": {"j": 1}}]
    assert api.status_writes == 1
    r.forget("ns-rec", "busy2")


def test_a_namespace_being_deleted_ends_the_sync_quietly(api, caplog):
    """Namespace deletion removes the children first; the step's re-apply is then refused with
    403 "being terminated" (a fault caused here by a step that raises it, as the API server
    answers): the sync ends without an error and is not retried. Any other 403 still raises."""
    from kubernetes.client.exceptions import ApiException

    def refused(message):
        exc = ApiException(status=403, reason="Forbidden")
        exc.body = json.dumps({"kind": "Status", "reason": "Forbidden", "message": message})
        return exc

    api.put("QuantizeJob", qj("gone-ns"))

    def step(obj, spec, **hints):
        raise refused('networkpolicies "x" is forbidden: unable to create new content in namespace ns-rec '
                      'because it is being terminated')

    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=step)
    with caplog.at_level("INFO"):
        r.request("ns-rec", "gone-ns")
    assert "namespace ns-rec is being deleted" in caplog.text and api.status_writes == 0

    def other(obj, spec, **hints):
        raise refused("jobs.batch is forbidden: User cannot create resource")

    with pytest.raises(ApiException):
        Reconciler(QuantizeJob, validate=quantize_status.validate, step=other).request("ns-rec", "gone-ns")
    r.forget("ns-rec", "gone-ns")


def test_a_deleted_object_is_forgotten(api):
    forgotten = []
    api.put("QuantizeJob", qj("gone"))
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=Steps("Succeeded"),
                   on_forget=lambda ns, n: forgotten.append((ns, n)))
    r.request("ns-rec", "gone")
    assert sample("kubeforge_jobs", kind="QuantizeJob", phase="Succeeded") >= 1
    before = sample("kubeforge_jobs", kind="QuantizeJob", phase="Succeeded")
    del api.objects[("QuantizeJob", "ns-rec", "gone")]
    r.request("ns-rec", "gone")
    assert forgotten == [("ns-rec", "gone")]
    assert sample("kubeforge_jobs", kind="QuantizeJob", phase="Succeeded") == before - 1


def test_a_deleted_event_schedules_the_sync_that_forgets(monkeypatch):
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=Steps())
    scheduled = []
    monkeypatch.setattr(r, "schedule", lambda ns, name, **hints: scheduled.append((ns, name)))
    r.on_event(type="MODIFIED", name="q", namespace="ns", body={})
    r.on_event(type="DELETED", name="q", namespace="ns", body={})
    assert scheduled == [("ns", "q")]


def test_syncs_of_one_object_never_overlap(api):
    api.put("QuantizeJob", qj("slow"))
    steps = Steps(delay=0.05)
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=steps)
    threads = [threading.Thread(target=r.request, args=("ns-rec", "slow")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(steps.calls) == 4 and steps.most_active == 1
    r.forget("ns-rec", "slow")


def test_fan_out_schedules_the_referencing_objects_when_the_job_changes(api, monkeypatch):
    api.put("QuantizeJob", qj("uses-ft", model={"fineTuneJobRef": {"name": "ft"}}))
    api.put("QuantizeJob", qj("uses-other", model={"fineTuneJobRef": {"name": "other"}}))
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=Steps())
    scheduled = []
    monkeypatch.setattr(r, "schedule", lambda ns, name, **hints: scheduled.append((ns, name, hints)))
    ft = {"metadata": {"uid": "f1"}, "status": {"phase": "Running"}}
    r.fan_out("fineTuneJobRef", ft, "ft", "ns-rec", "MODIFIED", apply=True)
    assert scheduled == [("ns-rec", "uses-ft", {"apply": True})]
    r.fan_out("fineTuneJobRef", {**ft, "status": {"phase": "Running", "progress": {"step": 9}}}, "ft", "ns-rec", "MODIFIED")
    assert len(scheduled) == 1  # progress is no news to the consumers
    r.fan_out("fineTuneJobRef", {**ft, "status": {"phase": "Succeeded", "output": {"uri": "s3://m"}}}, "ft", "ns-rec",
              "MODIFIED")
    assert len(scheduled) == 2


def test_debouncer_coalesces_a_burst_into_one_sync_with_merged_hints():
    class Target:
        def __init__(self):
            self.runs, self.done = [], threading.Event()

        def run_scheduled(self, namespace, name, hints):
            self.runs.append((namespace, name, hints))
            self.done.set()

    target, d = Target(), Debouncer(0.1)
    try:
        d.schedule(target, "ns", "a", {"apply": True})
        d.schedule(target, "ns", "a", {})
        d.schedule(target, "ns", "a", {"job_hint": {"j": 1}})
        assert target.done.wait(5)
        time.sleep(0.2)
        assert target.runs == [("ns", "a", {"apply": True, "job_hint": {"j": 1}})]
    finally:
        d.stop()


# --- children: never over a foreign object ---------------------------------------------------------
def child(kind: str, name: str, owner_uid: str | None = "uid-q", controller: bool = True, **fields) -> dict:
    meta = {"name": name, "namespace": "ns-rec"}
    if owner_uid:
        meta["ownerReferences"] = [{"uid": owner_uid, "controller": controller}]
    return {"kind": kind, "metadata": meta, **fields}


def test_controlled_by_needs_the_owners_uid_as_controller():
    owner = qj()
    assert controlled_by(child("Service", "s"), owner)
    assert not controlled_by(child("Service", "s", controller=False), owner)  # only an owner, not the controller
    assert not controlled_by(child("Service", "s", owner_uid="other"), owner)
    assert not controlled_by(child("Service", "s", owner_uid=None), owner)


def test_apply_children_touches_nothing_when_one_name_is_taken(api):
    owner = {**qj(), "kind": "QuantizeJob"}
    api.put("Service", child("Service", "q", owner_uid=None, spec={"selector": {"app": "theirs"}}))
    api.put("ConfigMap", child("ConfigMap", "q-config"))  # ours from an earlier sync: fine
    with pytest.raises(ChildConflict) as err:
        apply_children(owner, [child("ConfigMap", "q-config", data={"a": "1"}),
                               child("Service", "q", spec={"selector": {"app": "ours"}})])
    assert str(err.value).startswith("Service q already exists and is not controlled by this QuantizeJob")
    assert api.applied == []  # checked first, so not even the ConfigMap was applied
    assert api.get("Service", "ns-rec", "q")["spec"] == {"selector": {"app": "theirs"}}
    # Absent or already ours: applied.
    applied = apply_children(owner, [child("ConfigMap", "q-config", data={"a": "1"}), child("Service", "other")])
    assert [a["metadata"]["name"] for a in applied] == ["q-config", "other"]


def test_a_fresh_owner_creates_each_child_with_one_guarded_apply_and_reads_nothing(api):
    owner = {**qj(), "kind": "QuantizeJob"}
    kids = [child("ConfigMap", "q-config", data={"a": "1"}), child("Job", "q")]
    applied = apply_children(owner, kids, fresh=True)
    assert [a["metadata"]["name"] for a in applied] == ["q-config", "q"]
    assert api.dry_creates == [] and [a["metadata"]["resourceVersion"] for a in api.applied] == ["1", "1"]
    assert api.reads == [("ConfigMap", "q-config"), ("Job", "q")]  # only the fake apply reading back its answers


def test_a_fresh_owner_never_takes_over_a_foreign_object_and_keeps_no_child(api):
    owner = {**qj(), "kind": "QuantizeJob"}
    api.put("Service", child("Service", "q", owner_uid=None, spec={"selector": {"app": "theirs"}}))
    theirs = api.get("Service", "ns-rec", "q")
    with pytest.raises(ChildConflict) as err:
        apply_children(owner, [child("ConfigMap", "q-config"), child("Service", "q", spec={"selector": {"app": "ours"}}),
                               child("Job", "q")], fresh=True)
    assert str(err.value).startswith("Service q already exists and is not controlled by this QuantizeJob")
    assert api.get("Service", "ns-rec", "q") == theirs  # not even a no-op apply over it
    # The ConfigMap created beside it is deleted again; the Job (the next wave) never sent.
    assert api.deleted == [("ConfigMap", "q-config")] and api.names("ConfigMap", "Job") == []
    assert [a["kind"] for a in api.applied] == ["ConfigMap"]  # the Service's guarded apply answered 409
    api.refused.add(("Job", "q"))
    with pytest.raises(ChildRefused):
        apply_children(owner, [child("ConfigMap", "q-config"), child("Job", "q")], fresh=True)
    assert api.names("ConfigMap", "Job") == []


def test_a_fresh_owner_whose_child_exists_already_reads_it_and_applies_its_own(api):
    """An operator restarted between the apply and the status write: the child is there and ours."""
    owner = {**qj(), "kind": "QuantizeJob"}
    api.put("ConfigMap", child("ConfigMap", "q-config", data={"a": "0"}))
    applied = apply_children(owner, [child("ConfigMap", "q-config", data={"a": "1"}), child("Job", "q")], fresh=True)
    assert applied[0]["data"] == {"a": "1"} and ("ConfigMap", "q-config") in api.reads
    # A later failure deletes only what this call created, never a child that was there before.
    api.objects.pop(("Job", "ns-rec", "q"))
    api.refused.add(("Job", "q"))
    with pytest.raises(ChildRefused):
        apply_children(owner, [child("ConfigMap", "q-config", data={"a": "2"}), child("Job", "q")], fresh=True)
    assert api.get("ConfigMap", "ns-rec", "q-config")["data"] == {"a": "2"} and api.deleted == []


def test_a_child_the_api_server_refuses_leaves_every_child_alone_and_is_an_invalid_spec(api):
    """Found by tests/cluster/test_hostile_inputs.py: a template label value of 64 characters
    passed the CRD, then the Job was refused (422) after the Service and ConfigMap existed,
    and the sync failed and was retried forever with no condition."""
    owner = {**qj("bad"), "kind": "QuantizeJob"}
    api.put("QuantizeJob", qj("bad"))
    api.refused.add(("Job", "bad-quantize"))
    kids = [child("ConfigMap", "bad-quantize-config"), child("Job", "bad-quantize")]
    with pytest.raises(ChildRefused) as err:
        apply_children(owner, kids)
    assert str(err.value).startswith("the API server refuses the Job bad-quantize built from this spec")
    assert api.applied == []  # dry-run first: not even the ConfigMap

    def step(obj, spec, **hints):
        apply_children(obj, kids)

    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=step)
    r.request("ns-rec", "bad", apply=True)
    r.request("ns-rec", "bad", apply=True)
    cond = api.get("QuantizeJob", "ns-rec", "bad")["status"]["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Accepted", "False", "InvalidSpec")
    assert "Job bad-quantize" in cond["message"] and api.applied == []
    assert reasons(api) == ["InvalidSpec"]  # once, not per sync
    r.forget("ns-rec", "bad")


def test_a_child_conflict_is_a_condition_and_one_event_and_a_slow_recheck(api, monkeypatch):
    api.put("QuantizeJob", qj("taken"))
    rechecks = []
    monkeypatch.setattr(reconcile, "_debouncer", lambda: type("D", (), {"schedule": lambda self, *a: rechecks.append(a)})())

    def step(obj, spec, **hints):
        raise ChildConflict(obj, "Service", "taken")

    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=step)
    r.request("ns-rec", "taken", apply=True)
    r.request("ns-rec", "taken", apply=True)
    st = api.get("QuantizeJob", "ns-rec", "taken")["status"]
    cond = st["conditions"][0]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Accepted", "False", "ChildConflict")
    assert "Service taken" in cond["message"] and st["phase"] == "Pending"
    assert reasons(api) == ["ChildConflict"] and api.status_writes == 1  # the second sync changed nothing
    # Looked at again later (with the same hints), not in a loop.
    assert [(a[1], a[2], a[3], a[4]) for a in rechecks] == [("ns-rec", "taken", {"apply": True},
                                                             reconcile.CHILD_CONFLICT_RECHECK_SECONDS)] * 2
    r.forget("ns-rec", "taken")


def test_peering_gate_applies_kopfs_rule():
    """Paused while another live peer has a higher or equal priority (kopf's own rule)."""
    import datetime as dt

    from kubeforge.controllers.peering import blocking_peers

    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    fresh = (now - dt.timedelta(seconds=5)).isoformat()
    stale = (now - dt.timedelta(seconds=120)).isoformat()
    peers = {"me": {"priority": 5, "lifetime": 60, "lastseen": fresh},
             "lower": {"priority": 1, "lifetime": 60, "lastseen": fresh},
             "higher-dead": {"priority": 9, "lifetime": 60, "lastseen": stale},
             "garbage": "not a peer"}
    assert blocking_peers(peers, "me", 5, now) == []
    peers["same"] = {"priority": 5, "lifetime": 60, "lastseen": fresh}
    peers["higher"] = {"priority": 7, "lifetime": 60, "lastseen": fresh.replace("+00:00", "Z")}
    assert blocking_peers(peers, "me", 5, now) == ["higher", "same"]


def test_a_scheduled_sync_waits_while_the_replica_is_paused(monkeypatch):
    from kubeforge.controllers import peering, reconcile

    calls, rescheduled = [], []
    monkeypatch.setattr(peering, "active", lambda: False)

    class Recorder:  # stands in for the debouncer: records instead of running a thread
        def schedule(self, *args):
            rescheduled.append(args)

    monkeypatch.setattr(reconcile, "_debouncer", lambda: Recorder())
    r = reconcile.Reconciler.__new__(reconcile.Reconciler)
    r.request = lambda *a, **k: calls.append(a)  # type: ignore[method-assign]
    reconcile.Reconciler.run_scheduled(r, "ns", "x", {})
    assert calls == [] and rescheduled and rescheduled[0][-1] == peering.PAUSED_RECHECK_SECONDS


# --- children: in waves, the requests of a wave at once ---------------------------------------------
def test_waves_put_each_workload_after_everything_listed_before_it():
    kinds = ["NetworkPolicy", "Service", "ConfigMap", "Job"]
    assert [[c["kind"] for c in w] for w in reconcile.waves([child(k, k.lower()) for k in kinds])] == \
        [["NetworkPolicy", "Service", "ConfigMap"], ["Job"]]
    kinds = ["NetworkPolicy", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    assert [[c["kind"] for c in w] for w in reconcile.waves([child(k, k.lower()) for k in kinds])] == \
        [["NetworkPolicy", "ConfigMap"], ["Deployment"], ["Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]]
    assert reconcile.waves([]) == []


@pytest.mark.parametrize("fresh", [True, False])
def test_a_waves_checks_and_applies_go_out_at_once_and_the_workload_after_them(api, monkeypatch, fresh):
    """Each apply of the first wave waits at a barrier for the other two (and, for an owner whose
    children may exist, each of the four checks for the others): sent one after the other, they
    would never meet (BrokenBarrierError). The Job is applied only after all three."""
    owner = {**qj(), "kind": "QuantizeJob"}
    kids = [child("NetworkPolicy", "q"), child("Service", "q"), child("ConfigMap", "q-config"), child("Job", "q")]
    together = {"dry": threading.Barrier(4, timeout=5), "apply": threading.Barrier(3, timeout=5)}
    order: list[str] = []
    ssa = api.server_side_apply

    def apply(obj, dry_run=False):
        if dry_run:
            together["dry"].wait()
        elif obj["kind"] != "Job":
            together["apply"].wait()
        if not dry_run:
            order.append(obj["kind"])
        return ssa(obj, dry_run)

    monkeypatch.setattr(kube, "server_side_apply", apply)
    applied = apply_children(owner, kids, fresh=fresh)
    assert [a["kind"] for a in applied] == ["NetworkPolicy", "Service", "ConfigMap", "Job"]  # in list order
    assert order[-1] == "Job" and sorted(order[:3]) == ["ConfigMap", "NetworkPolicy", "Service"]


def test_a_wave_raises_the_first_failure_in_list_order_and_keeps_nothing(api):
    owner = {**qj(), "kind": "QuantizeJob"}
    api.put("ConfigMap", child("ConfigMap", "q-config", owner_uid=None))
    api.refused.add(("NetworkPolicy", "q"))
    kids = [child("Service", "q"), child("ConfigMap", "q-config"), child("NetworkPolicy", "q"), child("Job", "q")]
    with pytest.raises(ChildConflict) as err:  # the ConfigMap is listed before the refused NetworkPolicy
        apply_children(owner, kids, fresh=True)
    assert str(err.value).startswith("ConfigMap q-config already exists")
    # The first wave went out at once; the Service it created is gone again, the Job never sent.
    assert api.deleted == [("Service", "q")] and api.names("Service", "NetworkPolicy", "Job") == []
    assert "Job" not in [a["kind"] for a in api.applied]
    # An owner whose children may exist: every check at once, nothing applied.
    with pytest.raises(ChildConflict):
        apply_children(owner, kids)
    assert "Job" not in [a["kind"] for a in api.applied] and api.names("Service", "NetworkPolicy", "Job") == []


def test_fan_out_with_the_kinds_kopf_index_schedules_the_referrers_without_listing(api, monkeypatch):
    from kubeforge.controllers import finetune, inference, quantize

    # The index as kopf builds it from every object's reference_keys (key -> names).
    index: dict = {}
    for fn, name, spec in [
        (quantize.quantizejob_references, "q1", {"model": {"fineTuneJobRef": {"name": "ft"}}}),
        (quantize.quantizejob_references, "q2", {"model": {"fineTuneJobRef": {"name": "other"}}}),
        (quantize.quantizejob_references, "q3", {"model": {"uri": "s3://b/m"}}),
        (inference.inferenceservice_references, "svc", {"model": {"quantizeJobRef": {"name": "q1"}}}),
        (finetune.finetunejob_references, "student", {"distillation": {"teacher": {"fineTuneJobRef": {"name": "ft"}}}}),
    ]:
        for key, value in asyncio.run(fn(name=name, namespace="ns-rec", spec=spec)).items():
            index.setdefault(key, []).append(value)
    assert asyncio.run(quantize.quantizejob_references(name="q3", namespace="ns-rec", spec={"model": {"uri": "s3://b/m"}})) == {}
    monkeypatch.setattr(kube, "list_", lambda *a, **k: pytest.fail("listed although the index was given"))
    r = Reconciler(QuantizeJob, validate=quantize_status.validate, step=Steps())
    scheduled = []
    monkeypatch.setattr(r, "schedule", lambda ns, name, **hints: scheduled.append((ns, name, hints)))
    ft = {"metadata": {"uid": "f1"}, "status": {"phase": "Running"}}
    r.fan_out("fineTuneJobRef", ft, "ft", "ns-rec", "MODIFIED", index=index, apply=True)
    assert scheduled == [("ns-rec", "q1", {"apply": True})]
    r.fan_out("fineTuneJobRef", ft, "ft", "ns-rec", "MODIFIED", index=index)
    assert len(scheduled) == 1  # no news
    r.fan_out("quantizeJobRef", {"metadata": {"uid": "x"}, "status": {"phase": "Succeeded"}}, "q1", "ns-rec", "MODIFIED",
              index=index)
    assert scheduled[-1] == ("ns-rec", "svc", {})
    r.fan_out("fineTuneJobRef", {**ft, "status": {"phase": "Succeeded"}}, "ft", "ns-rec", "MODIFIED",
              spec_path=("distillation", "teacher"), index=index)
    assert scheduled[-1] == ("ns-rec", "student", {})
    r.fan_out("fineTuneJobRef", {**ft, "status": {"phase": "Failed"}}, "ft", "other-ns", "MODIFIED", index=index)
    assert len(scheduled) == 3  # another namespace's job of that name is no news to these
