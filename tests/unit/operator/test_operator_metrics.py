"""Operator metrics (controllers/metrics.py): names, labels and the per-phase gauge."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubeforge.controllers import metrics


def samples() -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_jobs_by_kind_and_phase_follow_the_last_recorded_phase():
    metrics.record_phase("FineTuneJob", "ns-m", "a", "Running")
    metrics.record_phase("FineTuneJob", "ns-m", "b", "Running")
    metrics.record_phase("FineTuneJob", "ns-m", "b", "Succeeded")  # moved on: counted once, in its new phase
    metrics.record_phase("QuantizeJob", "ns-m", "q", "Running")
    s = samples()
    running = s[("kubeforge_jobs", (("kind", "FineTuneJob"), ("phase", "Running")))]
    succeeded = s[("kubeforge_jobs", (("kind", "FineTuneJob"), ("phase", "Succeeded")))]
    metrics.forget("FineTuneJob", "ns-m", "a")
    after = samples()
    assert after.get(("kubeforge_jobs", (("kind", "FineTuneJob"), ("phase", "Running"))), 0) == running - 1
    assert after[("kubeforge_jobs", (("kind", "FineTuneJob"), ("phase", "Succeeded")))] == succeeded
    assert after[("kubeforge_jobs", (("kind", "QuantizeJob"), ("phase", "Running")))] >= 1
    metrics.forget("FineTuneJob", "ns-m", "b")
    metrics.forget("QuantizeJob", "ns-m", "q")


def test_restarts_durations_and_time_to_running():
    key = ("kubeforge_restarts_total", (("kind", "FineTuneJob"), ("reason", "Disruption")))
    before = samples().get(key, 0)
    metrics.count_restart("FineTuneJob", "Disruption")
    metrics.observe_time_to_running("FineTuneJob", 3.5)
    metrics.RECONCILE_DURATION.labels("FineTuneJob").observe(0.02)
    s = samples()
    assert s[key] == before + 1
    assert s[("kubeforge_time_to_workers_running_seconds_count", (("kind", "FineTuneJob"),))] >= 1
    assert s[("kubeforge_time_to_workers_running_seconds_bucket", (("kind", "FineTuneJob"), ("le", "5.0")))] >= 1
    assert s[("kubeforge_reconcile_duration_seconds_count", (("kind", "FineTuneJob"),))] >= 1
