"""FineTuneJob reconciler: apply the children, sync status from the Job and its pods.

The shared loop is :class:`.reconcile.Reconciler`; this module gives it the FineTuneJob's
steps and registers the kopf handlers (on import, by :mod:`kubeforge.controllers`):

* ``on_spec`` on create, on a spec change and on operator start (resume): a sync that also
  server-side applies the children rendered by :mod:`kubeforge.builders.finetune` and its NetworkPolicy (:mod:`kubeforge.builders.network`)
  (deterministic names, one field manager: applying again changes nothing, so an operator
  killed at any point and restarted creates no duplicates);
* with ``spec.dataset.checks``, the children are first only the ConfigMap and the data gate
  Job ``<name>-datacheck`` (:func:`_read_gate`); the sync that sees the gate pass creates the
  workers, a gate that fails leaves the job Failed without ever creating one;
* ``job_event``/``pod_event`` on every event of a Job or pod carrying the FineTuneJob label:
  a debounced sync of the owner's status (:mod:`.finetune_status`, a pure function), so that
  a burst of events costs one sync; the event's object is kept in the reconciler's watch cache
  first (:mod:`.watched`, as is every FineTuneJob's): a sync that finds nothing to change
  there makes no request at all, one that changes the status only its guarded status patch;
* ``finetunejob-deleted`` on the FineTuneJob's DELETED event: forget its in-memory state
  (the children go by ownerReferences);
* a background poller (started at operator startup) that reads training progress from the
  rank-0 metrics endpoint of running jobs and deletes finished jobs whose
  ``ttlSecondsAfterFinished`` has passed; it skips its rounds while kopf peering has paused
  this replica (:mod:`.peering`).

The operator never talks to the pods through the API and the pods never talk to the API:
progress comes from the metrics endpoint, which may be unreachable at any time without
consequence. Worker failures already counted in ``status.restarts`` are remembered in the
``kubeforge.io/counted-worker-failures`` annotation, so a restart of the operator never
counts one twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from kubeforge_runtime import contract

from .. import kube
from ..api import GROUP, FineTuneJob, FineTuneJobSpec
from ..builders import finetune as builder
from ..builders import network
from . import finetune_status, metrics, peering, scrape
from .conditions import TERMINAL_PHASES, is_true, now
from .references import Resolution, resolve_model
from .reconcile import ChildConflict, Reconciler, controlled_by, owned_by, reference_keys
from .reconcile import apply_children as apply_owned
from .settings import network_policy_settings
from .watched import fresh_only

log = logging.getLogger(__name__)

KIND = FineTuneJob.kind
COUNTED_ANNOTATION = f"{GROUP}/counted-worker-failures"
"""Pod UIDs whose failure is already in status.restarts (so a restart never counts twice)."""

POLL_ENV = "KUBEFORGE_FINETUNE_POLL_SECONDS"
DEFAULT_POLL_SECONDS = 15.0
SCRAPE_TIMEOUT = 1.0
SCRAPE_CANDIDATES = 3
"""Worker pods tried per scrape. torchrun's c10d rendezvous decides which node hosts global
rank 0 (usually the first to join, i.e. index 0), so the operator tries a few, the last
good one first."""


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


# --- the reconciler's steps ------------------------------------------------------------------------

def children(owner: dict[str, Any], spec: FineTuneJobSpec, workers: bool = True,
             teacher: str | None = None) -> list[dict[str, Any]]:
    """The NetworkPolicy (unless turned off; first, so no worker ever runs unprotected), then
    the Service, ConfigMap and Job; with ``workers`` False, the ConfigMap and the data gate Job
    (``teacher``: a resolved distillation.teacher.fineTuneJobRef)."""
    meta = owner["metadata"]
    build = builder.build if workers else builder.gate_children
    out = build(meta["name"], meta["namespace"], meta["uid"], spec, teacher)
    net = network_policy_settings()
    if net.enabled:
        out.insert(0, network.finetune_policy(meta["name"], meta["namespace"], meta["uid"], net))
    return out


def apply_children(owner: dict[str, Any], spec: FineTuneJobSpec, workers: bool = True,
                   teacher: str | None = None, *, fresh: bool = False) -> dict[str, Any] | None:
    """Apply :func:`children` (:func:`.reconcile.apply_children`: never over a foreign object;
    ``fresh``: none of them was created yet as far as the status says); the worker Job as
    applied, or None when only the data gate's children were applied."""
    try:
        applied = apply_owned(owner, children(owner, spec, workers, teacher), fresh=fresh)
        return applied[-1] if workers else None
    except ApiException as exc:
        if exc.status == 422:
            # A field the API server will not change on an existing object (the Job's pod
            # template is immutable while it runs): permanent for this generation.
            raise kopf.PermanentError(
                f"a child rejected the change: {_api_message(exc)}. "
                "Suspend the job first to change its pod template, or create a new FineTuneJob"
            ) from None
        raise


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)


