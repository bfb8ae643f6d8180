"""A watch-backed cache of the FineTuneJobs and QuantizeJobs of a namespace, for the webhook.

The admission webhook needs every job of the namespace (output collisions) and the job a
reference names, on every CREATE and UPDATE it reviews. Reading them from the API server each
time costs two LISTs per admission (and a GET per reference), which grows with the namespace
and with every GitOps sync. Instead, the first review in a namespace starts one informer per
kind there: a daemon thread that LISTs once, then WATCHes from that resourceVersion (bookmarks
on), LISTing again only when the watch expires (410) or fails. Until its first LIST has
finished, :func:`jobs` and :func:`get` read from the API server directly, so a review is never
answered from an empty cache.

Independent of kopf: an operator replica that peering has paused still serves the webhook
(the Service sends reviews to every replica), and kopf's own indexes stop with its watches
while paused. Per namespace, not cluster-wide, so the namespaced chart mode's RBAC (a Role in
each watched namespace) suffices. A cache is as fresh as its watch: two jobs created within
the same fraction of a second can both be admitted, as they could with a LIST per call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .. import kube
from ..api import API_VERSION, KINDS

log = logging.getLogger(__name__)

JOB_KINDS = ("FineTuneJob", "QuantizeJob")
WATCH_TIMEOUT_SECONDS = 300
RETRY_SECONDS = 2.0


class Informer:
    """LIST then WATCH of one kind in one namespace, in a daemon thread; objects by name."""

    def __init__(self, kind: str, namespace: str) -> None:
        self.kind, self.namespace = kind, namespace
        self.plural = next(k.plural for k in KINDS if k.kind == kind)
        self.synced = threading.Event()
        self._objects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kubeforge-informer-{kind}-{namespace}", daemon=True)

    def start(self) -> "Informer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get(name)

    def _list(self) -> str:
        answer = kube._call("GET", kube.path(self.kind, self.namespace))
        items = {}
        for item in answer.get("items") or []:
            item.setdefault("kind", self.kind)  # list items carry no kind
            items[item["metadata"]["name"]] = item
        with self._lock:
            self._objects = items
        self.synced.set()
        return str(answer["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str) -> None:
        from kubernetes import client, watch

        group, version = API_VERSION.split("/")
        api = client.CustomObjectsApi(kube.api())
        stream = watch.Watch()
        for event in stream.stream(api.list_namespaced_custom_object, group, version, self.namespace, self.plural,
                                   resource_version=resource_version, allow_watch_bookmarks=True,
                                   timeout_seconds=WATCH_TIMEOUT_SECONDS):
            if self._stopped.is_set():
                stream.stop()
                return
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                return  # e.g. 410 Gone: the resourceVersion expired; LIST again
            if kind == "BOOKMARK" or not isinstance(obj, dict):
                continue
            obj.setdefault("kind", self.kind)
            name = obj["metadata"]["name"]
            with self._lock:
                if kind == "DELETED":
                    self._objects.pop(name, None)
                else:
                    self._objects[name] = obj

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._watch(self._list())
            except Exception as exc:  # noqa: BLE001 - the API server may be away for a while
                log.warning("%s informer in %s: %s; listing again in %.0fs", self.kind, self.namespace, exc,
                            RETRY_SECONDS)
                time.sleep(RETRY_SECONDS)


_informers: dict[tuple[str, str], Informer] = {}
_informers_lock = threading.Lock()


def informer(kind: str, namespace: str) -> Informer:
    """The informer of ``kind`` in ``namespace``, started on first use."""
    with _informers_lock:
        found = _informers.get((kind, namespace))
        if found is None:
            found = _informers[(kind, namespace)] = Informer(kind, namespace).start()
        return found


def jobs(namespace: str) -> list[dict[str, Any]]:
    """Every FineTuneJob and QuantizeJob of ``namespace`` (each with its ``kind``)."""
    out: list[dict[str, Any]] = []
    for kind in JOB_KINDS:
        inf = informer(kind, namespace)
        if inf.synced.is_set():
            out += inf.items()
        else:
            out += [{**item, "kind": kind} for item in kube.list_(kind, namespace)]
    return out


def get(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One FineTuneJob or QuantizeJob by name, from the cache once it has synced."""
    inf = informer(kind, namespace)
    return inf.get(name) if inf.synced.is_set() else kube.get(kind, namespace, name)


def stop_all() -> None:
    with _informers_lock:
        for inf in _informers.values():
            inf.stop()
        _informers.clear()
