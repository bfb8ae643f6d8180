"""Pieces every workload builder shares: names, labels, ownership, the hardened pod.

Every pod KubeForge creates:

* runs as a non-root user with a read-only root filesystem, no privilege escalation, all
  capabilities dropped and the RuntimeDefault seccomp profile, so it passes the
  "restricted" Pod Security Standard;
* gets no Kubernetes API token (``automountServiceAccountToken: false``): workloads never
  talk to the API; the operator learns what it needs from metrics endpoints and
  termination messages;
* has resource requests equal to limits for what the spec names (GPUs are limits only, as
  the device plugin requires), writable scratch space in an emptyDir at ``/workspace`` with a
  ``sizeLimit`` (``resources.workspaceSize``, else the operator's default: a pod cannot fill
  its node's disk), and the rendered config mounted read-only at ``/etc/kubeforge``;
* carries the standard ``app.kubernetes.io`` labels plus ``kubeforge.io/<kind>: <name>``.

The user's ``template`` overrides are merged last; secrets only ever arrive by reference.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubeforge_runtime import contract

from ..api.base import API_VERSION, GROUP, PodTemplateOverride, ResourcesSpec, StorageSpec

MANAGED_BY = "kubeforge"
DEFAULT_IMAGE = "kubeforge/runtime:0.1.0"  # set the real location with KUBEFORGE_RUNTIME_IMAGE / the chart
IMAGE_ENV = "KUBEFORGE_RUNTIME_IMAGE"
RUN_AS_USER = 1000
CONFIG_VOLUME = "kubeforge-config"
WORKSPACE_VOLUME = "workspace"
SHM_VOLUME = "dshm"
WORKSPACE_SIZE_ENV = "KUBEFORGE_WORKSPACE_SIZE"
DEFAULT_WORKSPACE_SIZE = "64Gi"
SHM_SIZE_ENV = "KUBEFORGE_SHARED_MEMORY_SIZE"
DEFAULT_SHM_SIZE = "8Gi"


def runtime_image(template: PodTemplateOverride) -> str:
    """The template's image, else the operator's configured runtime image."""
    return template.image or os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)


def workspace_size(res: ResourcesSpec | None) -> str:
    """The /workspace emptyDir's sizeLimit: the spec's, else the operator's default (the chart's)."""
    return (res.workspace_size if res else None) or os.environ.get(WORKSPACE_SIZE_ENV) or DEFAULT_WORKSPACE_SIZE


def shared_memory_volume(res: ResourcesSpec | None) -> dict[str, Any]:
    """A memory-backed /dev/shm volume with a sizeLimit (the spec's, else the operator's default).

    Without a limit a pod's shared memory could grow to the node's memory before anything
    noticed; with one, the kubelet evicts the pod that writes past it.
    """
    size = (res.shared_memory_size if res else None) or os.environ.get(SHM_SIZE_ENV) or DEFAULT_SHM_SIZE
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}}


def owner_label(kind: str) -> str:
    """The label naming a child's owner of ``kind``: ``kubeforge.io/<kind, lower case>``."""
    return f"{GROUP}/{kind.lower()}"


def labels(kind: str, name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubeforge",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        owner_label(kind): name,
    }


