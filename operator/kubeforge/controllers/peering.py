"""Whether this replica may act now: kopf's peering rule, for the operator's own threads.

kopf pauses a replica's handlers while a live peer of higher (or equal) priority is in the
peering object, but it knows nothing of the threads the operator runs itself: the FineTuneJob
poller (progress scrapes, ``ttlSecondsAfterFinished`` deletions) and the debouncer's scheduled
syncs (child events, retries, conflict re-checks). Without this gate a paused standby would
keep deleting expired jobs and writing status next to the active replica.

:func:`active` applies kopf's own rule (``kopf._core.engines.peering.process_peering_event``)
to the peering object as read now: paused while any live peer other than this replica has a
priority higher than or equal to ours, or while the peering object is missing or unreadable
(kopf's mandatory peering pauses then too). In namespaced mode each watched namespace has its
own ``KopfPeering`` and a conflict in any of them pauses the whole replica, as in kopf. The
answer is cached for :data:`CACHE_SECONDS`, so a burst of syncs costs one GET.

Configured by :mod:`.runner` from the command line (``--peering``); without peering (one
replica, ``--standalone``, tests) every replica is always active.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from kubernetes.client.rest import ApiException

from .. import kube

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
PAUSED_RECHECK_SECONDS = 5.0
"""How long a scheduled sync waits before looking again while this replica is paused."""


def blocking_peers(peers: dict[str, Any], identity: str, priority: int,
                   now: dt.datetime | None = None) -> list[str]:
    """Identities of the live peers (other than ``identity``) whose priority is >= ``priority``.

    ``peers`` is a peering object's ``status``: ``{identity: {priority, lifetime, lastseen}}``.
    A peer is live until ``lastseen + lifetime``.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    out = []
    for other, info in (peers or {}).items():
        if other == identity or not isinstance(info, dict):
            continue
        try:
            seen = dt.datetime.fromisoformat(str(info["lastseen"]).replace("Z", "+00:00"))
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=dt.timezone.utc)
            deadline = seen + dt.timedelta(seconds=int(info.get("lifetime", 60)))
            other_priority = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue  # not a peer entry kopf would understand either
        if deadline > now and other_priority >= priority:
            out.append(other)
    return sorted(out)


@dataclass(frozen=True)
class PeeringConfig:
    name: str
    identity: str
    priority: int
    namespaces: tuple[str, ...] = ()
    """Empty: cluster-wide (one ClusterKopfPeering); else one KopfPeering per namespace."""


class Gate:
    """:meth:`active` answers whether this replica may act; cached for ``CACHE_SECONDS``."""

    def __init__(self, config: PeeringConfig | None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._checked = 0.0
        self._active = config is None
        self._reason = ""

    def _paths(self) -> Iterable[str]:
        assert self.config is not None
        if not self.config.namespaces:
            yield f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.config.name}"
        for ns in self.config.namespaces:
            yield f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{self.config.name}"

    def _read(self) -> tuple[bool, str]:
        assert self.config is not None
        for path in self._paths():
            try:
                obj = kube._call("GET", path)
            except ApiException as exc:
                return False, f"peering object {path} unreadable ({exc.status})"
            except Exception as exc:  # noqa: BLE001 - the API server may be away: do not act blind
                return False, f"peering object {path} unreadable ({exc})"
            above = blocking_peers(obj.get("status") or {}, self.config.identity, self.config.priority)
            if above:
                return False, f"live peers of higher or equal priority: {', '.join(above)}"
        return True, ""

    def active(self) -> bool:
        if self.config is None:
            return True
        with self._lock:
            if time.monotonic() - self._checked < CACHE_SECONDS:
                return self._active
            active, reason = self._read()
            if active != self._active or reason != self._reason:
                if active:
                    log.info("peering: this replica is active; background work resumes")
                else:
                    log.info("peering: this replica is paused (%s); background work waits", reason)
            self._active, self._reason, self._checked = active, reason, time.monotonic()
            return active


_gate = Gate(None)


def configure(config: PeeringConfig | None) -> None:
    """Set the peering this replica takes part in (None: standalone, always active)."""
    global _gate
    _gate = Gate(config)


def active() -> bool:
    """Whether this replica may act now (see the module docstring)."""
    return _gate.active()
