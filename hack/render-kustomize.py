#!/usr/bin/env python3
"""Sync the chart's CRDs from crds/, then render the Kustomize base and webhook component.

Run it after regenerating crds/ (``python -m kubeforge.api.crd --write crds/``) or changing
the chart. First the generated CRDs are copied into ``charts/kubeforge/crds/`` (next to kopf's
peering CRDs, which only the chart has); then users without Helm get the same manifests the
chart renders with its defaults:

  deploy/kustomize/base/                 CRDs, RBAC (cluster-wide), the operator (2 replicas,
                                         peering), metrics Service; no webhook
  deploy/kustomize/components/webhook/   the admission webhook with a cert-manager
                                         certificate (a Kustomize Component)

The chart stays the single source; tests/unit/test_chart.py and tests/unit/test_kustomize.py
fail when the checked-in copies differ from crds/ or from a fresh render. Helm-only labels are dropped
(``helm.sh/chart``; ``app.kubernetes.io/managed-by`` says kustomize). Needs the helm binary:
``hack/render-kustomize.py [--helm PATH] [--out deploy/kustomize]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubeforge"
NAMESPACE = "kubeforge"
RELEASE = "kubeforge"
HEADER = "# Generated from charts/kubeforge by hack/render-kustomize.py. Do not edit.\n"


def helm_template(helm: str, *values: str) -> list[dict[str, Any]]:
    args = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.35.4"]
    for v in values:
        args += ["--set", v]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        labels = d["metadata"].get("labels", {})
        labels.pop("helm.sh/chart", None)
        if "app.kubernetes.io/managed-by" in labels:
            labels["app.kubernetes.io/managed-by"] = "kustomize"
    return docs


def key(d: dict[str, Any]) -> tuple[str, str]:
    return d["kind"], d["metadata"]["name"]


def dump(docs: list[dict[str, Any]]) -> str:
    return HEADER + yaml.safe_dump_all(docs, sort_keys=False)


def sync_chart_crds() -> None:
    for src in sorted((REPO / "crds").glob("*.yaml")):
        dst = CHART / "crds" / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
            print(f"updated {dst.relative_to(REPO)}", file=sys.stderr)


def render(helm: str, out: Path) -> None:
    base_docs = helm_template(helm, "webhook.enabled=false")
    hook_docs = helm_template(helm, "webhook.enabled=true", "webhook.certManager.enabled=true")

    base = out / "base"
    if base.exists():
        shutil.rmtree(base)
    (base / "crds").mkdir(parents=True)
    crds = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    for name in crds:
        shutil.copyfile(CHART / "crds" / name, base / "crds" / name)
    (base / "namespace.yaml").write_text(dump([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "kubeforge",
                                      "pod-security.kubernetes.io/enforce": "restricted"}}}]))
    (base / "operator.yaml").write_text(dump(base_docs))
    (base / "kustomization.yaml").write_text(HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": ["namespace.yaml", *[f"crds/{n}" for n in crds], "operator.yaml"],
    }, sort_keys=False))

    comp = out / "components" / "webhook"
    if comp.exists():
        shutil.rmtree(comp)
    comp.mkdir(parents=True)
    base_keys = {key(d) for d in base_docs}
    extra = [d for d in hook_docs if key(d) not in base_keys]
    (comp / "webhook.yaml").write_text(dump(extra))
    (hook_dep,) = [d for d in hook_docs if d["kind"] == "Deployment"]
    (container,) = hook_dep["spec"]["template"]["spec"]["containers"]
    webhook_args = [a for a in container["args"] if a.startswith("--webhook")]
    webhook_port = [p for p in container["ports"] if p["name"] == "webhook"]
    webhook_mount = [m for m in container["volumeMounts"] if m["name"] == "webhook-cert"]
    webhook_volume = [v for v in hook_dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "webhook-cert"]
    ops = ([{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": a} for a in webhook_args]
           + [{"op": "add", "path": "/spec/template/spec/containers/0/ports/-", "value": p} for p in webhook_port]
           + [{"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": m} for m in webhook_mount]
           + [{"op": "add", "path": "/spec/template/spec/volumes/-", "value": v} for v in webhook_volume])
    (comp / "deployment-patch.yaml").write_text(HEADER + yaml.safe_dump(ops, sort_keys=False))
    (comp / "kustomization.yaml").write_text(HEADER + yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
        "resources": ["webhook.yaml"],
        "patches": [{"path": "deployment-patch.yaml",
                     "target": {"kind": "Deployment", "name": hook_dep["metadata"]["name"]}}],
    }, sort_keys=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--helm", default=os.environ.get("HELM", str(Path.home() / ".cache/kubeforge/bin/helm")))
    parser.add_argument("--out", type=Path, default=REPO / "deploy" / "kustomize")
    parser.add_argument("--no-sync", action="store_true", help="do not copy crds/ into the chart first")
    args = parser.parse_args()
    if not args.no_sync:
        sync_chart_crds()
    render(args.helm, args.out)
    print(f"rendered {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
