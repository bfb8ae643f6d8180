"""The reconcile loop every kind shares; each ``controllers/<kind>.py`` fills in its two steps.

One :class:`Reconciler` per kind (FineTuneJob, QuantizeJob, InferenceService) does, for one
object at a time:

1. **read** the object afresh (gone or being deleted: :meth:`~Reconciler.forget` it);
2. **validate** its spec (the kind's ``validate``, then the platform's workload policy on
   ``spec.template``, :mod:`kubeforge.api.policy`, for clusters without the webhook); an
   invalid spec is permanent for its generation: ``Accepted=False/InvalidSpec`` and one
   Warning event (:func:`.conditions.reject`), nothing else happens and nothing is retried;
3. **step** (the kind's): read the children, apply what the spec says, and call the pure
   ``<kind>_status.compute`` for the new status;
4. **write** the status with one merge patch guarded by the object's ``resourceVersion`` (a
   concurrent change makes it fail with 409 and the whole sync runs again on a fresh read),
   then post the outcome's events (in the background, :func:`.events.post_later`) and record
   the phase and the duration (``kubeforge_jobs{kind,phase}``, ``kubeforge_reconcile_duration_seconds{kind}``);
5. **after** (the kind's, optional): act on what the written status says (create the Job it
   announces, delete an object whose TTL has passed).

Children are applied through :func:`apply_children`, never by calling server-side apply
directly: a forced apply by name would take over any object that happens to have the child's
name (rewrite a Service's selector, add an ownerReference through which the garbage collector
later deletes it). An object of the child's kind and name that this resource does not control
is left alone and the sync ends in :class:`ChildConflict`: ``Accepted=False/ChildConflict``
naming the object, one Warning event, and another look after ``CHILD_CONFLICT_RECHECK_SECONDS``
(not a retry loop: the user has to delete or rename something first). A new object's children
are created without a check first, by applies that only create (a name found taken is read
then); when one fails, no workload is sent and the ones this sync created are deleted again
before the failure is written, so a rejected object keeps no child.

Syncs are serialised per object (a lock), so a slow read-compute-write never overwrites the
outcome of a newer one. There are two ways in: :meth:`~Reconciler.request` syncs now, in the
caller's thread, and raises what the sync raises (kopf's spec handlers, so that kopf retries
them); :meth:`~Reconciler.schedule` syncs soon from a small pool, after a short debounce that
coalesces a burst of child events into one sync (a pod going Pending -> Running -> Ready is
half a dozen events within a second); a failed scheduled sync is scheduled again.
:meth:`~Reconciler.fan_out` schedules the objects that reference a FineTuneJob or QuantizeJob
whose outcome changed (looked up in the kind's kopf index, :func:`reference_keys`).

A kind built with ``cached=True`` (FineTuneJob) keeps what its event handlers saw in a
:class:`.watched.WatchCache`: a sync with nothing to apply is first computed from it, and when
the cached object shows the status this operator last left, that sync ends there: with no
request when nothing changed, with one status patch guarded by the cached object's
``resourceVersion`` when the status changed (a 409 sends it to fresh reads). The cached
object is the watch's, or the API server's answer to this operator's last status write while
the watch has not delivered that write yet. A spec handler's
sync takes the object from it instead of reading it. Children and annotations are written on
fresh reads only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Generic, Mapping, TypeVar

import kopf
from kubernetes.client.rest import ApiException
from pydantic import BaseModel, ValidationError

from .. import kube
from ..api import InvalidSpec, Kind, spec_problem
from ..api import policy
from ..api.size import size_problem
from ..builders.common import MANAGED_BY, owner_label
from . import metrics, peering
from .conditions import TERMINAL_PHASES, Outcome, child_conflict, reject
from .events import post_later as post_events_later
from .settings import workload_policy
from .watched import NeedFresh, WatchCache

log = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseModel)
Key = tuple[str, str]
"""(namespace, name) of one object."""

DEBOUNCE_ENV = "KUBEFORGE_DEBOUNCE_SECONDS"
DEFAULT_DEBOUNCE_SECONDS = 0.3
CONFLICT_RETRIES = 5
CACHE_CATCH_UP_SECONDS = 0.5
CACHE_CATCH_UP_TRIES = 3
"""A cached FineTuneJob behind the server's (this operator's last status write, or kopf's own
annotation patch, not delivered by the watch yet) defers the sync this long, at most this many
times in a row, before it is done on fresh reads: under load the watch is a moment behind, and
three reads to learn what the watch is about to deliver cost the API server more than the wait."""
CHILD_CONFLICT_RECHECK_SECONDS = 30.0
"""How long a sync that found a foreign object under a child's name waits before looking again."""


