"""Thin access to the Kubernetes API: server-side apply and reads, for the operator and the SDK.

Children are applied with server-side apply under one field manager (``kubeforge``), with
``force`` so that the operator stays the owner of the fields it sets; applying the same
manifest twice is a no-op on the server (no new resourceVersion). Paths are computed from a
small table instead of API discovery: the operator only touches the kinds listed here (the
chart's RBAC test reads this table). The KubeForge kinds' paths come from :mod:`kubeforge.api`.

Called by the reconcilers (:mod:`kubeforge.controllers`) and by :mod:`kubeforge.sdk`; it
registers no kopf handler, so the SDK can use it without starting any operator machinery.
"""

from __future__ import annotations

import json
import os
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .api import API_VERSION, KINDS

log = logging.getLogger(__name__)

FIELD_MANAGER = "kubeforge"

# kind -> (api prefix, plural); every kind is namespaced.
_RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    **{k.kind: (f"/apis/{API_VERSION}", k.plural) for k in KINDS},
}

_api: client.ApiClient | None = None


def load_config() -> None:
    """In-cluster config when running in a pod, else the kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read $KUBECONFIG now: the client's own default is fixed when it is first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def api() -> client.ApiClient:
    global _api
    if _api is None:
        load_config()
        cfg = client.Configuration.get_default_copy()
        # Handlers run in kopf's thread pool and share this client: one connection per worker
        # instead of urllib3's default of 4 (which would open and drop connections under load):
        # kopf's 16 handler threads, the 8 sync threads, the 16 that send a wave of children and
        # the 8 that post Events.
        cfg.connection_pool_maxsize = 48
        _api = client.ApiClient(cfg)
    return _api


def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = _RESOURCES[kind]
    p = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        p += f"/{name}"
    if subresource:
        p += f"/{subresource}"
    return p


def _call(method: str, url: str, body: Any = None, query: list[tuple[str, Any]] | None = None,
          content_type: str = "application/json", timeout: float | None = None) -> dict[str, Any]:
    """One API request; the decoded JSON answer, or ApiException for a non-2xx status.

    ``body`` is a dict (or a JSON string, decoded here): the client (v32+) serialises bodies
    itself for JSON and YAML content types, so a pre-encoded string would be encoded twice.
    """
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    cl = api()
    method_, full_url, headers, body_, post = cl.param_serialize(
        method=method, resource_path=url, query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"],
    )
    resp = cl.call_api(method_, full_url, header_params=headers, body=body_, post_params=post,
                       _request_timeout=timeout)
    data = resp.read()
    if not 200 <= resp.status <= 299:
        raise ApiException(http_resp=resp)
    return json.loads(data) if data else {}


def server_side_apply(obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """Create or update ``obj`` by server-side apply with the operator's field manager.

    ``dry_run``: the API server validates and admits the object but stores nothing.
    """
    meta = obj["metadata"]
    url = path(obj["kind"], meta["namespace"], meta["name"])
    query = [("fieldManager", FIELD_MANAGER), ("force", "true")] + ([("dryRun", "All")] if dry_run else [])
    return _call("PATCH", url, body=obj, query=query, content_type="application/apply-patch+yaml")


def get(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return _call("GET", path(kind, namespace, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_(kind: str, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
    query = [("labelSelector", label_selector)] if label_selector else []
    return list(_call("GET", path(kind, namespace), query=query).get("items", []))


def delete(kind: str, namespace: str, name: str, propagation: str = "Background", uid: str | None = None) -> bool:
    """Delete ``kind``/``name``; False if it is not there.

    With ``uid`` only that very object is deleted (a precondition the API server checks): an
    object deleted and created again under the same name in the meantime has another UID and
    is left alone (False).
    """
    body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
    if uid is not None:
        body["preconditions"] = {"uid": uid}
    try:
        _call("DELETE", path(kind, namespace, name), body=body)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        if exc.status == 409 and uid is not None:
            log.info("%s %s/%s: not deleted, it is no longer the object with UID %s", kind, namespace, name, uid)
            return False
        raise


def patch_merge(kind: str, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
    return _call("PATCH", path(kind, namespace, name, subresource), body=patch,
                 content_type="application/merge-patch+json")


def create(kind: str, namespace: str, obj: dict[str, Any], name: str | None = None,
           subresource: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """POST ``obj`` (an Event, or to a subresource such as a Pod's ``eviction``).

    ``dry_run``: the API server validates and admits ``obj`` but stores nothing; like a real
    create it fails with 409 (AlreadyExists) when an object of that name exists, so one dry
    run answers both "is the name free?" and "would it be accepted?".
    """
    query = [("dryRun", "All")] if dry_run else []
    return _call("POST", path(kind, namespace, name, subresource), body=obj, query=query)