def _age_seconds(obj: dict[str, Any]) -> float:
    created = obj["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    t = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    return (dt.datetime.now(dt.timezone.utc) - t).total_seconds()


def _step(obj: dict[str, Any], spec: FineTuneJobSpec, *, apply: bool = False,
          reads: Any = kube) -> finetune_status.FineTuneOutcome:
    """Apply the children (``apply``: a spec handler), read the Job and its pods, compute the status.

    ``reads``: where the Job, pods and teacher are read, the API (:mod:`kubeforge.kube`) or the
    reconciler's watch cache (:mod:`.watched`), from which nothing is ever written: a child to
    apply or an annotation to write raises :class:`.watched.NeedFresh` instead."""
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    prev = obj.get("status") or {}
    terminal = prev.get("phase") in TERMINAL_PHASES
    created = any(c.get("type") == "Created" and c.get("status") == "True" for c in prev.get("conditions") or [])
    names = builder.Names.of(name)
    # A distillation teacher named by fineTuneJobRef: its output, once it has succeeded.
    teacher = teacher_resolution(spec, namespace, reads) if not terminal else None
    teacher_ready = teacher is None or teacher.state == "ready"
    teacher_uri = teacher.uri if teacher is not None else None
    gate = _read_gate(obj, spec, reads) if not terminal and teacher_ready else None
    job: dict[str, Any] | None = None
    applied_workers = False
    if apply and terminal:
        # A finished job is never resurrected: its children stay as they ended.
        log.info("FineTuneJob %s/%s is %s; not touching its children", namespace, name, prev.get("phase"))
    elif teacher_ready and (apply or (gate is not None and gate.state in ("Passed", "Pending"))
                            or (teacher is not None and gate is None and not created)):
        # The gate's pass is seen once (then recorded in DataChecked): create the workers now.
        # A gate Job gone before it decided (deleted by hand?) is put back. A teacher this job
        # waited for has just succeeded: create the children now.
        fresh_only(reads, "apply the children")
        workers = gate is None or gate.passed
        job = apply_children(obj, spec, workers, teacher_uri, fresh=not created)  # the worker Job, if applied
        applied_workers = workers
    if not applied_workers:
        job = reads.get("Job", namespace, names.job)
    if job is not None and not controlled_by(job, obj):
        # Never report a foreign Job of that name as ours (a finished job just ignores it).
        if not terminal:
            raise ChildConflict(obj, "Job", names.job)
        job = None
    if job is None and not terminal and created:
        # The Job was there and is gone (deleted by hand?): put it back, the job goes on.
        fresh_only(reads, "apply the children again")
        log.warning("Job %s/%s vanished; applying the children again", namespace, names.job)
        job = apply_children(obj, spec, teacher=teacher_uri)
    # Only this Job's pods (a deleted and re-created FineTuneJob of the same name has a new Job).
    # A Job this first sync has just created has none to read yet (the Job controller has not
    # started it); the events of its pods, when they come, schedule the next sync.
    just_created = apply and not created and not terminal and not ((job or {}).get("status") or {}).get("startTime")
    pods = [p for p in reads.list_("Pod", namespace, f"{reconciler.owner_label}={name}")
            if owned_by(p, job)] if job is not None and not just_created else []
    counted = [u for u in (meta.get("annotations") or {}).get(COUNTED_ANNOTATION, "").split(",") if u]
    with _tracked_lock:
        progress = _progress.get((namespace, name))
    outcome = finetune_status.compute(obj, spec=spec, job=job, pods=pods, counted=counted, progress=progress,
                                      now=now(), gate=gate, teacher=teacher)
    if outcome.counted != counted:
        fresh_only(reads, "write the counted failures")
        patched = kube.patch_merge(KIND, namespace, name, {"metadata": {
            "resourceVersion": meta.get("resourceVersion"), "annotations": {COUNTED_ANNOTATION: ",".join(outcome.counted)}}})
        meta["resourceVersion"] = patched["metadata"]["resourceVersion"]  # the status write follows this one
    # The poller's view: which pods to scrape (ready workers, by index), what to expire when.
    ips = [p["status"]["podIP"] for _i, p in sorted(finetune_status.current_pods(pods).items())
           if finetune_status.is_ready(p) and (p.get("status") or {}).get("podIP")]
    with _tracked_lock:
        _tracked[(namespace, name)] = _Tracked(
            phase=outcome.status.get("phase") or "Pending", pod_ips=ips, spec=spec,
            ttl_due=finetune_status.ttl_due(outcome.status, spec.ttl_seconds_after_finished))
    return outcome


def _read_gate(obj: dict[str, Any], spec: FineTuneJobSpec, reads: Any = kube) -> finetune_status.Gate | None:
    """The data gate's state while it decides anything, else None without an API call: only
    with a red line in ``spec.dataset.checks``, before its pass is recorded (``DataChecked``) and before any
    worker Job was created (``Created``: a job that got checks added while running keeps going)."""
    if not builder.needs_data_gate(spec):
        return None
    conds = (obj.get("status") or {}).get("conditions") or []
    if is_true(conds, "DataChecked") or is_true(conds, "Created"):
        return None
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    gate_name = builder.Names.of(name).datacheck
    gate_job = reads.get("Job", namespace, gate_name)
    if gate_job is not None and not controlled_by(gate_job, obj):
        raise ChildConflict(obj, "Job", gate_name)
    pods = [p for p in reads.list_("Pod", namespace, f"{reconciler.owner_label}={name}")
            if owned_by(p, gate_job)] if gate_job is not None else []
    return finetune_status.gate_state(gate_job, pods)


def teacher_resolution(spec: FineTuneJobSpec, namespace: str, reads: Any = kube) -> Resolution | None:
    """What ``distillation.teacher.fineTuneJobRef`` yields now (:mod:`.references`, as a
    QuantizeJob's model reference); None without one (no distillation, or a teacher URI)."""
    if spec.distillation is None or spec.distillation.teacher.fine_tune_job_ref is None:
        return None
    return resolve_model(spec.distillation.teacher, lambda kind, ref: reads.get(kind, namespace, ref))


def _after(obj: dict[str, Any], spec: FineTuneJobSpec, outcome: finetune_status.FineTuneOutcome,
           changed: bool) -> None:
    """Restart and time-to-running metrics once written; delete the job when its TTL has passed."""
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    if changed:
        for reason in outcome.new_restarts:
            metrics.count_restart(KIND, reason)
        if outcome.became_running_first_time:
            metrics.observe_time_to_running(KIND, _age_seconds(obj))
    ttl_due = finetune_status.ttl_due(outcome.status, spec.ttl_seconds_after_finished)
    if ttl_due is not None and ttl_due <= dt.datetime.now(dt.timezone.utc):
        log.info("FineTuneJob %s/%s finished %ss ago: deleting it (ttlSecondsAfterFinished)",
                 namespace, name, spec.ttl_seconds_after_finished)
        # Only this very object: one deleted and created again under its name meanwhile stays.
        if kube.delete(KIND, namespace, name, uid=obj["metadata"]["uid"]):
            reconciler.forget(namespace, name)


reconciler: Reconciler[FineTuneJobSpec] = Reconciler(
    FineTuneJob, validate=finetune_status.validate, step=_step, after=_after, on_forget=_forget, cached=True,
    cache_can_tell=finetune_status.cache_can_tell)


# --- kopf handlers ---------------------------------------------------------------------------------

@kopf.on.resume(*FineTuneJob.resource())
@kopf.on.create(*FineTuneJob.resource())
@kopf.on.update(*FineTuneJob.resource(), field="spec")
def on_spec(name: str, namespace: str, **_: Any) -> None:
    reconciler.request(namespace, name, apply=True)


def _observe(kind: str, event: Any) -> None:
    """Keep a child's watch event in the reconciler's cache (:mod:`.watched`)."""
    if reconciler.cache is not None:
        reconciler.cache.observe(kind, event)


# Event handlers that only mark an object due are coroutines: they run in kopf's event loop,
# so a burst of pod events never queues the spec handlers behind it for kopf's handler threads.
@kopf.on.event("batch", "v1", "jobs", labels=reconciler.child_labels)
async def job_event(labels: Any, namespace: str, event: Any, **_: Any) -> None:
    _observe("Job", event)  # before the sync is scheduled: it finds at least this state
    reconciler.schedule(namespace, labels[reconciler.owner_label])


@kopf.on.event("", "v1", "pods", labels=reconciler.child_labels)
async def pod_event(labels: Any, namespace: str, event: Any, **_: Any) -> None:
    _observe("Pod", event)
    reconciler.schedule(namespace, labels[reconciler.owner_label])


# Deleted: forget it (the children go by ownerReferences, the garbage collector's work).
kopf.on.event(*FineTuneJob.resource(), id="finetunejob-deleted")(reconciler.on_event_nonblocking)


REFERENCES = ((("distillation", "teacher"), "fineTuneJobRef"),)
"""Where a FineTuneJob names another: ``spec.distillation.teacher.fineTuneJobRef``."""


@kopf.index(*FineTuneJob.resource(), id="finetunejob_references")
async def finetunejob_references(name: str, namespace: str, spec: Any, **_: Any) -> dict[Any, str]:
    """kopf's index of the FineTuneJobs by the teacher they distil from (:func:`.reconcile.reference_keys`).

    A coroutine: kopf indexes each event of the kind before its other handlers, and a plain
    function would first wait for one of kopf's handler threads, behind a burst's spec handlers
    (a new object's own spec handler after it)."""
    return reference_keys(namespace, name, spec, REFERENCES)


@kopf.on.event(*FineTuneJob.resource(), id="finetunejob-teachers")
async def on_teacher(body: Any, name: str, namespace: str, type: str | None,
                     finetunejob_references: kopf.Index[Any, str], **_: Any) -> None:
    """A FineTuneJob changed: sync the jobs that distil from it (they may be waiting for it)."""
    await reconciler.fan_out_nonblocking("fineTuneJobRef", body, name, namespace, type,
                                         spec_path=("distillation", "teacher"), index=finetunejob_references)


# --- the poller: progress and TTL ----------------------------------------------------------------------

def _scrape_isolated(key: tuple[str, str], tracked: _Tracked) -> dict[str, Any] | None:
    """:func:`_scrape_one`, but whatever one job's pods serve cannot fail the round for the others."""
    try:
        return _scrape_one(key, tracked)
    except Exception:  # noqa: BLE001 - logged; this job keeps its last progress
        log.exception("FineTuneJob %s/%s: reading progress failed", *key)
        return None


def _scrape_one(key: tuple[str, str], tracked: _Tracked) -> dict[str, Any] | None:
    ips = list(tracked.pod_ips)
    last = _last_scraped_ip.get(key)
    if last in ips:
        ips.remove(last)
        ips.insert(0, last)
    for ip in ips[:SCRAPE_CANDIDATES]:
        # SCRAPE_TIMEOUT bounds each whole request (not each read): a slow pod cannot stall the round.
        # Only an endpoint that names this very job: whatever else answers on that IP and port is not it.
        samples = scrape.fetch(f"http://{ip}:{contract.DEFAULT_METRICS_PORT}/metrics", timeout=SCRAPE_TIMEOUT, job=key)
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
        if not peering.active():
            return  # a paused standby neither scrapes nor expires anything (the active replica does)
        with _tracked_lock:
            items = list(_tracked.items())
        nowt = dt.datetime.now(dt.timezone.utc)
        running = [(k, t) for k, t in items if t.phase in ("Running", "Restarting") and t.pod_ips]
        changed: list[tuple[str, str]] = []
        for key, progress in zip([k for k, _ in running],
                                 self._pool.map(lambda kt: _scrape_isolated(*kt), running)):
            if progress is None:
                continue  # unreachable: keep the last progress shown
            with _tracked_lock:
                if _progress.get(key) != progress:
                    _progress[key] = progress
                    changed.append(key)
        changed += [k for k, t in items if t.ttl_due is not None and t.ttl_due <= nowt]
        for namespace, name in changed:
            reconciler.schedule(namespace, name)


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
    global _poller
    if _poller is not None:
        _poller.stop()
        _poller = None
