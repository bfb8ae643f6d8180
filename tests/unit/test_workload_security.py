"""Workload pods: the "restricted" Pod Security Standard, no API token, limits, secrets by reference.

The PSS check here implements the restricted profile's controls (Kubernetes "Pod Security
Standards", restricted, latest) over a pod spec, so a builder change that weakens the pod
fails without a cluster; tests/cluster/test_chart_pod_security.py has the API server's
PodSecurity admission judge the real pods. A non-compliant pod is checked first, so the
checker itself is shown to catch violations.
"""

from __future__ import annotations

import json
import re
import typing

import pytest

from kubeforge.api import FineTuneJobSpec, InferenceServiceSpec, QuantizeJobSpec
from kubeforge.api.base import KFModel, PodTemplateOverride, ResourcesSpec, SecretKeyRef, SecretRef
from kubeforge.builders import common, inference, quantize
from kubeforge_runtime import contract

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret", "image"}
# Whole words of a snake_case / SCREAMING_CASE name: HF_TOKEN, AWS_SECRET_ACCESS_KEY, api_key_secret_ref
# (but not max_batch_tokens or TOKENIZERS_PARALLELISM).
SECRET_NAMES = re.compile(r"(^|_)(token|password|passwd|secret|credentials?|api_?key|access_?key)($|_)", re.I)


def restricted_violations(pod: dict) -> list[str]:
    """Violations of the restricted Pod Security Standard (baseline controls included)."""
    v: list[str] = []
    psc = pod.get("securityContext", {})
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            v.append(f)
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            v.append(f"volume {vol['name']}: {kinds - ALLOWED_VOLUMES}")
    if psc.get("sysctls"):
        v.append("sysctls")
    containers = pod.get("containers", []) + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c.get("name")
        if sc.get("privileged"):
            v.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            v.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            v.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            v.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            v.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            v.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            v.append(f"{name}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            v.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            v.append(f"{name}: procMount")
    return v


def pods_of(children: list[dict]) -> list[dict]:
    return [c["spec"]["template"]["spec"] for c in children if c["kind"] in ("Job", "Deployment", "StatefulSet")]


def sample_children() -> dict[str, list[dict]]:
    res = {"cpu": "4", "memory": "16Gi", "gpus": 1}
    qspec = QuantizeJobSpec.model_validate({"model": {"uri": "pvc://models/base"}, "output": {"uri": "pvc://models/q"},
                                            "resources": res})
    ispec = InferenceServiceSpec.model_validate({"model": {"uri": "pvc://models/q"}, "resources": res,
                                                 "apiKeySecretRef": {"name": "serving-key", "key": "token"}})
    return {
        "QuantizeJob": quantize.build_children("q", "ml", "uid-1", qspec, "pvc://models/base"),
        "InferenceService": inference.build_children(
            "s", "ml", "uid-2", ispec, inference.ModelRef(uri="pvc://models/q", revision="r1")).to_apply(),
    }


def test_the_checker_catches_a_privileged_pod():
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}},
                           "ports": [{"containerPort": 80, "hostPort": 80}]}]}
    found = " ".join(restricted_violations(bad))
    for what in ("hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "drop ALL", "adds",
                 "runAsNonRoot", "seccompProfile", "hostPort"):
        assert what in found, what


def test_shared_workload_pod_is_restricted_tokenless_and_limited():
    volumes, mounts = common.pvc_volumes(["pvc://models/base", "pvc://data/x.jsonl", "s3://b/k"])
    pod = common.workload_pod_spec(
        container={"name": "w", "resources": common.container_resources(ResourcesSpec(cpu="2", memory="8Gi", gpus=2)),
                   "volumeMounts": mounts},
        config_map_name="cfg", template=PodTemplateOverride(), restart_policy="Never", extra_volumes=volumes)
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
    # A ServiceAccount chosen by the user (e.g. for cloud workload identity) still gets no token.
    pod = common.workload_pod_spec(container={"name": "w"}, config_map_name="cfg", restart_policy="Never",
                                   template=PodTemplateOverride(service_account_name="s3-reader"))
    assert pod["serviceAccountName"] == "s3-reader" and pod["automountServiceAccountToken"] is False


