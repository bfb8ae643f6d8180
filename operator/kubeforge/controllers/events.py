"""Posting Kubernetes Events on KubeForge resources, shared by the three reconcilers.

The pure status functions return :class:`~.conditions.Event` values; :mod:`.reconcile` posts
them with :func:`post`. Posting goes straight to the API (not through kopf's event poster)
because status syncs also run on the operator's own threads, outside any kopf handler
context. An event is best effort: a failure to post is logged, never raised.
"""

from __future__ import annotations

import logging
import socket
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