def selector_labels(kind: str, name: str) -> dict[str, str]:
    """The subset of labels that is stable for the life of the resource (selectors)."""
    return {"app.kubernetes.io/instance": name, owner_label(kind): name}


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(name: str, namespace: str, owner: dict[str, Any], lbls: dict[str, str],
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": lbls, "ownerReferences": [owner]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def config_map(name: str, namespace: str, owner: dict[str, Any], lbls: dict[str, str],
               config: dict[str, Any]) -> dict[str, Any]:
    """The rendered runtime config, as ``config.json`` (see trainer_image/CONTRACT.md)."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(name, namespace, owner, lbls),
        "data": {contract.CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n"},
    }


def container_resources(res: ResourcesSpec) -> dict[str, Any]:
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value is not None:
            limits[key] = requests[key] = str(value)
    if res.gpus:
        limits["nvidia.com/gpu"] = str(res.gpus)
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def base_env(kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
    return [
        {"name": contract.ENV_JOB_NAME, "value": name},
        {"name": contract.ENV_NAMESPACE, "value": namespace},
        {"name": "HOME", "value": contract.WORKSPACE_DIR},
        {"name": "HF_HOME", "value": f"{contract.WORKSPACE_DIR}/hf"},
        {"name": "TRITON_CACHE_DIR", "value": f"{contract.WORKSPACE_DIR}/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def storage_env(storage: StorageSpec | None) -> list[dict[str, Any]]:
    """The environment ``spec.storage.s3`` gives a workload container: the credentials from the
    Secret by reference (``secretKeyRef``; the session token optional), the endpoint and region
    as values. boto3 in the runtime reads exactly these (``contract.S3_ENV``)."""
    if storage is None or storage.s3 is None:
        return []
    s3 = storage.s3
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret_ref.name, "key": key,
                                                     **({"optional": True} if key == "AWS_SESSION_TOKEN" else {})}}}
        for key in contract.S3_CREDENTIAL_ENV
    ]
    if s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    if s3.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    return env


def workload_pod_spec(
    *,
    container: dict[str, Any],
    config_map_name: str,
    template: PodTemplateOverride,
    restart_policy: str,
    extra_volumes: list[dict[str, Any]] | None = None,
    termination_grace_period_seconds: int | None = None,
    resources: ResourcesSpec | None = None,
) -> dict[str, Any]:
    """A hardened pod spec around ``container`` with the config and workspace volumes mounted
    (the workspace sized by ``resources.workspaceSize``, else the operator's default)."""
    c = dict(container)
    c["image"] = runtime_image(template)
    if template.image_pull_policy:
        c["imagePullPolicy"] = template.image_pull_policy
    c["securityContext"] = container_security_context()
    c["env"] = list(c.get("env", [])) + [e.to_api() for e in template.env]
    c["volumeMounts"] = [
        {"name": CONFIG_VOLUME, "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": WORKSPACE_VOLUME, "mountPath": contract.WORKSPACE_DIR},
        *c.get("volumeMounts", []),
        *template.volume_mounts,
    ]
    spec: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [c],
        "volumes": [
            {"name": CONFIG_VOLUME, "configMap": {"name": config_map_name}},
            {"name": WORKSPACE_VOLUME, "emptyDir": {"sizeLimit": workspace_size(resources)}},
            *(extra_volumes or []),
            *template.volumes,
        ],
    }
    if termination_grace_period_seconds is not None:
        spec["terminationGracePeriodSeconds"] = termination_grace_period_seconds
    if template.node_selector:
        spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        spec["tolerations"] = list(template.tolerations)
    if template.affinity:
        spec["affinity"] = template.affinity
    if template.priority_class_name:
        spec["priorityClassName"] = template.priority_class_name
    if template.scheduler_name:
        spec["schedulerName"] = template.scheduler_name
    if template.service_account_name:
        spec["serviceAccountName"] = template.service_account_name
    return spec


def pod_template_metadata(lbls: dict[str, str], template: PodTemplateOverride,
                          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {**template.labels, **lbls}}
    ann = {**template.annotations, **(annotations or {})}
    if ann:
        meta["annotations"] = ann
    return meta


def pvc_volumes(uris: list[str | None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts for every distinct pvc:// claim among ``uris``.

    A claim ``c`` is mounted at ``$KUBEFORGE_PVC_ROOT/c`` (``/mnt/pvc/c``), which is where the
    runtime's storage module looks for ``pvc://c/...``.
    """
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri[len("pvc://"):].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    volumes = [{"name": f"pvc-{c}"[:63], "persistentVolumeClaim": {"claimName": c}} for c in claims]
    mounts = [{"name": f"pvc-{c}"[:63], "mountPath": f"{contract.DEFAULT_PVC_ROOT}/{c}"} for c in claims]
    return volumes, mounts
