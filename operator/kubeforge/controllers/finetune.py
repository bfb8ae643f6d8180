"""FineTuneJob reconciler: parse -> build -> apply -> status.

kopf calls the handlers here (registered on import by :mod:`kubeforge.controllers`):

* ``reconcile`` on create, on a spec change and on operator start (resume): validates the
  spec, renders the children with :mod:`kubeforge.builders.finetune` and server-side
  applies them (deterministic names, one field manager: applying again changes nothing, so
  an operator killed at any point and restarted creates no duplicates), then syncs status;
* ``job_event``/``pod_event`` on every event of a Job or pod carrying the FineTuneJob label:
  schedule a sync of the owner's status from the Job and its pods (:mod:`.finetune_status`,
  a pure function), debounced so that a burst of events costs one sync;
* a background poller (started at operator startup) that reads training progress from the
  rank-0 metrics endpoint of running jobs and deletes finished jobs whose
  ``ttlSecondsAfterFinished`` has passed.

Status writes for one FineTuneJob are serialised in this process (:func:`request_sync`
coalesces bursts of events into one more sync) and guarded by ``resourceVersion``, so
concurrent events never lose an update. The operator never talks to the pods through the
API and the pods never talk to the API: progress comes from the metrics endpoint, which may
be unreachable at any time without consequence.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubeforge_runtime import contract

from .. import kube
from ..api import GROUP, FineTuneJob, FineTuneJobSpec
from ..builders import common as bcommon
from ..builders import finetune as builder
from . import finetune_status, metrics, scrape
from .events import post as post_event
from .common import parse_spec
from .conditions import TERMINAL_PHASES, now, set_condition

log = logging.getLogger(__name__)

KIND = FineTuneJob.kind
GROUP_VERSION = FineTuneJob.resource()
OWNER_LABEL = bcommon.owner_label(KIND)
CHILD_LABELS = {"app.kubernetes.io/managed-by": bcommon.MANAGED_BY, OWNER_LABEL: kopf.PRESENT}
COUNTED_ANNOTATION = f"{GROUP}/counted-worker-failures"
"""Pod UIDs whose failure is already in status.restarts (so a restart never counts twice)."""

POLL_ENV = "KUBEFORGE_FINETUNE_POLL_SECONDS"
DEFAULT_POLL_SECONDS = 15.0
SCRAPE_TIMEOUT = 1.0
SCRAPE_CANDIDATES = 3
"""Worker pods tried per scrape. torchrun's c10d rendezvous decides which node hosts global
rank 0 (usually the first to join, i.e. index 0), so the operator tries a few, the last
good one first."""


# --- serialised, coalesced status syncs ----------------------------------------------------------

@dataclass
class _SyncState:
    running: bool = False
    dirty: bool = False


_sync_guard = threading.Lock()
_sync_states: dict[tuple[str, str], _SyncState] = {}


def request_sync(namespace: str, name: str) -> None:
    """Sync the FineTuneJob's status now, in this thread, unless a sync of it is running.

    If one is running, mark it dirty: it runs once more when done, so the latest state is
    always reconciled, and a burst of pod events costs one or two syncs instead of one each.
    """
    key = (namespace, name)
    with _sync_guard:
        state = _sync_states.setdefault(key, _SyncState())
        if state.running:
            state.dirty = True
            return
        state.running = True
    try:
        while True:
            with _sync_guard:
                state.dirty = False
            _sync_with_retries(namespace, name)
            with _sync_guard:
                if not state.dirty:
                    return
    finally:
        with _sync_guard:
            state.running = False


class Debouncer:
    """Coalesce bursts of child events into one sync per FineTuneJob per ``delay`` seconds.

    A worker pod going Pending -> scheduled -> Running -> Ready, and its Job counting it, are
    half a dozen watch events within a second; syncing on each would cost four API calls
    apiece. Event handlers only mark the job due (and return at once, freeing kopf's
    workers); one scheduler thread hands due jobs to a small pool that runs the syncs.
    """

    def __init__(self, delay: float, workers: int = 8) -> None:
        self.delay = delay
        self._due: dict[tuple[str, str], float] = {}
        self._cv = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubeforge-sync")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kubeforge-finetune-debouncer", daemon=True)
        self._thread.start()

    def schedule(self, namespace: str, name: str) -> None:
        with self._cv:
            if (namespace, name) not in self._due:
                self._due[(namespace, name)] = time.monotonic() + self.delay
                self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cv:
                if self._stopped:
                    return
                nowt = time.monotonic()
                ready = [k for k, t in self._due.items() if t <= nowt]
                for k in ready:
                    del self._due[k]
                if not ready:
                    wait = min(self._due.values(), default=nowt + 60) - nowt
                    self._cv.wait(timeout=max(wait, 0.01))
                    continue
            for key in ready:
                self._pool.submit(self._sync, key)

    @staticmethod
    def _sync(key: tuple[str, str]) -> None:
        try:
            request_sync(*key)
        except Exception:  # noqa: BLE001 - logged; the next event or poll syncs again
            log.exception("sync of FineTuneJob %s/%s failed", *key)
            _debouncer_for().schedule(*key)  # try again after the delay


DEBOUNCE_ENV = "KUBEFORGE_FINETUNE_DEBOUNCE_SECONDS"
DEFAULT_DEBOUNCE_SECONDS = 0.3
_debouncer: Debouncer | None = None
_debouncer_lock = threading.Lock()


def _debouncer_for() -> Debouncer:
    global _debouncer
    with _debouncer_lock:
        if _debouncer is None:
            _debouncer = Debouncer(float(os.environ.get(DEBOUNCE_ENV, DEFAULT_DEBOUNCE_SECONDS)))
        return _debouncer


def _sync_with_retries(namespace: str, name: str) -> None:
    for attempt in range(5):
        try:
            sync(namespace, name)
            return
        except ApiException as exc:
            if exc.status == 409 and attempt < 4:  # someone else wrote the object: re-read and redo
                continue
            raise


# --- state shared with the poller ------------------------------------------------------------------

@dataclass
class _Tracked:
    phase: str
    pod_ips: list[str]  # of running workers, completion index order
    spec: FineTuneJobSpec
    ttl_due: dt.datetime | None


_tracked: dict[tuple[str, str], _Tracked] = {}
_progress: dict[tuple[str, str], dict[str, Any]] = {}
_last_scraped_ip: dict[tuple[str, str], str] = {}
_tracked_lock = threading.Lock()


def _forget(namespace: str, name: str) -> None:
    key = (namespace, name)
    with _tracked_lock:
        _tracked.pop(key, None)
        _progress.pop(key, None)
        _last_scraped_ip.pop(key, None)
    with _sync_guard:
        state = _sync_states.get(key)
        if state is not None and not state.running:
            _sync_states.pop(key, None)
    metrics.forget(KIND, namespace, name)


# --- events -------------------------------------------------------------------------------------



# --- children ------------------------------------------------------------------------------------

def apply_children(name: str, namespace: str, uid: str, spec: FineTuneJobSpec) -> None:
    for obj in builder.build(name, namespace, uid, spec):
        try:
            kube.server_side_apply(obj)
        except ApiException as exc:
            if exc.status == 422:
                # A field the API server will not change on an existing object (the Job's pod
                # template is immutable while it runs): permanent for this generation.
                raise kopf.PermanentError(
                    f"{obj['kind']} {obj['metadata']['name']} rejected the change: {_api_message(exc)}. "
                    "Suspend the job first to change its pod template, or create a new FineTuneJob"
                ) from None
            raise


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)


# --- the sync ----------------------------------------------------------------------------------------

def _age_seconds(obj: dict[str, Any]) -> float:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    t = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    return (dt.datetime.now(dt.timezone.utc) - t).total_seconds()


def sync(namespace: str, name: str) -> None:
    """Read the FineTuneJob, its Job and pods; write the status they imply; act on TTL."""
    started = time.monotonic()
    obj = kube.get(KIND, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        _forget(namespace, name)
        return
    try:
        spec = FineTuneJobSpec.model_validate(obj.get("spec") or {})
    except ValidationError:
        return  # reconcile() reports the invalid spec; there is nothing to sync
    if builder.name_problem(name):
        return
    meta = obj["metadata"]
    prev = obj.get("status") or {}
    key = (namespace, name)
    names = builder.Names.of(name)
    job = kube.get("Job", namespace, names.job)
    if job is None and prev.get("phase") not in TERMINAL_PHASES and \
            any(c.get("type") == "Created" and c.get("status") == "True" for c in prev.get("conditions") or []):
        # The Job was there and is gone (deleted by hand?): put it back, the job goes on.
        log.warning("Job %s/%s vanished; applying the children again", namespace, names.job)
        apply_children(name, namespace, meta["uid"], spec)
        job = kube.get("Job", namespace, names.job)
    pods = kube.list_("Pod", namespace, f"{OWNER_LABEL}={name}") if job is not None else []
    # Only this Job's pods (a deleted and re-created FineTuneJob of the same name has a new Job).
    if job is not None:
        job_uid = job["metadata"]["uid"]
        pods = [p for p in pods if any(o.get("uid") == job_uid for o in p["metadata"].get("ownerReferences") or [])]
    counted = [u for u in (meta.get("annotations") or {}).get(COUNTED_ANNOTATION, "").split(",") if u]
    with _tracked_lock:
        progress = _progress.get(key)

    outcome = finetune_status.compute(spec=spec, generation=meta.get("generation"), prev=prev, job=job,
                                      pods=pods, counted=counted, progress=progress, now=now())
    status = outcome.status
    rv = meta.get("resourceVersion")
    if outcome.counted != counted:
        patched = kube.patch_merge(KIND, namespace, name, {"metadata": {
            "resourceVersion": rv, "annotations": {COUNTED_ANNOTATION: ",".join(outcome.counted)}}})
        rv = patched["metadata"]["resourceVersion"]
    if status != prev:
        kube.patch_merge(KIND, namespace, name, {"metadata": {"resourceVersion": rv}, "status": status},
                         subresource="status")
        for ev in outcome.events:
            post_event(obj, ev)
        for reason in outcome.new_restarts:
            metrics.count_restart(KIND, reason)
        if outcome.became_running_first_time:
            metrics.observe_time_to_running(KIND, _age_seconds(obj))
        if status.get("phase") != prev.get("phase"):
            log.info("FineTuneJob %s/%s: %s -> %s", namespace, name, prev.get("phase"), status.get("phase"))
    metrics.record_phase(KIND, namespace, name, status.get("phase"))

    ttl_due = finetune_status.ttl_due(status, spec.ttl_seconds_after_finished)
    if ttl_due is not None and ttl_due <= dt.datetime.now(dt.timezone.utc):
        log.info("FineTuneJob %s/%s finished %ss ago: deleting it (ttlSecondsAfterFinished)",
                 namespace, name, spec.ttl_seconds_after_finished)
        kube.delete(KIND, namespace, name)
        _forget(namespace, name)
        return
    ips = [p["status"]["podIP"] for _i, p in sorted(finetune_status.current_pods(pods).items())
           if finetune_status.is_ready(p) and (p.get("status") or {}).get("podIP")]
    with _tracked_lock:
        _tracked[key] = _Tracked(phase=status.get("phase") or "Pending", pod_ips=ips, spec=spec, ttl_due=ttl_due)
    metrics.RECONCILE_DURATION.labels(KIND).observe(time.monotonic() - started)


# --- kopf handlers ---------------------------------------------------------------------------------

@kopf.on.resume(*GROUP_VERSION)
@kopf.on.create(*GROUP_VERSION)
@kopf.on.update(*GROUP_VERSION, field="spec")
def reconcile(spec: Any, body: Any, meta: Any, status: Any, patch: kopf.Patch, name: str,
              namespace: str, uid: str, **_: Any) -> None:
    started = time.monotonic()
    generation = meta.get("generation")
    parsed = parse_spec(FineTuneJobSpec, spec, body, patch, generation)
    problem = builder.name_problem(name)
    if problem:
        patch.status["conditions"] = set_condition(status.get("conditions"), "Accepted", False, "InvalidSpec",
                                                   problem, generation)
        patch.status["observedGeneration"] = generation
        patch.status["phase"] = status.get("phase") or "Pending"
        kopf.warn(body, reason="InvalidSpec", message=problem)
        raise kopf.PermanentError(problem)
    if status.get("phase") in TERMINAL_PHASES:
        # A finished job is never resurrected: its children stay as they ended.
        log.info("FineTuneJob %s/%s is %s; not touching its children", namespace, name, status.get("phase"))
    else:
        apply_children(name, namespace, uid, parsed)
    metrics.RECONCILE_DURATION.labels(KIND).observe(time.monotonic() - started)
    request_sync(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
def job_event(labels: Any, namespace: str, **_: Any) -> None:
    _debouncer_for().schedule(namespace, labels[OWNER_LABEL])


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
def pod_event(labels: Any, namespace: str, **_: Any) -> None:
    _debouncer_for().schedule(namespace, labels[OWNER_LABEL])


@kopf.on.delete(*GROUP_VERSION, optional=True)
def deleted(name: str, namespace: str, **_: Any) -> None:
    # optional: no finalizer, so deletion never waits for the operator; the children go by
    # ownerReferences (the garbage collector), this only drops in-memory state.
    _forget(namespace, name)


# --- the poller: progress and TTL ----------------------------------------------------------------------

def _scrape_one(key: tuple[str, str], tracked: _Tracked) -> dict[str, Any] | None:
    ips = list(tracked.pod_ips)
    last = _last_scraped_ip.get(key)
    if last in ips:
        ips.remove(last)
        ips.insert(0, last)
    for ip in ips[:SCRAPE_CANDIDATES]:
        samples = scrape.fetch(f"http://{ip}:{contract.DEFAULT_METRICS_PORT}/metrics", timeout=SCRAPE_TIMEOUT)
        if samples is None:
            continue
        progress = finetune_status.progress_from_metrics(samples, tracked.spec)
        if progress is not None:
            if key not in _last_scraped_ip:
                log.info("FineTuneJob %s/%s: reading progress from %s", key[0], key[1], ip)
            _last_scraped_ip[key] = ip
            return progress
    if _last_scraped_ip.pop(key, None) is not None:
        log.info("FineTuneJob %s/%s: metrics endpoint unreachable; keeping the last progress", *key)
    return None


class Poller:
    """A daemon thread: every ``interval`` seconds, scrape running jobs and expire finished ones."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kubeforge-scrape")
        self._thread = threading.Thread(target=self._run, name="kubeforge-finetune-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad round
                log.exception("FineTuneJob poller round failed")

    def tick(self) -> None:
        with _tracked_lock:
            items = list(_tracked.items())
        nowt = dt.datetime.now(dt.timezone.utc)
        running = [(k, t) for k, t in items if t.phase in ("Running", "Restarting") and t.pod_ips]
        changed: list[tuple[str, str]] = []
        for key, progress in zip([k for k, _ in running],
                                 self._pool.map(lambda kt: _scrape_one(*kt), running)):
            if progress is None:
                continue  # unreachable: keep the last progress shown
            with _tracked_lock:
                if _progress.get(key) != progress:
                    _progress[key] = progress
                    changed.append(key)
        changed += [k for k, t in items if t.ttl_due is not None and t.ttl_due <= nowt]
        for namespace, name in changed:
            try:
                request_sync(namespace, name)
            except Exception:  # noqa: BLE001
                log.exception("sync of FineTuneJob %s/%s failed", namespace, name)


_poller: Poller | None = None


@kopf.on.startup()
def start_poller(**_: Any) -> None:
    global _poller
    interval = float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS))
    if _poller is None:
        _poller = Poller(interval)
        _poller.start()
        log.info("FineTuneJob progress/TTL poller every %.1fs", interval)


@kopf.on.cleanup()
def stop_poller(**_: Any) -> None:
    global _poller, _debouncer
    if _poller is not None:
        _poller.stop()
        _poller = None
    with _debouncer_lock:
        if _debouncer is not None:
            _debouncer.stop()
            _debouncer = None
