"""Helpers for the FineTuneJob cluster tests: manifests, one operator per test module, pokes.

The tests play the parts the cluster cannot: a worker's container ending (the kwok
``kubeforge.io/test-exit-code`` annotation), a disruption (a real Eviction through the API),
the user (kubectl). Everything else is the real control plane and the real operator process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.cluster import LocalCluster, free_port
from support.operator import KubeforgeProcess
from support.waiting import get_json, wait_for

POLL_SECONDS = "0.5"


def ftj(name: str, gpus: int = 1, **spec_overrides: Any) -> dict[str, Any]:
    """A 2-node FineTuneJob with ``gpus`` per node (no pvc:// URIs: the test cluster has no
    storage). The cluster has 3 nodes of 8 GPUs, so tests that run several jobs at once
    keep to a GPU or two per worker."""
    spec: dict[str, Any] = {
        "model": {"uri": "hf://acme/tiny-llama@main"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://models/" + name},
        "nodes": {"min": 2, "max": 2},
        "resources": {"gpus": gpus},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


class Operator(KubeforgeProcess):
    """``python -m kubeforge operator`` for one namespace, with its metrics port."""

    def __init__(self, cluster: LocalCluster, namespace: str, log_path: Path) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.metrics_port = free_port()
        super().__init__(["operator", "--standalone", "-n", namespace, "-v", "--metrics-port", str(self.metrics_port)],
                         cluster.kubeconfig, log_path, env={"KUBEFORGE_FINETUNE_POLL_SECONDS": POLL_SECONDS})


@dataclass
class Env:
    cluster: LocalCluster
    namespace: str
    operator: Operator

    # --- user actions -------------------------------------------------------------------------
    def apply(self, obj: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(obj), check=True)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.cluster.kubectl("patch", "-n", self.namespace, "finetunejob", name, "--type=merge",
                             "-p", json.dumps({"spec": spec}), check=True)

    def delete(self, kind: str, name: str) -> None:
        self.cluster.kubectl("delete", "-n", self.namespace, kind, name, "--wait=false", check=True)

    # --- reading ----------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.cluster.kubectl("get", "-n", self.namespace, kind, name, "-o", "json")
        return json.loads(out.stdout) if out.returncode == 0 else None

    def status(self, name: str) -> dict[str, Any]:
        obj = self.get("finetunejob", name)
        return (obj or {}).get("status") or {}

    def pods(self, name: str, active_only: bool = True) -> list[dict[str, Any]]:
        """The worker pods (they carry a completion index; the data gate's pod does not), by index."""
        items = [p for p in self._all_pods(name, active_only)
                 if "batch.kubernetes.io/job-completion-index" in (p["metadata"].get("annotations") or {})]
        return sorted(items, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]))

    def gate_pods(self, name: str, active_only: bool = True) -> list[dict[str, Any]]:
        """The pods of the data gate Job ``<name>-datacheck``, oldest first."""
        items = [p for p in self._all_pods(name, active_only) if (p["metadata"].get("labels") or {}).get("job-name")
                 == f"{name}-datacheck"]
        return sorted(items, key=lambda p: p["metadata"]["creationTimestamp"])

    def _all_pods(self, name: str, active_only: bool) -> list[dict[str, Any]]:
        items = get_json(self.cluster, "-n", self.namespace, "pods", "-l", f"kubeforge.io/finetunejob={name}")["items"]
        if active_only:
            items = [p for p in items if p["status"].get("phase") in ("Pending", "Running")
                     and not p["metadata"].get("deletionTimestamp")]
        return items

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def events(self, name: str) -> list[dict[str, Any]]:
        items = get_json(self.cluster, "-n", self.namespace, "events", "--field-selector",
                         f"involvedObject.name={name},involvedObject.kind=FineTuneJob")["items"]
        return sorted(items, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"].get("creationTimestamp", "")))

    def event_reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.events(name)]

    # --- waiting -----------------------------------------------------------------------------------
    def wait_phase(self, name: str, phase: str, timeout: float = 60, **expect: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status(name)
            if st.get("phase") != phase:
                return None
            for key, value in expect.items():
                if key == "ready" and (st.get("workers") or {}).get("ready") != value:
                    return None
            return st
        return wait_for(check, timeout, interval=0.3, what=f"{name} phase {phase} {expect or ''}")

    def wait_running(self, name: str, workers: int = 2, timeout: float = 60) -> dict[str, Any]:
        return self.wait_phase(name, "Running", timeout, ready=workers)

    # --- playing the node ---------------------------------------------------------------------------
    def exit_pod(self, pod: dict[str, Any] | str, code: int, message: str | None = None) -> None:
        """The worker's container ends with ``code`` (kwok plays the kubelet)."""
        name = pod if isinstance(pod, str) else pod["metadata"]["name"]
        ann = {"kubeforge.io/test-exit-code": str(code)}
        if message:
            ann["kubeforge.io/test-termination-message"] = message
        self.cluster.kubectl("annotate", "-n", self.namespace, "pod", name,
                             *[f"{k}={v}" for k, v in ann.items()], check=True)

    def evict(self, pod: dict[str, Any]) -> None:
        """A disruption, the way a node drain does it: the Eviction API."""
        name = pod["metadata"]["name"]
        body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                           "metadata": {"name": name, "namespace": self.namespace}})
        self.cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{self.namespace}/pods/{name}/eviction",
                             "-f", "-", input=body, check=True)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.operator.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


def make_env(cluster: LocalCluster, log_dir: Path) -> Iterator[Env]:
    """A namespace and an operator watching it; cleaned up after."""
    ns = f"ft-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns, check=True)
    wait_for(lambda: cluster.kubectl("get", "-n", ns, "serviceaccount", "default").returncode == 0, 30,
             what="default ServiceAccount")
    op = Operator(cluster, ns, log_dir / "operator.log").start()
    try:
        yield Env(cluster, ns, op)
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false")


def wait_metrics_up(env: Env, timeout: float = 30) -> None:
    wait_for(lambda: "kubeforge_jobs" in env.metrics(), timeout, what="operator metrics endpoint")


def now() -> float:
    return time.monotonic()
