"""Helm, kubectl and the chart, for the chart tests (unit: render only; cluster: install).

The binaries are the ones ``hack/build-control-plane.sh`` builds into the cache. That Helm
is built without version ldflags, so it believes the cluster is v1.20 when none is given:
renders pass ``--kube-version`` explicitly (the chart requires 1.30+).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.operator import KubeforgeProcess

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeforge"
KUBE_VERSION = "1.35.4"
PEERING_LIFETIME = 10  # seconds, for the test release; short so that the takeover test stays quick
BIN = Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge")) / "bin"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} not built: run hack/build-control-plane.sh")
    return str(path)


def helm(*args: str, check: bool = True, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([tool("helm"), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def set_args(values: dict[str, str] | None) -> list[str]:
    return [a for k, v in (values or {}).items() for a in ("--set", f"{k}={v}")]


def render(values: dict[str, str] | None = None, *, release: str = "kf", namespace: str = "kubeforge",
           include_crds: bool = False, extra: list[str] | None = None) -> list[dict[str, Any]]:
    """``helm template`` of the chart, parsed; ``values`` are --set pairs."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION,
            *set_args(values), *(extra or [])]
    if include_crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


# --- against the test cluster -----------------------------------------------------------

def sa_kubeconfig(cluster: Any, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig holding only a token of ``service_account``: nothing more than its RBAC."""
    from support.cluster import kubeconfig

    token = cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration=2h",
                            check=True).stdout.strip()
    path.write_text(yaml.safe_dump(kubeconfig(cluster.server, cluster.pki / "ca.crt", token=token,
                                              user=f"system:serviceaccount:{namespace}:{service_account}")))
    return path


def deployment_command(cluster: Any, namespace: str, name: str) -> tuple[list[str], dict[str, str]]:
    """The installed operator Deployment's args and literal env, as the chart rendered them."""
    dep = yaml.safe_load(cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "yaml", check=True).stdout)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return list(container["args"]), env


OperatorAs = KubeforgeProcess
"""The chart's operator as a local process with the chart ServiceAccount's kubeconfig."""


def local_args(args: list[str], free_port: Any) -> list[str]:
    """The chart's operator args with its ports moved to free local ports (several processes
    share this machine's network, unlike pods)."""
    out = []
    for a in args:
        for flag in ("--liveness-port=", "--metrics-port="):
            if a.startswith(flag):
                a = f"{flag}{free_port()}"
        out.append(a)
    return out


FINETUNE = {"model": {"uri": "hf://acme/tiny@main"}, "dataset": {"uri": "pvc://data/train.jsonl"},
            "output": {"uri": "pvc://models/ft"}}


def resource(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "kubeforge.io/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def three_kinds(suffix: str = "") -> list[dict[str, Any]]:
    """One of each kind, each independent of the others (no references to wait on)."""
    res = {"cpu": "1", "memory": "1Gi"}
    return [
        resource("FineTuneJob", f"ft{suffix}", {**FINETUNE, "output": {"uri": f"pvc://models/ft{suffix}"},
                                                 "resources": res}),
        resource("QuantizeJob", f"qj{suffix}", {"model": {"uri": "pvc://models/base"},
                                                 "output": {"uri": f"pvc://models/q{suffix}"}, "resources": res}),
        resource("InferenceService", f"is{suffix}", {"model": {"uri": "pvc://models/base"}, "resources": res}),
    ]


def accepted(cluster: Any, namespace: str, kind: str, name: str) -> bool:
    out = cluster.kubectl("get", kind.lower(), name, "-n", namespace, "-o", "json")
    if out.returncode != 0:
        return False
    import json

    obj = json.loads(out.stdout)
    status = obj.get("status", {})
    cond = next((c for c in status.get("conditions", []) if c["type"] == "Accepted"), None)
    return bool(cond and cond["status"] == "True" and status.get("observedGeneration") == obj["metadata"]["generation"])


CHILD_KINDS = ("jobs.batch", "deployments.apps", "services", "configmaps",
               "horizontalpodautoscalers.autoscaling", "poddisruptionbudgets.policy")


def children(cluster: Any, namespace: str, kind: str, name: str, kinds: tuple[str, ...] = CHILD_KINDS) -> list[str]:
    """Objects labelled as children of ``kind``/``name`` (``kubeforge.io/<kind>: <name>``)."""
    out = cluster.kubectl("get", ",".join(kinds), "-n", namespace, "-l", f"kubeforge.io/{kind.lower()}={name}",
                          "-o", "name", check=True)
    return out.stdout.split()


def controller_creates_children(kind: str) -> bool:
    """Whether this kind's reconciler applies children yet (read from its source)."""
    module = {"FineTuneJob": "finetune", "QuantizeJob": "quantize", "InferenceService": "inference"}[kind]
    source = (REPO / "operator" / "kubeforge" / "controllers" / f"{module}.py").read_text()
    # Children go through reconcile.apply_children (imported as is, or under another name).
    return "server_side_apply" in source or "apply_children" in source


# How the API server words an RBAC denial. Other 403s (e.g. "unable to create new content in
# namespace X because it is being terminated", from reconciling another test's leftovers in a
# namespace being deleted) are not permission problems.
RBAC_DENIED = re.compile(r'User \\?"system:serviceaccount:[^"\\]+\\?" cannot [a-z]+ resource')


def rbac_denials(log: str) -> list[str]:
    return [line for line in log.splitlines() if RBAC_DENIED.search(line)]
