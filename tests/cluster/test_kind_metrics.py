"""The operator's own metrics cover all three kinds: read from its ``/metrics`` endpoint.

One operator process (with ``--metrics-port``) reconciles a FineTuneJob, a QuantizeJob and an
InferenceService; ``kubeforge_jobs{kind,phase}`` and ``kubeforge_reconcile_duration_seconds{kind}``
must show each kind, and a deleted resource must leave the gauge.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.finetune import Env, ftj, make_env, wait_metrics_up
from support.waiting import wait_for

pytestmark = pytest.mark.cluster

KINDS = ("FineTuneJob", "QuantizeJob", "InferenceService")


@pytest.fixture
def env(cluster, tmp_path, request) -> Iterator[Env]:
    for e in make_env(cluster, tmp_path):
        request.node._kubeforge_logs = [str(e.operator.log_path)]
        yield e


def samples(env: Env) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(env.metrics()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def jobs(env: Env, kind: str, phase: str) -> float:
    return samples(env).get(("kubeforge_jobs", (("kind", kind), ("phase", phase))), 0)


def phase_of(env: Env, kind: str, name: str) -> str | None:
    return ((env.get(kind.lower(), name) or {}).get("status") or {}).get("phase")


def test_phases_and_durations_of_every_kind(env: Env):
    env.apply(ftj("metered-ft", gpus=0))
    env.apply({"apiVersion": "kubeforge.io/v1alpha1", "kind": "QuantizeJob", "metadata": {"name": "metered-q"},
               "spec": {"model": {"uri": "s3://models/base"}, "output": {"uri": "s3://models/metered-q"}}})
    env.apply({"apiVersion": "kubeforge.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "metered-svc"},
               "spec": {"model": {"uri": "s3://models/base"}}})
    for kind, name in zip(KINDS, ("metered-ft", "metered-q", "metered-svc")):
        wait_for(lambda: phase_of(env, kind, name) == "Running", 90, what=f"{kind} {name} Running")
    wait_metrics_up(env)
    for kind in KINDS:
        wait_for(lambda: jobs(env, kind, "Running") == 1, 30, what=f"kubeforge_jobs{{kind={kind},phase=Running}}")
        assert samples(env)[("kubeforge_reconcile_duration_seconds_count", (("kind", kind),))] >= 1, kind

    # Deleted: no longer counted (the operator forgets what it knew of it).
    for kind, name in zip(KINDS, ("metered-ft", "metered-q", "metered-svc")):
        env.delete(kind.lower(), name)
    wait_for(lambda: all(jobs(env, kind, "Running") == 0 for kind in KINDS), 30,
             what="deleted resources leave kubeforge_jobs")
