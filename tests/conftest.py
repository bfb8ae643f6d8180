"""Shared fixtures: the local control plane (session-scoped), namespaces, the operator.

Cluster tests carry the ``cluster`` marker; ``pytest -m "not cluster"`` needs no Go. The
control plane's logs are printed under a failing cluster test's report.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cluster import REPO, LocalCluster, start_cluster
from support.operator import KubeforgeProcess

# Every process a test starts (torchrun workers, servers, the operator, `python -m kubeforge`)
# imports this checkout's code, whatever checkout an editable install last pointed at.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "operator"), str(REPO / "trainer_image")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
)


def _torch_extensions_dir() -> str:
    """One build cache for torch C++ extensions, shared by every process the tests start.

    DeepSpeed compiles its CPU collective op (``deepspeed_shm_comm``, two C++ files) on first
    use under ``$TORCH_EXTENSIONS_DIR``, by default under ``$HOME``. A pod run by the local
    runner gets its own empty ``HOME`` (the pod's workspace), so each DeepSpeed pod compiled
    the op again: both "nodes" of the two-node ZeRO-3 flow, ~4 minutes of the 2-core CI
    machine per run. The op and its use are unchanged; it is built once per torch version.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # the cluster-only environment: nothing to build
        torch_version = "none"
    cache = Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge"))
    return str(cache / "torch_extensions" / f"torch-{torch_version}")


os.environ.setdefault("TORCH_EXTENSIONS_DIR", _torch_extensions_dir())

_CLUSTER: LocalCluster | None = None
_STARTUP_REPORT: list[str] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    global _CLUSTER
    workdir = tmp_path_factory.mktemp("cluster")
    c = start_cluster(workdir)
    nodes = len(c.kubectl("get", "nodes", "-o", "name").stdout.split())
    _STARTUP_REPORT.append(f"control plane started in {c.startup_seconds:.1f} s (etcd, kube-apiserver, "
                           f"controller-manager, scheduler, kwok with {nodes} GPU nodes)")
    _CLUSTER = c
    try:
        c.kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=True)
        c.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "-l",
                  "app.kubernetes.io/part-of=kubeforge", check=True)
        yield c
    finally:
        _CLUSTER = None
        c.stop()


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    for line in _STARTUP_REPORT:
        terminalreporter.write_line(f"[cluster] {line}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed and _CLUSTER is not None and "cluster" in item.keywords:
        report.sections.append(("control plane logs", _CLUSTER.logs()))
        for extra in getattr(item, "_kubeforge_logs", []):
            if Path(extra).exists():
                report.sections.append((f"log {extra}", Path(extra).read_text(errors="replace")[-8000:]))


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name, check=True)
    # Pods need the namespace's default ServiceAccount (created by the controller-manager).
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "-n", name, "serviceaccount", "default").returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in {name}")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def operator_process(request: pytest.FixtureRequest, cluster: LocalCluster, namespace: str,
                     tmp_path: Path) -> Iterator[KubeforgeProcess]:
    log_path = tmp_path / "operator.log"
    request.node._kubeforge_logs = [str(log_path)]
    op = KubeforgeProcess(["operator", "--standalone", "-n", namespace, "-v"], cluster.kubeconfig, log_path).start()
    yield op
    op.stop()
