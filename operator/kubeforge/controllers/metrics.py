"""The operator's own Prometheus metrics (not the workloads').

The shared reconcile loop (:mod:`.reconcile`) reports phases and durations for every kind;
the FineTuneJob reconciler adds restarts and time to running. The metrics are registered on
prometheus_client's default registry, which :mod:`kubeforge.controllers.runner` serves over
HTTP on ``kubeforge operator --metrics-port`` (next to the process metrics).

* ``kubeforge_jobs{kind,phase}``                     resources (FineTuneJob, QuantizeJob,
  InferenceService) per kind and phase (a gauge computed from the last phase each sync
  recorded, so it is right after a restart: every object is synced when the operator starts);
* ``kubeforge_reconcile_duration_seconds{kind}``     time per sync of one object (histogram);
* ``kubeforge_time_to_workers_running_seconds{kind}`` creation to all workers running, once
  per resource (histogram);
* ``kubeforge_restarts_total{kind,reason}``          worker restarts by reason (Failure,
  Disruption);
* ``kubeforge_fresh_syncs_total{kind,reason}``       syncs of a cached kind that read the
  object, its Job and pods from the API server, by why the watch cache could not decide
  (:meth:`.reconcile.Reconciler.sync`): where a sync's reads come from.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as _Counter
from collections.abc import Iterator
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

RECONCILE_DURATION = Histogram(
    "kubeforge_reconcile_duration_seconds", "Time spent in one reconcile of a resource",
    ["kind"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TIME_TO_RUNNING = Histogram(
    "kubeforge_time_to_workers_running_seconds",
    "Time from a resource's creation to all of its workers running (observed once per resource)",
    ["kind"], registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
RESTARTS = Counter(
    "kubeforge_restarts", "Worker restarts observed, by reason (Failure, Disruption)",
    ["kind", "reason"], registry=REGISTRY,
)

FRESH_SYNCS = Counter(
    "kubeforge_fresh_syncs", "Syncs done on fresh reads from the API server, by why the watch cache did not decide",
    ["kind", "reason"], registry=REGISTRY,
)

_phases: dict[tuple[str, str, str], str] = {}
_lock = threading.Lock()


class _PhaseCollector(Collector):
    """``kubeforge_jobs{kind,phase}`` from the last phase recorded per resource."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with _lock:
            counts = _Counter((kind, phase) for (kind, _ns, _name), phase in _phases.items())
        fam = GaugeMetricFamily("kubeforge_jobs", "KubeForge resources by kind and phase", labels=["kind", "phase"])
        for (kind, phase), n in sorted(counts.items()):
            fam.add_metric([kind, phase], n)
        yield fam


REGISTRY.register(_PhaseCollector())


def record_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    with _lock:
        if phase:
            _phases[(kind, namespace, name)] = phase
        else:
            _phases.pop((kind, namespace, name), None)


def forget(kind: str, namespace: str, name: str) -> None:
    record_phase(kind, namespace, name, None)


def observe_time_to_running(kind: str, seconds: float) -> None:
    TIME_TO_RUNNING.labels(kind).observe(max(0.0, seconds))


def count_restart(kind: str, reason: str) -> None:
    RESTARTS.labels(kind, reason).inc()
