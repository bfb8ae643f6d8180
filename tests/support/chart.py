"""Helm, kubectl and the chart, for the chart tests (unit: render only; cluster: install).

The binaries are the ones ``hack/build-control-plane.sh`` builds into the cache. That Helm
is built without version ldflags, so it believes the cluster is v1.20 when none is given:
renders pass ``--kube-version`` explicitly (the chart requires 1.30+).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeforge"
KUBE_VERSION = "1.35.4"
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