def test_runtime_image_comes_from_the_operator_setting(monkeypatch):
    monkeypatch.setenv(common.IMAGE_ENV, "mirror.example/kubeforge/runtime:9")
    pod = common.workload_pod_spec(container={"name": "w"}, config_map_name="cfg", template=PodTemplateOverride(),
                                   restart_policy="Never")
    assert pod["containers"][0]["image"] == "mirror.example/kubeforge/runtime:9"
    pod = common.workload_pod_spec(container={"name": "w"}, config_map_name="cfg", restart_policy="Never",
                                   template=PodTemplateOverride(image="custom/img:1"))
    assert pod["containers"][0]["image"] == "custom/img:1"
    monkeypatch.delenv(common.IMAGE_ENV)
    assert "/" in common.DEFAULT_IMAGE and "." not in common.DEFAULT_IMAGE.split("/")[0]  # no registry host


@pytest.mark.parametrize("kind", ["QuantizeJob", "InferenceService"])
def test_builders_pods_are_restricted_tokenless_and_limited(kind):
    children = sample_children()[kind]
    pods = pods_of(children)
    assert pods, f"no workload among {kind}'s children"
    for pod in pods:
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["resources"]["limits"]["memory"] == "16Gi" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_secrets_arrive_by_reference_only():
    children = sample_children()
    assert not [c for cs in children.values() for c in cs if c["kind"] == "Secret"], "builders never create Secrets"
    (deployment,) = [c for c in children["InferenceService"] if c["kind"] == "Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    (key,) = [e for e in env if e["name"] == contract.ENV_API_KEY]
    assert key == {"name": contract.ENV_API_KEY,
                   "valueFrom": {"secretKeyRef": {"name": "serving-key", "key": "token"}}}
    for cs in children.values():
        for child in cs:
            assert "serving-key" not in json.dumps(child) or child["kind"] == "Deployment"  # no copy in config
            for pod in pods_of([child]):
                for c in pod["containers"]:
                    for e in c.get("env", []):
                        assert not (SECRET_NAMES.search(e["name"]) and "value" in e), e


def _models(model: type[KFModel], seen=None):
    seen = seen if seen is not None else set()
    if model in seen:
        return
    seen.add(model)
    yield model
    for field in model.model_fields.values():
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, KFModel):
                    yield from _models(inner, seen)


@pytest.mark.parametrize("spec", [FineTuneJobSpec, QuantizeJobSpec, InferenceServiceSpec], ids=lambda s: s.__name__)
def test_api_has_no_field_for_a_secret_value(spec):
    """Any field named like a secret is a reference to a Secret, never the value itself."""
    for model in _models(spec):
        for name, field in model.model_fields.items():
            if SECRET_NAMES.search(name):
                types = {field.annotation, *typing.get_args(field.annotation)}
                assert types & {SecretKeyRef, SecretRef}, f"{model.__name__}.{name} must be a SecretKeyRef or SecretRef"


def test_the_data_gate_pod_is_restricted_tokenless_and_bounded():
    """The FineTuneJob's data gate (spec.dataset.checks) is a workload pod like the others."""
    from kubeforge.builders import finetune

    spec = FineTuneJobSpec.model_validate({"model": {"uri": "pvc://models/base"},
                                           "dataset": {"uri": "pvc://data/t.jsonl", "checks": {"minRecords": 10}},
                                           "output": {"uri": "pvc://models/out"}, "resources": {"gpus": 8}})
    pod = finetune.datacheck_job("ft", "ml", "uid-3", spec)["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["limits"] == {"memory": "2Gi"} and "nvidia.com/gpu" not in c["resources"]["requests"]
