"""Posting Kubernetes Events on KubeForge resources, shared by the three reconcilers.

The pure status functions return :class:`~.conditions.Event` values; :mod:`.reconcile` posts
them with :func:`post_later` once the status they go with is written: from a small pool of
its own, so that a sync (a kopf spec handler above all, which holds one of kopf's handler
threads) does not wait for them: on a busy API server that was about 1.5 s of each new
FineTuneJob's spec handler. Posting goes straight to the API (not through kopf's event poster)
because status syncs also run on the operator's own threads, outside any kopf handler
context. An event is best effort: a failure to post is logged, never raised.
"""

from __future__ import annotations

import logging
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from .. import kube
from ..api import API_VERSION
from .conditions import Event, now

log = logging.getLogger(__name__)

_HOST = socket.gethostname()
MAX_MESSAGE = 1024


def post(obj: dict[str, Any], ev: Event) -> None:
    """Post ``ev`` as a core/v1 Event about the KubeForge object ``obj``."""
    meta = obj["metadata"]
    ts = now()
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj.get("kind"),
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                           "resourceVersion": meta.get("resourceVersion")},
        "type": ev.type, "reason": ev.reason, "message": ev.message[:MAX_MESSAGE],
        "source": {"component": "kubeforge"}, "reportingComponent": "kubeforge", "reportingInstance": _HOST,
        "firstTimestamp": ts, "lastTimestamp": ts, "count": 1,
    }
    try:
        kube.create("Event", meta["namespace"], event)
    except Exception as exc:  # noqa: BLE001 - an event is best effort
        log.warning("could not post event %s on %s/%s: %s", ev.reason, meta["namespace"], meta["name"], exc)


POSTING_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pending: set[Future[None]] = set()
_lock = threading.Lock()


def post_later(obj: dict[str, Any], events: list[Event]) -> None:
    """Post ``events`` about ``obj``, in order, from the posting pool; returns at once."""
    if not events:
        return
    global _pool
    # What post() reads of obj, as it is now (the caller may go on to change its copy).
    about = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": dict(obj["metadata"])}
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(POSTING_THREADS, thread_name_prefix="kubeforge-events")
        future = _pool.submit(_post_all, about, list(events))
        _pending.add(future)
    future.add_done_callback(_discard)


def _post_all(obj: dict[str, Any], events: list[Event]) -> None:
    for ev in events:
        post(obj, ev)


def _discard(future: Future[None]) -> None:
    with _lock:
        _pending.discard(future)


def drain(timeout: float = 10.0) -> None:
    """Wait until every event handed to :func:`post_later` so far has been posted (tests, shutdown)."""
    with _lock:
        pending = list(_pending)
    wait(pending, timeout=timeout)
