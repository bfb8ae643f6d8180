"""What kopf's watches last delivered, for the status syncs that apply nothing.

kopf already watches a FineTuneJob's kind and the Jobs and pods carrying its owner label: the
event handlers of :mod:`.finetune` schedule a sync on each event. They also put the event's
object here (:meth:`WatchCache.observe`; a DELETED one is dropped) before they schedule, so a
sync always finds at least the state that triggered it. :class:`.reconcile.Reconciler` then
computes the status from this cache first: when the cached FineTuneJob shows the status this
operator last wrote (or found), the sync ends there, without a request when the status
computed equals it, with one status patch guarded by the cached object's ``resourceVersion``
when it does not (a newer object on the server answers 409, and the sync is redone on fresh
reads). Anything else (an annotation to write, an object missing from the cache, a child to
create) is done the usual way, on fresh reads (:class:`NeedFresh`). A child is at worst one
watch event behind in the cache, and that event schedules the next sync.

Most syncs of a job whose workers are coming up change nothing (a pod's Pending -> Running ->
Ready is several events, the Job controller's status updates more): each of them cost a read of
the job, its Job and its pods before, and each one that changed the status (the phase, the
worker counts) cost those three reads before its write. Called by :mod:`.reconcile` and
:mod:`.finetune`; the objects are kopf's own (they are never modified here or by the pure status functions).
"""

from __future__ import annotations

import threading
from typing import Any


class NeedFresh(Exception):
    """A cached sync cannot decide on the cache alone: do it on fresh reads."""


class WatchCache:
    """Objects by kind, namespace and name, each also under the value of one owner label."""

    cached = True
    """Marks a read source as this cache (the kube module, the live one, has no such attribute)."""

    def __init__(self, owner_label: str) -> None:
        self.owner_label = owner_label
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._owned: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def observe(self, kind: str, event: Any) -> None:
        """Keep ``event["object"]`` (a kopf watch event; a DELETED object is dropped)."""
        obj = (event or {}).get("object") or {}
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            return
        owner = (meta.get("labels") or {}).get(self.owner_label)
        with self._lock:
            key = (kind, namespace, name)
            old = self._objects.pop(key, None)
            if old is not None:
                old_owner = ((old.get("metadata") or {}).get("labels") or {}).get(self.owner_label)
                self._owned.get((kind, namespace, old_owner or ""), {}).pop(name, None)
            if event.get("type") == "DELETED":
                return
            self._objects[key] = obj
            if owner:
                self._owned.setdefault((kind, namespace, owner), {})[name] = obj

    def forget(self, kind: str, namespace: str, name: str) -> None:
        self.observe(kind, {"type": "DELETED", "object": {"metadata": {"namespace": namespace, "name": name}}})

    # --- the read interface of kubeforge.kube (get, list_) -----------------------------------------
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """The object as last delivered; :class:`NeedFresh` when it is not here (absent, or not seen yet)."""
        with self._lock:
            found = self._objects.get((kind, namespace, name))
        if found is None:
            raise NeedFresh(f"{kind} {namespace}/{name} is not in the watch cache")
        return found

    def list_(self, kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        """The objects carrying ``<owner label>=<name>`` (the only selector the cache answers)."""
        label, _, value = (label_selector or "").partition("=")
        if label != self.owner_label or not value or "," in value:
            raise NeedFresh(f"the watch cache answers only {self.owner_label}=<name>, not {label_selector!r}")
        with self._lock:
            return list(self._owned.get((kind, namespace, value), {}).values())


def cached(reads: Any) -> bool:
    """Whether ``reads`` is a :class:`WatchCache` (not the live API)."""
    return bool(getattr(reads, "cached", False))


def fresh_only(reads: Any, what: str) -> None:
    """Raise :class:`NeedFresh` before ``what`` (a write) when reading from the cache."""
    if cached(reads):
        raise NeedFresh(what)
