"""The chart's ValidatingAdmissionPolicy keeps the operator's ServiceAccount out of system
namespaces and the chart's own, on the real API server (issue 17, RBAC).

The session's release is installed in cluster mode: its ClusterRole lets the ServiceAccount
create Jobs, Deployments, Services and ConfigMaps in every namespace. The policy is what
refuses them in kube-system (and the other fenced namespaces), whatever RBAC says; the same
token still works in an ordinary namespace.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from support.chart import sa_kubeconfig
from support.waiting import wait_for

pytestmark = pytest.mark.cluster

SA = "kf-kubeforge"


def job(name: str) -> str:
    return yaml.safe_dump({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                           "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                          "containers": [{"name": "c", "image": "busybox:1"}]}}}})


def test_the_operator_token_is_refused_in_system_namespaces(cluster, chart_release, namespace, tmp_path):
    kubeconfig = sa_kubeconfig(cluster, chart_release, SA, tmp_path / "sa.kubeconfig")

    def as_operator(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(cluster.bin_dir / "kubectl"), *args], input=input, capture_output=True, text=True,
                              env={**os.environ, "KUBECONFIG": str(kubeconfig)}, timeout=60)

    # RBAC allows it (cluster mode): only the admission policy stands in the way.
    assert as_operator("auth", "can-i", "create", "jobs", "-n", "kube-system").stdout.strip() == "yes"

    def refused(ns: str) -> str:
        out = as_operator("create", "-n", ns, "-f", "-", input=job("intruder"))
        return out.stderr if out.returncode != 0 else ""

    # Policies take effect asynchronously after the install: wait for the first refusal.
    msg = wait_for(lambda: refused("kube-system"), 30, interval=0.5, what="the policy to refuse the operator")
    assert "the KubeForge operator (system:serviceaccount:" in msg and "may not create jobs in namespace kube-system" \
        in msg, msg
    assert "ValidatingAdmissionPolicy" in msg
    assert cluster.kubectl("get", "job", "intruder", "-n", "kube-system").returncode != 0
    for ns in ("kube-public", "kube-node-lease", chart_release):
        assert "may not create jobs in namespace " + ns in refused(ns), ns
    # Changing or deleting what is there is refused too: e.g. the operator's own Deployment.
    out = as_operator("patch", "deployment", "kf-kubeforge", "-n", chart_release, "--type=merge",
                      "-p", '{"spec": {"template": {"spec": {"containers": [{"name": "operator", "image": "evil:1"}]}}}}')
    assert out.returncode != 0 and "may not update deployments" in out.stderr, out.stderr
    out = as_operator("delete", "configmap", "kube-root-ca.crt", "-n", "kube-system")
    assert out.returncode != 0 and "may not delete configmaps" in out.stderr, out.stderr

    # The same token in an ordinary namespace: allowed (the operator's work).
    out = as_operator("create", "-n", namespace, "--dry-run=server", "-f", "-", input=job("legit"))
    assert out.returncode == 0, out.stderr
    # An administrator is not affected.
    out = cluster.kubectl("create", "-n", "kube-system", "--dry-run=server", "-f", "-", input=job("admin"))
    assert out.returncode == 0, out.stderr
