"""FineTuneJob status syncs from the watch cache (controllers/watched.py): a sync that finds
nothing to change makes no API request, one that changes the status makes only its status
patch, guarded by the cached object's resourceVersion; a cached object behind the server's
(a 409, or not showing the last write) defers the sync a few times, then reads fresh; anything
else (an object missing from the cache, an apply) is done on fresh reads, as before.

The FineTuneJob reconciler runs for real; the API is an in-memory stand-in (``kube.get``,
``list_``, ``patch_merge``, ``create``) that counts every request, the one thing under test.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubeforge import kube
from kubeforge.api import FineTuneJobSpec
from kubeforge.builders import finetune as fb
from kubeforge.controllers import finetune as controller
from kubeforge.controllers import events, metrics, reconcile
from kubeforge.controllers.watched import NeedFresh, WatchCache

NS, NAME = "ns-wc", "wc"
LABEL = controller.reconciler.owner_label


class CountingAPI:
    """Objects by (kind, name); every request is counted as ``"VERB Kind"``."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[str] = []
        self._rv = 10

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        return copy.deepcopy(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.requests.append(f"GET {kind}")
        found = self.objects.get((kind, name))
        return copy.deepcopy(found) if found else None

    def list_(self, kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.requests.append(f"LIST {kind}")
        return [copy.deepcopy(o) for (k, _n), o in self.objects.items() if k == kind]

    def patch_merge(self, kind: str, namespace: str, name: str, patch: dict[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        self.requests.append(f"PATCH {kind}" + (f"/{subresource}" if subresource else ""))
        obj = copy.deepcopy(self.objects[(kind, name)])
        guard = (patch.get("metadata") or {}).get("resourceVersion")
        if guard and guard != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")  # as the API server answers
        if subresource == "status":
            obj["status"] = patch["status"]
        return self.put(obj)

    def create(self, kind: str, namespace: str, obj: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.requests.append(f"POST {kind}")
        return obj


class Deferred:
    """The debouncer, as far as a deferred sync goes: what was scheduled, with which delay."""

    def __init__(self) -> None:
        self.scheduled: list[float | None] = []

    def schedule(self, reconciler: Any, namespace: str, name: str, hints: dict[str, Any],
                 delay: float | None = None) -> None:
        self.scheduled.append(delay)


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> Deferred:
    later = Deferred()
    monkeypatch.setattr(reconcile, "_debouncer", lambda: later)
    return later


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, deferred: Deferred) -> CountingAPI:
    fake = CountingAPI()
    for fn in ("get", "list_", "patch_merge", "create"):
        monkeypatch.setattr(kube, fn, getattr(fake, fn))
    cache = WatchCache(LABEL)
    monkeypatch.setattr(controller.reconciler, "cache", cache)
    yield fake
    controller.reconciler.forget(NS, NAME)


def seen(kind: str, obj: dict[str, Any], type: str | None = "MODIFIED") -> None:
    """What a kopf event handler does with a watch event of ``obj``."""
    assert controller.reconciler.cache is not None
    controller.reconciler.cache.observe(kind, {"type": type, "object": copy.deepcopy(obj)})


def ftj() -> dict[str, Any]:
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": NAME, "namespace": NS, "uid": "u-wc", "generation": 1},
            "spec": {"model": {"uri": "hf://a/b"}, "dataset": {"uri": "pvc://d/t.jsonl"},
                     "output": {"uri": "pvc://m/o"}, "nodes": {"min": 2, "max": 2}}}


def pod(index: int, job: dict[str, Any], ready: bool) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{NAME}-{index}-x", "namespace": NS, "uid": f"p{index}",
                         "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {LABEL: NAME},
                         "annotations": {fb.COMPLETION_INDEX_ANNOTATION: str(index)},
                         "ownerReferences": [{"uid": job["metadata"]["uid"], "controller": True}]},
            "status": {"phase": "Running", "podIP": f"10.0.0.{index}",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def setup_job(api: CountingAPI, phase: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A FineTuneJob whose children exist (its first sync's status written), one worker Ready;
    ``phase``: the phase it showed before that sync (of a job that has run before)."""
    obj = api.put({**ftj(), "status": {"phase": phase, "startTime": "2026-01-01T00:00:00Z"}} if phase else ftj())
    job = fb.job(NAME, NS, "u-wc", FineTuneJobSpec.model_validate(obj["spec"]))
    job["metadata"]["uid"] = "j-uid"
    job["status"] = {"startTime": "2026-01-01T00:00:00Z", "active": 2}
    job = api.put(job)
    pods = [api.put(pod(0, job, True)), api.put(pod(1, job, False))]
    controller.reconciler.request(NS, NAME)  # fresh: the cache is empty
    events.drain()  # its events (posted in the background) are not the next sync's requests
    return job, pods


def test_a_sync_that_changes_nothing_is_decided_from_the_cache_without_a_request(api: CountingAPI) -> None:
    job, pods = setup_job(api)
    assert api.requests[:4] == ["GET FineTuneJob", "GET Job", "LIST Pod", "PATCH FineTuneJob/status"]
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Pending"
    for kind, obj in [("FineTuneJob", api.objects[("FineTuneJob", NAME)]), ("Job", job), ("Pod", pods[0]),
                      ("Pod", pods[1])]:
        seen(kind, obj)
    api.requests.clear()
    controller.reconciler.request(NS, NAME)  # a pod event that changed nothing the status shows
    assert api.requests == []


def test_a_change_is_computed_from_the_cache_and_written_with_one_guarded_patch(
        api: CountingAPI, deferred: Deferred) -> None:
    job, pods = setup_job(api)
    for kind, obj in [("FineTuneJob", api.objects[("FineTuneJob", NAME)]), ("Job", job), ("Pod", pods[0])]:
        seen(kind, obj)
    ready = api.put(pod(1, job, True))
    seen("Pod", ready)  # the event that schedules this sync
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    events.drain()  # posted in the background, after the write
    assert api.requests == ["PATCH FineTuneJob/status"]  # a first start posts no Event (the status says it)
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"

    # The cache has not seen that write yet: its FineTuneJob still shows Pending. A sync now must
    # not take "Running computed, Pending shown" for news, nor "Pending" for current: the
    # server's answer to the write is the newer object, and with it the sync costs nothing.
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    assert api.requests == [] and deferred.scheduled == []
    # Without that answer (nor the watch's delivery) it waits for the watch (deferred, no
    # request), and after a few tries reads fresh.
    controller.reconciler._written.pop((NS, NAME))
    for _ in range(reconcile.CACHE_CATCH_UP_TRIES):
        api.requests.clear()
        controller.reconciler.request(NS, NAME)
        assert api.requests == []
    assert deferred.scheduled == [reconcile.CACHE_CATCH_UP_SECONDS] * reconcile.CACHE_CATCH_UP_TRIES
    behind = metrics.FRESH_SYNCS.labels("FineTuneJob", "cache behind")
    before = behind._value.get()
    controller.reconciler.request(NS, NAME)
    assert api.requests == ["GET FineTuneJob", "GET Job", "LIST Pod"]  # and nothing to write
    assert behind._value.get() == before + 1  # counted, with why the cache could not decide
    # Once the watch has delivered the write, the same sync costs nothing.
    seen("FineTuneJob", api.objects[("FineTuneJob", NAME)])
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    assert api.requests == []


def test_a_cached_write_that_meets_a_newer_object_waits_for_the_watch(api: CountingAPI, deferred: Deferred) -> None:
    """The cached FineTuneJob shows the last status written, but the server's has moved on (an
    annotation, a label: anyone's write the watch has not delivered yet): the guarded patch
    answers 409, nothing is posted, and the sync is done again once the watch has it. (A job
    back from Restarting: its return to Running is an Event.)"""
    job, pods = setup_job(api, phase="Restarting")
    for kind, obj in [("FineTuneJob", api.objects[("FineTuneJob", NAME)]), ("Job", job), ("Pod", pods[0])]:
        seen(kind, obj)
    api.put(api.objects[("FineTuneJob", NAME)])  # a newer resourceVersion, not seen by the cache
    seen("Pod", api.put(pod(1, job, True)))
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    assert api.requests == ["PATCH FineTuneJob/status"] and deferred.scheduled == [reconcile.CACHE_CATCH_UP_SECONDS]
    seen("FineTuneJob", api.objects[("FineTuneJob", NAME)])  # the watch delivers it
    api.requests.clear()
    controller.reconciler.request(NS, NAME)  # the deferred sync
    events.drain()
    assert api.requests == ["PATCH FineTuneJob/status", "POST Event"]  # one Running event, after the write
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"


def test_a_cache_behind_the_last_write_never_passes_for_current(api: CountingAPI) -> None:
    """Written Running, the cache still shows Pending, and a worker drops out: the cache alone
    would compute Pending == Pending and write nothing; the status on the server says Running."""
    job, pods = setup_job(api)
    stale = copy.deepcopy(api.objects[("FineTuneJob", NAME)])  # Pending
    seen("FineTuneJob", stale)
    seen("Job", job)
    seen("Pod", pods[0])
    seen("Pod", api.put(pod(1, job, True)))
    controller.reconciler.request(NS, NAME)
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"
    seen("Pod", api.put(pod(1, job, False)))  # not ready again; the FineTuneJob's event still pending
    api.requests.clear()
    # The server's answer to the write (Running) stands in for the watch: bad news, read fresh.
    controller.reconciler.request(NS, NAME)
    assert api.requests[:3] == ["GET FineTuneJob", "GET Job", "LIST Pod"] and "PATCH FineTuneJob/status" in api.requests
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Restarting"
    # Without that answer it waits for the watch, which never delivers, then reads fresh.
    seen("Pod", api.put(pod(1, job, True)))
    controller.reconciler._written.pop((NS, NAME))
    for _ in range(reconcile.CACHE_CATCH_UP_TRIES):
        api.requests.clear()
        controller.reconciler.request(NS, NAME)
        assert api.requests == []
    controller.reconciler.request(NS, NAME)
    assert "PATCH FineTuneJob/status" in api.requests
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"


def test_what_the_cache_does_not_hold_is_read_fresh(api: CountingAPI) -> None:
    job, pods = setup_job(api)
    seen("FineTuneJob", api.objects[("FineTuneJob", NAME)])
    seen("Pod", pods[0])
    seen("Pod", pods[1])
    api.requests.clear()
    controller.reconciler.request(NS, NAME)  # the Job's event has not come yet
    assert api.requests[:3] == ["GET FineTuneJob", "GET Job", "LIST Pod"]
    seen("Job", job)
    seen("Job", job, type="DELETED")  # deleted by hand: gone from the cache, so read fresh again
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    assert api.requests[:2] == ["GET FineTuneJob", "GET Job"]


def test_a_spec_handlers_sync_applies_from_the_cached_object_and_decides_nothing_from_the_cache(
        api: CountingAPI, monkeypatch: pytest.MonkeyPatch, deferred: Deferred) -> None:
    """kopf fills the cache (watching handlers) before it calls the spec handler for the same
    event, so the spec handler applies from the cached object without reading it; it never
    ends early on the cache: the children are always applied and the status computed."""
    job, pods = setup_job(api)
    for kind, obj in [("FineTuneJob", api.objects[("FineTuneJob", NAME)]), ("Job", job), ("Pod", pods[0]),
                      ("Pod", pods[1])]:
        seen(kind, obj)
    applied: list[bool] = []
    monkeypatch.setattr(controller, "apply_children", lambda *a, **k: applied.append(True) or job)
    api.requests.clear()
    controller.reconciler.request(NS, NAME, apply=True)
    assert applied == [True] and "GET FineTuneJob" not in api.requests

    # A cached object behind the server's: the status write meets a newer resourceVersion (409)
    # and is redone, without applying the children again, from the server's answer to this
    # operator's last write (the newer object), or once the watch has delivered it.
    stale = copy.deepcopy(api.objects[("FineTuneJob", NAME)])
    stale["metadata"]["resourceVersion"] = "1"
    stale["status"] = {}
    seen("FineTuneJob", stale)
    conflicts = []
    patch = api.patch_merge

    def guarded(kind, namespace, name, body, subresource=None):
        if body.get("metadata", {}).get("resourceVersion") != api.objects[(kind, name)]["metadata"]["resourceVersion"]:
            conflicts.append(name)
            from kubernetes.client.rest import ApiException
            raise ApiException(status=409, reason="Conflict")
        return patch(kind, namespace, name, body, subresource)

    monkeypatch.setattr(kube, "patch_merge", guarded)
    applied.clear()
    api.requests.clear()
    controller.reconciler.request(NS, NAME, apply=True)
    assert conflicts == [NAME] and applied == [True]  # applied once, before the 409
    assert "GET FineTuneJob" not in api.requests and not deferred.scheduled  # redone from the answer
    seen("FineTuneJob", api.objects[("FineTuneJob", NAME)])
    controller.reconciler.request(NS, NAME)  # the deferred redo
    assert applied == [True] and "GET FineTuneJob" not in api.requests


def test_the_cache_keeps_the_last_object_by_name_and_owner_and_drops_deleted_ones() -> None:
    cache = WatchCache(LABEL)
    a = {"metadata": {"namespace": NS, "name": "p", "labels": {LABEL: "one"}}, "v": 1}
    cache.observe("Pod", {"type": None, "object": a})
    assert cache.list_("Pod", NS, f"{LABEL}=one") == [a] and cache.get("Pod", NS, "p") is a
    b = {"metadata": {"namespace": NS, "name": "p", "labels": {LABEL: "two"}}, "v": 2}
    cache.observe("Pod", {"type": "MODIFIED", "object": b})  # relabelled: moves to its new owner
    assert cache.list_("Pod", NS, f"{LABEL}=one") == [] and cache.list_("Pod", NS, f"{LABEL}=two") == [b]
    cache.observe("Pod", {"type": "DELETED", "object": b})
    assert cache.list_("Pod", NS, f"{LABEL}=two") == []
    with pytest.raises(NeedFresh):
        cache.get("Pod", NS, "p")
    with pytest.raises(NeedFresh):
        cache.list_("Pod", NS, "app=x")  # only the owner label is answered


def test_bad_news_from_the_cache_is_confirmed_on_fresh_reads(api: CountingAPI) -> None:
    """After an operator start the pod watch's first listing may still be coming in: a cache
    that holds one of two ready workers must not report the job Restarting from that alone."""
    job, pods = setup_job(api)
    seen("Pod", api.put(pod(1, job, True)))
    controller.reconciler.request(NS, NAME)  # Running (fresh: the cache had no FineTuneJob yet)
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"
    events.drain()
    controller.reconciler.forget(NS, NAME)  # as a restarted operator: nothing in memory
    controller.reconciler.cache = WatchCache(LABEL)
    for kind, obj in [("FineTuneJob", api.objects[("FineTuneJob", NAME)]), ("Job", job), ("Pod", pods[0])]:
        seen(kind, obj)  # the second worker's pod not seen yet
    api.requests.clear()
    controller.reconciler.request(NS, NAME)
    assert api.requests == ["GET FineTuneJob", "GET Job", "LIST Pod"]  # fresh, and nothing to write
    assert api.objects[("FineTuneJob", NAME)]["status"]["phase"] == "Running"


@pytest.mark.parametrize("prev, new, ok", [
    ({"phase": "Pending", "workers": {"ready": 0, "total": 1}}, {"phase": "Pending", "workers": {"ready": 0, "total": 2}}, True),
    ({"phase": "Pending", "workers": {"ready": 1, "total": 2}}, {"phase": "Running", "workers": {"ready": 2, "total": 2}}, True),
    ({}, {"phase": "Pending", "workers": {"ready": 0, "total": 0}}, True),
    ({"phase": "Running", "workers": {"ready": 2, "total": 2}}, {"phase": "Restarting", "workers": {"ready": 1, "total": 2}}, False),
    ({"phase": "Pending", "workers": {"ready": 1, "total": 2}}, {"phase": "Pending", "workers": {"ready": 0, "total": 2}}, False),
    ({"phase": "Pending", "workers": {"ready": 0, "total": 2}}, {"phase": "Pending", "workers": {"ready": 0, "total": 1}}, False),
], ids=["a pod more", "workers ready", "first status", "worker lost", "fewer ready", "fewer pods"])
def test_the_cache_tells_only_good_news(prev: dict[str, Any], new: dict[str, Any], ok: bool) -> None:
    from kubeforge.controllers.finetune_status import cache_can_tell

    assert cache_can_tell(prev, new) is ok
