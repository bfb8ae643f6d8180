"""The platform's workload policy: which ``spec.template`` pass-throughs a cluster allows.

``spec.template`` (:class:`kubeforge.api.base.PodTemplateOverride`) is merged into every
workload pod. What is wrong everywhere is refused by the API model itself (and, as CEL, by
the CRDs): reserved and interpreter/loader environment variables, AppArmor/seccomp
annotations, a projected ServiceAccount token. What a platform team may reasonably widen
lives here, as a :class:`WorkloadPolicy`:

* **volume types** (:data:`DEFAULT_ALLOWED_VOLUME_TYPES` unless widened): a ``hostPath``,
  ``nfs`` or ``iscsi`` volume reaches past the pod's own storage; an ``emptyDir`` must carry
  a ``sizeLimit`` (without one a pod can fill its node's disk or memory);
* **image** (off by default): a resource naming its own image runs code the platform never
  vetted under the runtime's name;
* **serviceAccountName** (off by default): the token is never mounted, but the account still
  decides image pull secrets and what workload identity (cloud IAM bindings) the pod gets.

Who applies it: the validating webhook (:mod:`kubeforge.controllers.webhooks`) at admission,
and the operator's reconcile loop (:mod:`kubeforge.controllers.reconcile`) for clusters
without the webhook, as ``Accepted=False/InvalidSpec`` before any child exists. Both read
the policy from the operator's environment (:func:`kubeforge.controllers.settings.workload_policy`),
which the Helm chart fills from its ``workloadPolicy`` values. :func:`problems` is pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import projected_token_message, projected_token_volumes

DEFAULT_ALLOWED_VOLUME_TYPES: tuple[str, ...] = (
    "persistentVolumeClaim", "configMap", "secret", "emptyDir", "downwardAPI", "ephemeral", "projected",
)
"""Volume sources that stay inside what the pod's namespace already grants: its claims, config
maps and secrets, scratch space, its own metadata. (``projected`` only without a
serviceAccountToken source, which the API model refuses anyway.)"""

CHART_VALUES = {
    "volumes": "workloadPolicy.allowedVolumeTypes",
    "image": "workloadPolicy.allowImageOverride",
    "serviceAccountName": "workloadPolicy.allowServiceAccount",
}
"""The chart value that widens each rule (named in every refusal)."""


@dataclass(frozen=True)
class WorkloadPolicy:
    """What ``spec.template`` may pass through to workload pods on this cluster."""

    allowed_volume_types: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_ALLOWED_VOLUME_TYPES))
    allow_image_override: bool = False
    allow_service_account: bool = False


def volume_type(volume: dict[str, Any]) -> str | None:
    """The one volume source a Volume sets (its key other than ``name``), or None if not exactly one."""
    sources = [k for k in volume if k != "name"]
    return sources[0] if len(sources) == 1 else None


def _volume_problems(volumes: list[dict[str, Any]], policy: WorkloadPolicy) -> list[str]:
    allowed = ", ".join(sorted(policy.allowed_volume_types)) or "none"
    out = []
    for i, v in enumerate(volumes):
        name = str(v.get("name", "?"))
        where = f"spec.template.volumes[{i}] ({name})"
        kind = volume_type(v)
        if kind is None:
            out.append(f"{where}: a volume sets exactly one source (e.g. persistentVolumeClaim); "
                       f"found {', '.join(k for k in v if k != 'name') or 'none'}")
        elif kind not in policy.allowed_volume_types:
            out.append(f"{where}: {kind} volumes are not allowed by this cluster's workload policy (allowed: "
                       f"{allowed}); use a persistentVolumeClaim, or ask the platform team to add {kind} to the "
                       f"chart value {CHART_VALUES['volumes']}")
        elif kind == "emptyDir" and not (v.get("emptyDir") or {}).get("sizeLimit"):
            out.append(f"{where}: an emptyDir needs a sizeLimit (e.g. sizeLimit: 10Gi), so that the pod cannot "
                       f"fill its node's disk or memory")
        elif projected_token_volumes([v]):
            out.append("spec." + projected_token_message(i, name))
    return out


def problems(template: dict[str, Any] | None, policy: WorkloadPolicy) -> list[str]:
    """Every way ``template`` (a spec's ``template``, camelCase as on the wire) breaks ``policy``.

    Each message names the field and says what to change; empty when the template is allowed.
    """
    template = template or {}
    out = _volume_problems(list(template.get("volumes") or []), policy)
    if template.get("image") and not policy.allow_image_override:
        out.append(f"spec.template.image: this cluster runs workloads only in the platform's runtime image; remove "
                   f"image, or ask the platform team to set the chart value {CHART_VALUES['image']}=true")
    if template.get("serviceAccountName") and not policy.allow_service_account:
        out.append(f"spec.template.serviceAccountName: this cluster does not let workloads choose their "
                   f"ServiceAccount; remove serviceAccountName, or ask the platform team to set the chart value "
                   f"{CHART_VALUES['serviceAccountName']}=true")
    return out


def parse_bool(value: str | None, default: bool) -> bool:
    """``true``/``false`` (and 1/0, yes/no) from an environment variable; ``default`` when unset or empty."""
    if value is None or not value.strip():
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def from_env(env: dict[str, str]) -> WorkloadPolicy:
    """The policy the operator's environment describes (unset variables keep the defaults)."""
    types = env.get(ENV_ALLOWED_VOLUME_TYPES)
    allowed = (frozenset(t.strip() for t in types.split(",") if t.strip()) if types is not None
               else frozenset(DEFAULT_ALLOWED_VOLUME_TYPES))
    return WorkloadPolicy(
        allowed_volume_types=allowed,
        allow_image_override=parse_bool(env.get(ENV_ALLOW_IMAGE_OVERRIDE), False),
        allow_service_account=parse_bool(env.get(ENV_ALLOW_SERVICE_ACCOUNT), False),
    )


ENV_ALLOWED_VOLUME_TYPES = "KUBEFORGE_ALLOWED_VOLUME_TYPES"
"""Comma-separated volume source names (``persistentVolumeClaim,configMap,...``); empty allows none."""
ENV_ALLOW_IMAGE_OVERRIDE = "KUBEFORGE_ALLOW_IMAGE_OVERRIDE"
ENV_ALLOW_SERVICE_ACCOUNT = "KUBEFORGE_ALLOW_SERVICE_ACCOUNT"