def owned_by(child: dict[str, Any] | None, owner: dict[str, Any]) -> bool:
    """Whether ``child`` lists ``owner`` (by UID) among its ownerReferences."""
    uid = (owner.get("metadata") or {}).get("uid")
    return bool(child) and any(r.get("uid") == uid for r in (child.get("metadata") or {}).get("ownerReferences") or [])


def controlled_by(child: dict[str, Any] | None, owner: dict[str, Any]) -> bool:
    """Whether ``owner`` (by UID) is ``child``'s controller: ownerReferences with ``controller: true``."""
    uid = (owner.get("metadata") or {}).get("uid")
    return bool(child) and any(r.get("uid") == uid and r.get("controller")
                               for r in (child.get("metadata") or {}).get("ownerReferences") or [])


class ChildConflict(Exception):
    """An object with a child's kind and name exists and is not controlled by the resource."""

    def __init__(self, owner: dict[str, Any], kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        owner_kind = owner.get("kind") or "resource"
        super().__init__(
            f"{kind} {name} already exists and is not controlled by this {owner_kind}; the operator leaves it "
            f"untouched. Delete or rename that {kind}, or give the {owner_kind} another name")


class ChildRefused(InvalidSpec):
    """The API server refuses a child built from the spec (422): the spec passed something only
    the Kubernetes API judges (label syntax, object sizes, the schemaless parts of a PodSpec)."""

    def __init__(self, kind: str, name: str, exc: ApiException) -> None:
        try:
            detail = json.loads(exc.body or "{}").get("message") or exc.reason
        except (TypeError, ValueError):
            detail = exc.reason
        super().__init__(f"the API server refuses the {kind} {name} built from this spec, so no child of it was kept or changed: "
                         f"{detail}. Fix the spec (most often spec.template)")


_UNREAD: Any = object()


def ensure_free(owner: dict[str, Any], kind: str, name: str, existing: dict[str, Any] | None = _UNREAD) -> None:
    """Raise :class:`ChildConflict` if an object ``kind``/``name`` exists that ``owner`` does not control.

    ``existing``: the object if the caller has just read it (None: it does not exist); when
    not given it is read here.
    """
    obj = kube.get(kind, owner["metadata"]["namespace"], name) if existing is _UNREAD else existing
    if obj is not None and not controlled_by(obj, owner):
        raise ChildConflict(owner, kind, name)


def _refused_or_raise(child: dict[str, Any], exc: ApiException) -> None:
    """A 422 on a dry run is :class:`ChildRefused`; anything else is raised as it is."""
    if exc.status == 422:
        raise ChildRefused(child["kind"], child["metadata"]["name"], exc) from None
    raise exc


def _check(owner: dict[str, Any], child: dict[str, Any]) -> None:
    """Raise unless ``child`` may be applied over what exists: its name is free or taken by
    ``owner``'s own child (a read), and the API server would accept the change (a dry-run apply)."""
    kind, name = child["kind"], child["metadata"]["name"]
    ensure_free(owner, kind, name)
    try:
        kube.server_side_apply(child, dry_run=True)
    except ApiException as exc:
        _refused_or_raise(child, exc)


ABSENT_RESOURCE_VERSION = "1"
"""The ``metadata.resourceVersion`` a fresh owner's child is applied with: a precondition only
an absent object meets. An apply that creates stores the object without it (the API server
clears a new object's resourceVersion before storing it); one that would change an existing
object fails with 409, as no stored object carries it (etcd's first write is revision 2)."""


def _create_or_adopt(owner: dict[str, Any], child: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Server-side apply ``child`` of a fresh owner only if its name is free: (the object, True
    when this call created it).

    One request in the usual case: the apply carries :data:`ABSENT_RESOURCE_VERSION`, so it
    creates the child or fails with 409. Every 409 is followed by a read of the object: a
    foreign one is :class:`ChildConflict` (left untouched), the owner's own (a sync that created
    it and ended before its status write) is applied over as usual. 422: :class:`ChildRefused`."""
    guarded = {**child, "metadata": {**child["metadata"], "resourceVersion": ABSENT_RESOURCE_VERSION}}
    try:
        return kube.server_side_apply(guarded), True
    except ApiException as exc:
        if exc.status != 409:
            _refused_or_raise(child, exc)
    ensure_free(owner, child["kind"], child["metadata"]["name"])
    try:
        return kube.server_side_apply(child), False
    except ApiException as exc:
        _refused_or_raise(child, exc)
        raise  # (not reached: _refused_or_raise always raises)


WORKLOAD_KINDS = frozenset({"Job", "Deployment"})
"""Children that run pods: each waits for every child listed before it (the NetworkPolicy that
guards its pods, the ConfigMap they mount, the Service they resolve each other through)."""

CHILD_REQUEST_THREADS = 16
"""Threads that send the requests of a wave (shared by kopf's handler threads). More of them
(96, with 32 handler threads) made bursts of new FineTuneJobs slower, not faster: measured in
README "Operator at scale"."""
_child_pool: ThreadPoolExecutor | None = None
_child_pool_lock = threading.Lock()


def waves(children: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``children`` in the order they must reach the API server: a run of children that run no
    pods is one wave (sent at once), a workload (:data:`WORKLOAD_KINDS`) a wave of its own
    between the children listed before and after it."""
    out: list[list[dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    for child in children:
        if child["kind"] in WORKLOAD_KINDS:
            out += [run] if run else []
            out.append([child])
            run = []
        else:
            run.append(child)
    return out + ([run] if run else [])


def _settled(fn: Callable[[Any], Any], wave: list[Any]) -> list[tuple[Any, BaseException | None]]:
    """``fn`` on every item of ``wave`` at once (a wave of one in this thread); each call's
    (result, None) or (None, the exception it raised), in order, once every call has finished."""
    global _child_pool
    if len(wave) == 1:
        try:
            return [(fn(wave[0]), None)]
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            return [(None, exc)]
    with _child_pool_lock:
        if _child_pool is None:
            _child_pool = ThreadPoolExecutor(CHILD_REQUEST_THREADS, thread_name_prefix="kubeforge-child")
    futures = [_child_pool.submit(fn, item) for item in wave]
    wait(futures)
    return [(None, f.exception()) if f.exception() is not None else (f.result(), None) for f in futures]


def _all(fn: Callable[[Any], Any], wave: list[Any]) -> list[Any]:
    """:func:`_settled`, but the first failure, in list order, is raised: a check wave raises
    what a serial check would have raised first."""
    outcomes = _settled(fn, wave)
    for _result, exc in outcomes:
        if exc is not None:
            raise exc
    return [result for result, _exc in outcomes]


def _create_fresh(owner: dict[str, Any], children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The children of a fresh owner, created in :func:`waves` (:func:`_create_or_adopt`, the
    requests of a wave at once). When one fails, no later wave is sent, the children this call
    created are deleted again (by UID), and the first failure, in list order, is raised."""
    applied: list[dict[str, Any]] = []
    created: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for wave in waves(children):
        outcomes = _settled(lambda child: _create_or_adopt(owner, child), wave)
        created += [(child, result[0]) for child, (result, exc) in zip(wave, outcomes) if exc is None and result[1]]
        failure = next((exc for _result, exc in outcomes if exc is not None), None)
        if failure is not None:
            if created:
                _settled(lambda pair: _delete_created(*pair), created)
            raise failure
        applied += [result[0] for result, _exc in outcomes]
    return applied


def _delete_created(child: dict[str, Any], created: dict[str, Any]) -> None:
    """Delete a child this sync has just created (only that very object, by UID); a failure is
    logged: the child is the owner's (ownerReferences) and goes with it at the latest."""
    meta = child["metadata"]
    try:
        kube.delete(child["kind"], meta["namespace"], meta["name"], uid=(created.get("metadata") or {}).get("uid"))
    except ApiException as exc:
        log.warning("could not delete %s %s/%s again after its sibling failed: %s", child["kind"], meta["namespace"],
                    meta["name"], exc)


def apply_children(owner: dict[str, Any], children: list[dict[str, Any]], *, fresh: bool = False) -> list[dict[str, Any]]:
    """Server-side apply ``children`` of ``owner``, each only if it is absent or already ``owner``'s.

    Children go to the API server in :func:`waves`, the requests of one wave at once: a
    FineTuneJob's NetworkPolicy, Service and ConfigMap, then its Job, so no worker exists
    before the NetworkPolicy that guards it. Returns the applied objects, in order.

    ``fresh``: the owner has no children yet as far as it knows (its first sync). Each child is
    then applied by an apply that only creates (:func:`_create_or_adopt`; a name found taken is
    read: a foreign object is left untouched, :class:`ChildConflict`), without a check first:
    two round trips from a new FineTuneJob to its Job. When a child fails (taken, refused
    (:class:`ChildRefused`), or any error), the Job is not sent and the children this call
    created are deleted again before the failure is raised, so a rejected owner is left with
    no child.

    Otherwise (children that may exist: a spec change, an operator restart, a child deleted by
    hand) every name is read and every child applied as a dry run, all at once, before
    anything is applied, so a conflict or a refused change leaves all children as they were (a
    foreign object created between the check and the apply is still taken over: the window is
    one request long).
    """
    if fresh:
        return _create_fresh(owner, children)
    _all(lambda child: _check(owner, child), children)  # a check applies nothing: all at once
    return [applied for group in waves(children) for applied in _all(kube.server_side_apply, group)]


def namespace_terminating(exc: ApiException) -> bool:
    """Whether the API server refused a write because the namespace is being deleted (403,
    ``unable to create new content in namespace ... because it is being terminated``)."""
    return exc.status == 403 and "because it is being terminated" in (exc.body or "")


def check_policy(obj: dict[str, Any]) -> None:
    """Raise :class:`InvalidSpec` naming every field of ``spec.template`` the workload policy
    refuses, or the spec when it is over :data:`kubeforge.api.size.SPEC_BUDGET_BYTES`."""
    too_big = size_problem(obj)
    if too_big:
        raise InvalidSpec(too_big)
    problems = policy.problems((obj.get("spec") or {}).get("template"), workload_policy())
    if problems:
        raise InvalidSpec("; ".join(problems))


def merge_hints(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Hints of two sync requests as one: a set hint wins over an unset one, the newer over the older."""
    return {k: new.get(k) or old.get(k) for k in old.keys() | new.keys()}


def reference_key(namespace: str, spec_path: tuple[str, ...], ref_field: str, name: str) -> tuple[str, str, str, str]:
    """The key under which a kind's kopf index (:func:`reference_keys`) lists the objects whose
    ``spec.<spec_path>.<ref_field>`` names the job ``name``."""
    return namespace, ".".join(spec_path), ref_field, name


def reference_keys(namespace: str, name: str, spec: Any,
                   refs: tuple[tuple[tuple[str, ...], str], ...]) -> dict[tuple[str, str, str, str], str]:
    """What one object contributes to its kind's kopf index of references: for each
    ``(spec_path, ref_field)`` of ``refs`` it sets, ``reference_key(...) -> name``.

    kopf keeps such an index from the watch it already has on the kind (and holds every handler
    back until the kind's first listing is indexed), so a job's news reaches the objects that
    name it without listing them: a LIST of every FineTuneJob of the namespace on each phase
    change of each of them grew with the square of the jobs.
    """
    out: dict[tuple[str, str, str, str], str] = {}
    for spec_path, ref_field in refs:
        source: Any = spec or {}
        for part in spec_path:
            source = (source or {}).get(part) or {}
        ref = (source.get(ref_field) or {}).get("name")
        if ref:
            out[reference_key(namespace, spec_path, ref_field, ref)] = name
    return out


def _fresh_reason(exc: NeedFresh) -> str:
    """A short, bounded label for what made a cached sync go to the API (the metric's reason)."""
    text = str(exc)
    if "not in the watch cache" in text:
        return f"{text.split(' ', 1)[0]} not cached"
    return text if len(text) <= 40 else "other"


class Reconciler(Generic[S]):
    """The serialised, coalesced read -> validate -> step -> write -> after loop of one kind.

    ``validate(obj)`` returns the typed spec or raises ``ValidationError``/``InvalidSpec``.
    ``step(obj, spec, **hints)`` returns the :class:`Outcome` to write (hints say what
    triggered the sync: ``apply=True`` from spec handlers, ``job_hint`` from a child Job's event).
    ``after(obj, spec, outcome, changed)`` runs once the status is written. ``on_forget``
    drops the kind's own in-memory state of a deleted object.
    """

    def __init__(self, kind: type[Kind], *, validate: Callable[[dict[str, Any]], S],
                 step: Callable[..., Outcome],
                 after: Callable[[dict[str, Any], S, Any, bool], None] | None = None,
                 on_forget: Callable[[str, str], None] | None = None, cached: bool = False,
                 cache_can_tell: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None) -> None:
        self.kind = kind.kind
        self.validate, self.step, self.after, self.on_forget = validate, step, after, on_forget
        self.owner_label = owner_label(self.kind)
        self.cache_can_tell = cache_can_tell
        """``(prev, new) -> bool``: whether a status change computed from the cache may be written
        as it is (without it, none may: every change is decided on fresh reads)."""
        self.cache: WatchCache | None = WatchCache(self.owner_label) if cached else None
        """With ``cached``: what the kind's event handlers saw (:mod:`.watched`); a sync that is
        not to apply anything is first computed from it (:meth:`sync`), and ``step`` then gets it
        as ``reads=``."""
        self._behind: dict[Key, int] = {}
        """Syncs deferred in a row because the cached object was behind the server's."""
        self._shown: dict[Key, dict[str, Any]] = {}
        """The status each object held after this operator's last fresh sync of it (written or found)."""
        self._written: dict[Key, dict[str, Any]] = {}
        """With a cache: the object as the API server answered this operator's last status write
        of it (the server's object as of that write, which the watch delivers a moment later)."""
        self.child_labels = {"app.kubernetes.io/managed-by": MANAGED_BY, self.owner_label: kopf.PRESENT}
        """kopf label filter for the children of this kind's objects."""
        self._guard = threading.Lock()
        self._locks: dict[Key, threading.Lock] = {}
        self._seen_inputs: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}

    # --- ways in ---------------------------------------------------------------------------------
    def request(self, namespace: str, name: str, **hints: Any) -> None:
        """Sync now, in this thread (after a sync of the same object already running)."""
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
            for attempt in range(CONFLICT_RETRIES):
                try:
                    self.sync(namespace, name, **hints)
                    return
                except ApiException as exc:
                    if namespace_terminating(exc):
                        # The namespace is being deleted: its garbage collection removes the
                        # children first (the step sees them "vanish"), and nothing may be
                        # created there any more. The object goes with its namespace.
                        log.info("%s %s/%s: namespace %s is being deleted; not syncing", self.kind, namespace,
                                 name, namespace)
                        return
                    # 409: someone else wrote the object since it was read: read it again and redo.
                    if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                        raise
                    # Only the object's own writes answer 409 (children are applied with force,
                    # checked with dry runs that are caught), and those come after the step has
                    # applied the children: the redo recomputes the status without applying
                    # them again. (A spec change behind the 409 brings its own spec handler.)
                    hints = {k: v for k, v in hints.items() if k != "apply"}

    def schedule(self, namespace: str, name: str, **hints: Any) -> None:
        """Sync soon, from the debouncer's pool; requests for one object within the delay are one sync."""
        _debouncer().schedule(self, namespace, name, hints)

    def on_event(self, type: str | None, name: str, namespace: str, **_: Any) -> None:
        """kopf event handler of the kind itself: a DELETED object is forgotten.

        There is no finalizer (a deletion never waits for the operator), hence no delete
        handler: the DELETED event schedules a sync, which finds the object gone and forgets
        it, after any sync of it still running (so that one cannot record it again).
        """
        if type == "DELETED":
            self.schedule(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop everything held in memory about a deleted object."""
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._shown.pop((namespace, name), None)
            self._written.pop((namespace, name), None)
            self._behind.pop((namespace, name), None)
        if self.cache is not None:
            self.cache.forget(self.kind, namespace, name)
        metrics.forget(self.kind, namespace, name)
        if self.on_forget is not None:
            self.on_forget(namespace, name)

    async def on_event_nonblocking(self, type: str | None, name: str, namespace: str, event: Any = None,
                                   **_: Any) -> None:
        """:meth:`on_event` as a coroutine, for kopf: it only marks the object due, so it runs in
        kopf's event loop and never waits for (nor holds) one of kopf's handler threads. With a
        cache, every event's object is kept there first."""
        if self.cache is not None and event is not None:
            self.cache.observe(self.kind, event)
        self.on_event(type, name, namespace)

    def fan_out(self, ref_field: str, body: Any, name: str, namespace: str, event_type: str | None,
                spec_path: tuple[str, ...] = ("model",), index: Mapping[Any, Any] | None = None,
                **hints: Any) -> None:
        """Schedule every object whose ``spec.<spec_path>.<ref_field>`` (default ``spec.model``) names
        the job ``name`` that just changed.

        Only when the job's outcome changed (deleted, re-created, phase, output, completion),
        not on each of a training run's progress updates. ``index``: the kind's kopf index of
        references (:func:`reference_keys`), so no object is listed; without it they are listed.
        """
        if self._news(ref_field, body, name, namespace, event_type, spec_path):
            phase = (body.get("status") or {}).get("phase")
            if index is not None:
                self._schedule_indexed(index, ref_field, name, namespace, phase, spec_path, hints)
            else:
                self._schedule_referrers(ref_field, name, namespace, phase, spec_path, hints)

    async def fan_out_nonblocking(self, ref_field: str, body: Any, name: str, namespace: str,
                                  event_type: str | None, spec_path: tuple[str, ...] = ("model",),
                                  index: Mapping[Any, Any] | None = None, **hints: Any) -> None:
        """:meth:`fan_out` for kopf's event handlers: the news check (and, with ``index``, the
        look-up) runs in kopf's event loop; the listing, without one, on the sync pool, so the
        referenced job's own handlers (its spec handler above all) never queue behind it for a
        handler thread."""
        if self._news(ref_field, body, name, namespace, event_type, spec_path):
            phase = (body.get("status") or {}).get("phase")
            if index is not None:
                self._schedule_indexed(index, ref_field, name, namespace, phase, spec_path, hints)
            else:
                _debouncer().submit(self._schedule_referrers, ref_field, name, namespace, phase, spec_path, hints)

    def _news(self, ref_field: str, body: Any, name: str, namespace: str, event_type: str | None,
              spec_path: tuple[str, ...]) -> bool:
        """Whether this event changes what the job ``name`` yields to objects referencing it."""
        status = body.get("status") or {}
        seen = (event_type == "DELETED", (body.get("metadata") or {}).get("uid"), status.get("phase"),
                (status.get("output") or {}).get("uri"), status.get("completionTime"))
        key = (".".join(spec_path), ref_field, namespace, name)
        with self._guard:
            if self._seen_inputs.get(key) == seen:
                return False
            if event_type == "DELETED":
                self._seen_inputs.pop(key, None)
            else:
                self._seen_inputs[key] = seen
        return True

    def _schedule_referrers(self, ref_field: str, name: str, namespace: str, phase: str | None,
                            spec_path: tuple[str, ...], hints: dict[str, Any]) -> None:
        for obj in kube.list_(self.kind, namespace):
            source: Any = obj.get("spec") or {}
            for part in spec_path:
                source = (source or {}).get(part) or {}
            if (source.get(ref_field) or {}).get("name") == name:
                self._schedule_referrer(obj["metadata"]["name"], ref_field, name, namespace, phase, hints)

    def _schedule_indexed(self, index: Mapping[Any, Any], ref_field: str, name: str, namespace: str,
                          phase: str | None, spec_path: tuple[str, ...], hints: dict[str, Any]) -> None:
        for referrer in sorted(set(index.get(reference_key(namespace, spec_path, ref_field, name), ()))):
            self._schedule_referrer(referrer, ref_field, name, namespace, phase, hints)

    def _schedule_referrer(self, referrer: str, ref_field: str, name: str, namespace: str, phase: str | None,
                           hints: dict[str, Any]) -> None:
        log.info("%s %s/%s: %s %s changed (%s); reconciling", self.kind, namespace, referrer, ref_field, name, phase)
        self.schedule(namespace, referrer, **hints)

    # --- the sync ------------------------------------------------------------------------------------
    def sync(self, namespace: str, name: str, **hints: Any) -> None:
        """One read -> validate -> step -> write -> after round (callers hold the object's lock).

        With a cache and nothing to apply, the round is first computed from the cache and ends
        there when the cache decides it (:meth:`_settled_from_cache`); a cached object behind the
        server's defers the round a little (:meth:`_defer`) before it is done on fresh reads.
        """
        started = time.monotonic()
        if self.cache is not None and not hints.get("apply"):
            settled, why = self._settled_from_cache(namespace, name, hints)
            if settled is None and self._defer(namespace, name, hints):
                return
            if settled:
                return
            metrics.FRESH_SYNCS.labels(self.kind, why).inc()
        obj = self._spec_handlers_copy(namespace, name) if hints.get("apply") else None
        if obj is None:
            if hints.get("apply") and self.cache is not None:
                metrics.FRESH_SYNCS.labels(self.kind, "spec handler: not cached").inc()
            obj = kube.get(self.kind, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        prev = obj.get("status") or {}
        spec: S | None = None
        try:
            validated = self.validate(obj)
            check_policy(obj)
        except (ValidationError, InvalidSpec) as exc:
            outcome = reject(obj, spec_problem(exc))  # spec stays None: nothing to act on
        else:
            spec = validated
            try:
                outcome = self.step(obj, spec, **hints)
            except ChildConflict as exc:
                outcome = self._conflict(obj, exc, hints)
                spec = None  # nothing to act on
            except ChildRefused as exc:
                outcome = reject(obj, str(exc))  # permanent for this generation, like any invalid spec
                spec = None
        changed = self.write(obj, prev, outcome)
        with self._guard:
            self._shown[(namespace, name)] = outcome.status
        metrics.record_phase(self.kind, namespace, name, outcome.status.get("phase"))
        metrics.RECONCILE_DURATION.labels(self.kind).observe(time.monotonic() - started)
        if spec is not None:
            self._after(obj, spec, outcome, changed, hints)

    def _after(self, obj: dict[str, Any], spec: S, outcome: Outcome, changed: bool, hints: dict[str, Any]) -> None:
        if self.after is None:
            return
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            self.after(obj, spec, outcome, changed)
        except ChildConflict as exc:
            # The status just written is stale now: write the conflict on a fresh read.
            fresh = kube.get(self.kind, namespace, name)
            if fresh is not None:
                self.write(fresh, fresh.get("status") or {}, self._conflict(fresh, exc, hints))
        except ChildRefused as exc:
            fresh = kube.get(self.kind, namespace, name)
            if fresh is not None:
                self.write(fresh, fresh.get("status") or {}, reject(fresh, str(exc)))

    def _spec_handlers_copy(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object for a spec handler's sync from the cache, None without it (then it is read).

        kopf runs an event's watching handlers, which fill the cache, before its change handlers,
        so the cache holds at least the version whose spec the handler was called for: its
        children are applied from that spec without a read first (one round trip less on the way
        from a new FineTuneJob to its workers). A status it shows that is already outdated only
        makes the status write meet a newer resourceVersion: 409, and the write is redone on a
        fresh read (:meth:`request`).
        """
        if self.cache is None:
            return None
        try:
            return copy.deepcopy(self.cache.get(self.kind, namespace, name))
        except NeedFresh:
            return None

    def _defer(self, namespace: str, name: str, hints: dict[str, Any]) -> bool:
        """Schedule the sync again in :data:`CACHE_CATCH_UP_SECONDS` (True), unless it has been
        deferred :data:`CACHE_CATCH_UP_TRIES` times in a row already (False: sync fresh now)."""
        key = (namespace, name)
        with self._guard:
            tries = self._behind.get(key, 0)
            if tries >= CACHE_CATCH_UP_TRIES:
                self._behind.pop(key, None)
                return False
            self._behind[key] = tries + 1
        _debouncer().schedule(self, namespace, name, hints, CACHE_CATCH_UP_SECONDS)
        return True

    def _settled_from_cache(self, namespace: str, name: str, hints: dict[str, Any]) -> tuple[bool | None, str]:
        """The sync computed and written from the cache alone; True when that finished it, None
        when the cached object is behind the server's (:meth:`_defer`), False for fresh reads;
        with why it did not finish (``kubeforge_fresh_syncs_total``'s reason).

        The status is computed from the cached object, Job and pods. It finishes the sync when
        the object the cache shows is the one this operator last left (its status equals the
        last one written or found, so a cache still behind the last write never passes for
        current) and either

        * the computed status equals it and there is no event to post: nothing to do, no request;
        * or the status changed in a way the cache can tell (the kind's ``cache_can_tell``: for
          a FineTuneJob only good news, as an object the cache has not seen yet can only hide
          workers): one merge patch guarded by the cached object's
          ``resourceVersion`` (a newer object on the server, a spec or annotation change of
          anyone's, answers 409: None), then its events.

        A cached object that does not show the status last written is behind too (None),
        unless the API server's answer to that write does: the watch has not delivered this
        operator's own write yet, and that answer, the server's object as of the write, stands
        in for it (each such wait, and the fresh reads after it, cost the API server more
        than a watch a moment behind ever saved).

        A child behind the cache is at worst one watch event old, and that event schedules the
        next sync. ``after`` then runs as after any sync (a TTL that has passed still deletes
        the job). Anything the step cannot decide from the cache (a child missing from it, a
        child to apply, a failure to count, an invalid spec) raises :class:`.watched.NeedFresh`
        or is refused here: False, and the caller syncs on fresh reads.
        """
        assert self.cache is not None
        started = time.monotonic()
        try:
            obj = copy.deepcopy(self.cache.get(self.kind, namespace, name))
        except NeedFresh:
            return False, "not cached"
        if obj["metadata"].get("deletionTimestamp"):
            return False, "being deleted"
        prev = obj.get("status") or {}
        with self._guard:
            shown = self._shown.get((namespace, name), prev)
            written = self._written.get((namespace, name))
        if shown != prev:
            if written is None or (written.get("status") or {}) != shown \
                    or written["metadata"].get("uid") != obj["metadata"].get("uid"):
                return None, "cache behind"
            # The watch has not delivered this operator's own last write yet: the object the
            # server answered that write with is the newer one (a later change of anyone's
            # makes the guarded write below answer 409, as a stale cache does).
            obj = copy.deepcopy(written)
            prev = obj.get("status") or {}
        try:
            spec = self.validate(obj)
            check_policy(obj)
            outcome = self.step(obj, spec, reads=self.cache, **hints)
        except NeedFresh as exc:
            return False, _fresh_reason(exc)
        except (ValidationError, InvalidSpec):
            return False, "invalid spec"
        except ChildConflict:
            return False, "child conflict"
        changed = outcome.status != prev
        if outcome.events and not changed:
            return False, "events"  # events without a guarded write to tie them to: decide on fresh reads
        if changed and not (self.cache_can_tell and self.cache_can_tell(prev, outcome.status)):
            return False, "bad news"  # news the cache may be wrong about (a worker lost?): fresh reads
        if changed:
            try:
                self.write(obj, prev, outcome)
            except ApiException as exc:
                if exc.status == 409:
                    return None, "conflict"  # the cached object is behind the server's
                raise
            with self._guard:
                self._shown[(namespace, name)] = outcome.status
        with self._guard:
            self._behind.pop((namespace, name), None)
        metrics.record_phase(self.kind, namespace, name, outcome.status.get("phase"))
        metrics.RECONCILE_DURATION.labels(self.kind).observe(time.monotonic() - started)
        self._after(obj, spec, outcome, changed, hints)
        return True, ""

    def _conflict(self, obj: dict[str, Any], exc: ChildConflict, hints: dict[str, Any]) -> Outcome:
        """The outcome of a sync stopped by a foreign object; look again later, not at once."""
        meta = obj["metadata"]
        log.warning("%s %s/%s: %s", self.kind, meta["namespace"], meta["name"], exc)
        _debouncer().schedule(self, meta["namespace"], meta["name"], hints, CHILD_CONFLICT_RECHECK_SECONDS)
        return child_conflict(obj, str(exc))

    def write(self, obj: dict[str, Any], prev: dict[str, Any], outcome: Outcome) -> bool:
        """Write ``outcome.status`` if it differs from ``prev``, then hand its events to the posting
    pool (:func:`.events.post_later`); True if written."""
        meta = obj["metadata"]
        changed = outcome.status != prev
        if changed:
            answer = kube.patch_merge(self.kind, meta["namespace"], meta["name"],
                                      {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                                       "status": outcome.status}, subresource="status")
            if self.cache is not None and isinstance(answer, dict) and answer.get("metadata"):
                with self._guard:
                    self._written[(meta["namespace"], meta["name"])] = answer
            phase = outcome.status.get("phase")
            if phase != prev.get("phase"):
                # Two or three per job on its way up: DEBUG (``-v``); how it ended: INFO.
                log.log(logging.INFO if phase in TERMINAL_PHASES else logging.DEBUG, "%s %s/%s: phase %s -> %s",
                        self.kind, meta["namespace"], meta["name"], prev.get("phase"), phase)
        post_events_later(obj, outcome.events)  # after the write; this sync does not wait for them
        return changed

    def run_scheduled(self, namespace: str, name: str, hints: dict[str, Any]) -> None:
        """A debounced sync; a failure is logged and the sync scheduled again (never raised).

        Not while peering has paused this replica (:mod:`.peering`): the sync waits and looks again.
        """
        if not peering.active():
            _debouncer().schedule(self, namespace, name, hints, peering.PAUSED_RECHECK_SECONDS)
            return
        try:
            self.request(namespace, name, **hints)
        except kopf.PermanentError as exc:
            log.error("%s %s/%s: %s", self.kind, namespace, name, exc)
        except Exception as exc:  # noqa: BLE001 - logged; tried again after the delay
            log.exception("sync of %s %s/%s failed", self.kind, namespace, name)
            delay = exc.delay if isinstance(exc, kopf.TemporaryError) and exc.delay else None
            _debouncer().schedule(self, namespace, name, hints, delay)


class Debouncer:
    """Due syncs by object: one scheduler thread hands each due object to a small pool.

    Event handlers only mark an object due (and return at once, freeing kopf's workers); an
    object marked again before it is due is still one sync, with the requests' hints merged.
    """

    def __init__(self, delay: float, workers: int = 8) -> None:
        self.delay = delay
        self._due: dict[tuple[Reconciler[Any], str, str], tuple[float, dict[str, Any]]] = {}
        self._cv = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubeforge-sync")
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kubeforge-debouncer", daemon=True)
        self._thread.start()

    def schedule(self, reconciler: Reconciler[Any], namespace: str, name: str, hints: dict[str, Any],
                 delay: float | None = None) -> None:
        key = (reconciler, namespace, name)
        due = time.monotonic() + (self.delay if delay is None else delay)
        with self._cv:
            if key in self._due:
                old_due, old_hints = self._due[key]
                self._due[key] = (min(old_due, due), merge_hints(old_hints, hints))
            else:
                self._due[key] = (due, dict(hints))
            self._cv.notify()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the pool now (not debounced); a failure is logged."""
        def run() -> None:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - logged; the next event brings the next try
                log.exception("%s failed", getattr(fn, "__name__", fn))
        self._pool.submit(run)

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
                ready = [(k, hints) for k, (t, hints) in self._due.items() if t <= nowt]
                for k, _hints in ready:
                    del self._due[k]
                if not ready:
                    wait = min((t for t, _h in self._due.values()), default=nowt + 60) - nowt
                    self._cv.wait(timeout=max(wait, 0.01))
                    continue
            for (reconciler, namespace, name), hints in ready:
                self._pool.submit(reconciler.run_scheduled, namespace, name, hints)


_the_debouncer: Debouncer | None = None
_debouncer_lock = threading.Lock()


def _debouncer() -> Debouncer:
    global _the_debouncer
    with _debouncer_lock:
        if _the_debouncer is None:
            _the_debouncer = Debouncer(float(os.environ.get(DEBOUNCE_ENV, DEFAULT_DEBOUNCE_SECONDS)))
        return _the_debouncer


@kopf.on.cleanup()
def stop_debouncer(**_: Any) -> None:
    global _the_debouncer
    with _debouncer_lock:
        if _the_debouncer is not None:
            _the_debouncer.stop()
            _the_debouncer = None


__all__ = ["ChildConflict", "ChildRefused", "Debouncer", "Reconciler", "apply_children", "waves", "check_policy", "controlled_by", "ensure_free",
           "merge_hints", "owned_by", "reference_key", "reference_keys"]
