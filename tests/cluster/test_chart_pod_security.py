"""Every pod KubeForge creates passes the "restricted" Pod Security Standard.

The namespace enforces ``restricted`` through the API server's built-in PodSecurity
admission; a pod that violates it is rejected at creation (a Job or ReplicaSet then records
FailedCreate and has no pods). A bare non-compliant pod is rejected first, which proves the
enforcement is on; then the operator, running as the chart's ServiceAccount, reconciles the
three kinds there and the pods of their Jobs and Deployments must come into existence.
"""

from __future__ import annotations

import json

import pytest
import yaml

from kubeforge.api.base import PodTemplateOverride, ResourcesSpec
from kubeforge.builders import common
from support.chart import accepted, children, controller_creates_children, rbac_denials, three_kinds
from support.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def restricted(cluster, namespace):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest", check=True)
    return namespace


def pods_of(cluster, namespace: str, selector: str) -> list[dict]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json", check=True)
    return json.loads(out.stdout)["items"]


def pod_security_rejections(cluster, namespace: str) -> list[str]:
    out = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate", "-o", "json",
                          check=True)
    return [e["message"] for e in json.loads(out.stdout)["items"] if "PodSecurity" in e["message"]]


def test_enforcement_is_on(cluster, restricted):
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-pod"},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    out = cluster.kubectl("apply", "-n", restricted, "-f", "-", input=yaml.safe_dump(bad))
    assert out.returncode != 0 and 'violates PodSecurity "restricted' in out.stderr, out.stderr


def test_the_shared_workload_pod_is_admitted(cluster, restricted):
    """The pod every builder wraps its container in (builders/common.py), as a Job."""
    template = PodTemplateOverride()
    spec = common.workload_pod_spec(
        container={"name": "worker", "command": ["python", "-m", "kubeforge_runtime.train"],
                   "resources": common.container_resources(ResourcesSpec(cpu="1", memory="1Gi"))},
        config_map_name="cfg", template=template, restart_policy="Never",
        extra_volumes=[{"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}}])
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "shared-pod", "labels": {"t": "shared"}},
           "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"t": "shared"}}, "spec": spec}}}
    cluster.kubectl("apply", "-n", restricted, "-f", "-", input=yaml.safe_dump(job), check=True)
    wait_for(lambda: pods_of(cluster, restricted, "t=shared"), 60, what="the Job's pod")
    assert pod_security_rejections(cluster, restricted) == []


def test_operator_created_pods_pass_restricted(cluster, restricted, chart_operator):
    op = chart_operator("pss-operator")
    objs = three_kinds("-pss")
    cluster.kubectl("apply", "-n", restricted, "-f", "-", input=yaml.safe_dump_all(objs), check=True)
    checked = 0
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        wait_for(lambda: accepted(cluster, restricted, kind, name), 60, what=f"{kind} {name} accepted")
        if not controller_creates_children(kind):
            continue
        workloads = wait_for(lambda: children(cluster, restricted, kind, name, ("jobs.batch", "deployments.apps")),
                             60, what=f"{kind} {name}'s Job or Deployment")
        assert workloads
        pods = wait_for(lambda: pods_of(cluster, restricted, f"kubeforge.io/{kind.lower()}={name}"), 60,
                        what=f"pods of {kind} {name}")
        for pod in pods:
            spec = pod["spec"]
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"]:
                assert c["securityContext"]["runAsNonRoot"] is True
                # the spec's resources arrive as limits (three_kinds() names cpu and memory)
                assert c["resources"]["limits"]["memory"] == "1Gi", (kind, c["resources"])
        checked += 1
    assert checked, "no controller created any pods"
    assert pod_security_rejections(cluster, restricted) == []
    assert rbac_denials(op.log()) == []
