"""Fixtures of the chart's cluster tests: one installed release, operators as its ServiceAccount.

The release is installed once per session (webhook off: its Service is unreachable from this
API server, and a Fail-policy webhook would block every other test; test_chart_webhook.py
serves the webhook from a local process instead). Operators run as local processes with the
Deployment's own args and a kubeconfig holding only a token of the chart's ServiceAccount.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.chart import (
    CHART, PEERING_LIFETIME, OperatorAs, deployment_command, helm, local_args, sa_kubeconfig,
)
from support.cluster import free_port

RELEASE = "kf"
SA = "kf-kubeforge"


@pytest.fixture(scope="session")
def chart_release(cluster) -> Iterator[str]:
    """The namespace the chart is installed in (release "kf", cluster-wide RBAC, 2 replicas)."""
    ns = f"kubeforge-{uuid.uuid4().hex[:6]}"
    env = cluster.env()
    helm("install", RELEASE, str(CHART), "--namespace", ns, "--create-namespace",
         "--set", "webhook.enabled=false", "--set", f"peering.lifetime={PEERING_LIFETIME}", env=env)
    try:
        yield ns
    finally:
        helm("uninstall", RELEASE, "--namespace", ns, "--wait=false", env=env, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.fixture
def chart_operator(cluster, chart_release, tmp_path: Path, request: pytest.FixtureRequest
                   ) -> Iterator[Callable[..., OperatorAs]]:
    """Start operators as the chart's ServiceAccount: ``chart_operator("a", extra_args=[...])``."""
    kubeconfig = sa_kubeconfig(cluster, chart_release, SA, tmp_path / "sa.kubeconfig")
    args, env = deployment_command(cluster, chart_release, "kf-kubeforge")
    started: list[OperatorAs] = []
    request.node._kubeforge_logs = []

    def start(identity: str, extra_args: list[str] | None = None) -> OperatorAs:
        log = tmp_path / f"operator-{identity}.log"
        request.node._kubeforge_logs.append(str(log))
        op = OperatorAs([*local_args(args, free_port), *(extra_args or [])], kubeconfig, log,
                        env={**env, "POD_ID": identity}).start()
        started.append(op)
        return op

    start.args = args  # type: ignore[attr-defined]
    yield start
    for op in started:
        op.stop()
