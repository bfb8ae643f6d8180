"""Shared building blocks of the KubeForge API models.

Conventions every model here follows (and ``crd.py`` relies on):

* camelCase on the wire (``alias_generator``), snake_case in Python;
* ``extra="forbid"``: an unknown field is an error, never silently dropped;
* a description on every field (``kubectl explain`` shows it; a test checks none is missing);
* cross-field rules as CEL (``x-kubernetes-validations``) in ``json_schema_extra``, so the
  API server enforces them itself; :func:`cel` builds one rule.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from pydantic.alias_generators import to_camel

from kubeforge_runtime import contract
from .size import ANNOTATION_VALUE_MAX, ENV_VALUE_MAX, MAP_ENTRIES_MAX

GROUP = "kubeforge.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubeforge"


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None,
        message_expression: str | None = None) -> dict[str, str]:
    """One CEL validation rule for ``x-kubernetes-validations``.

    ``message_expression`` (CEL yielding a string) lets the message name the offending value;
    ``message`` is what the API server says if that expression fails.
    """
    out = {"rule": rule, "message": message}
    if message_expression:
        out["messageExpression"] = message_expression
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def cel_list(values: tuple[str, ...] | list[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


class KFModel(BaseModel):
    """Base of every API model: camelCase aliases, unknown fields forbidden."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The camelCase dict as it appears in a manifest, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# A Kubernetes resource quantity ("500m", "4Gi", 2): int-or-string, kept as a string.
_QUANTITY_RE = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _quantity_to_str(v: Any) -> str:
    s = str(v)
    if not re.match(_QUANTITY_RE, s):
        raise ValueError(f"{s!r} is not a Kubernetes quantity (examples: 500m, 2, 4Gi)")
    return s


Quantity = Annotated[
    str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": _QUANTITY_RE}),
]

# A Kubernetes object passed through unchanged (affinity, a volume, a toleration, ...).
K8sObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class ObjectReference(KFModel):
    """A reference to another KubeForge resource in the same namespace."""

    name: Name = Field(description="Name of the referenced resource, in the same namespace.")


class SecretKeyRef(KFModel):
    """A key in a Secret in the same namespace; secrets are only ever passed by reference."""

    name: Name = Field(description="Name of the Secret.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class SecretRef(KFModel):
    """A whole Secret in the same namespace, by name (its keys are read into the pods by
    ``secretKeyRef``); secrets are only ever passed by reference."""

    name: Name = Field(description="Name of the Secret.")


class S3Storage(KFModel):
    """How the pods reach ``s3://`` URIs (models, data, outputs, checkpoints). Credentials come
    from a Secret, by reference only; nothing secret is ever written in a spec."""

    credentials_secret_ref: SecretRef = Field(
        description="A Secret in the same namespace with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                    "optionally AWS_SESSION_TOKEN); injected into the pods as those variables (secretKeyRef).")
    endpoint: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="Endpoint URL of an S3-compatible store (MinIO, Ceph, R2, ...), set as AWS_ENDPOINT_URL; unset "
                    "for AWS S3.")
    region: str | None = Field(default=None, max_length=64, pattern=r"^[a-z0-9-]+$",
                               description="Region, set as AWS_DEFAULT_REGION.")


class StorageSpec(KFModel):
    """Access to remote storage for the workload pods."""

    s3: S3Storage | None = Field(default=None, description="S3 (or S3-compatible) access for s3:// URIs.")


S3_ENV_CEL_RULE = (
    f"!has(self.storage) || !has(self.storage.s3) || !has(self.template.env) || "
    f"self.template.env.all(e, !(e.name in {cel_list(contract.S3_ENV)}))")
S3_ENV_MESSAGE = (f"template.env: {', '.join(contract.S3_ENV)} are set from storage.s3; remove them from "
                  "template.env (or remove storage.s3)")


def s3_env_conflicts(storage: "StorageSpec | None", template: "PodTemplateOverride") -> None:
    """The pydantic twin of :data:`S3_ENV_CEL_RULE`."""
    if storage is not None and storage.s3 is not None:
        clash = [e.name for e in template.env if e.name in contract.S3_ENV]
        if clash:
            raise ValueError(f"template.env: {', '.join(clash)} set from storage.s3; remove them from template.env "
                             "(or remove storage.s3)")


RESERVED_ENV: tuple[str, ...] = contract.RESERVED_ENV
"""Environment variables the operator sets on workload pods (torchrun's ``PET_*``/``MASTER_*``
configuration and the ``KUBEFORGE_*`` names of ``contract.OPERATOR_ENV``): ``template.env`` may
not set them, because the container's last definition wins and would silently replace the
operator's (a wrong rendezvous endpoint, node count or metrics port)."""


RESERVED_LABEL_DOMAIN = GROUP
"""Label keys under this domain (``kubeforge.io/...``, ``*.kubeforge.io/...``) are the
operator's: its selectors, its Services' endpoints and its watches pick pods by them, so a
user's ``template.labels`` may not set them (a pod of one resource could otherwise join
another resource's endpoints or be counted as its worker)."""

_RESERVED_LABEL_CEL = (f"k.startsWith('{RESERVED_LABEL_DOMAIN}/') || "
                       f"k.matches('^[^/]*[.]{RESERVED_LABEL_DOMAIN.replace('.', '[.]')}/')")


def reserved_label(key: str) -> bool:
    """Whether the label ``key`` is under :data:`RESERVED_LABEL_DOMAIN` (the operator's own)."""
    prefix, slash, _name = key.partition("/")
    return bool(slash) and (prefix == RESERVED_LABEL_DOMAIN or prefix.endswith("." + RESERVED_LABEL_DOMAIN))


def reserved_label_message(key: str) -> str:
    return (f"template.labels: {key} is reserved for the operator ({RESERVED_LABEL_DOMAIN}/ labels select "
            f"its pods); remove it or use a label outside {RESERVED_LABEL_DOMAIN}")


INTERPRETER_ENV: tuple[str, ...] = contract.INTERPRETER_ENV
"""Variables that change which code the interpreter or the dynamic loader runs
(``PYTHONPATH``, ``PYTHONSTARTUP``, ...) plus every ``LD_*`` name
(``contract.LOADER_ENV_PREFIXES``): ``template.env`` may not set them, so a resource cannot
make the runtime image load code it never shipped."""

_INTERPRETER_ENV_CEL = (f"self.name in {cel_list(INTERPRETER_ENV)} || "
                        + " || ".join(f"self.name.startsWith('{p}')" for p in contract.LOADER_ENV_PREFIXES))


def interpreter_env_message(name: str) -> str:
    return (f"template.env: {name} changes which code the interpreter or the dynamic loader runs and is not "
            f"allowed; remove it (put extra code in the runtime image instead)")


SECURITY_PROFILE_ANNOTATIONS: tuple[str, ...] = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
    "container.seccomp.security.alpha.kubernetes.io/",
)
"""Annotation prefixes (and keys) that choose an AppArmor or seccomp profile: the operator sets
the pods' profiles (RuntimeDefault) itself, so ``template.annotations`` may not set them."""

_SECURITY_ANNOTATION_CEL = " || ".join(f"k.startsWith('{p.rstrip('/')}')" for p in SECURITY_PROFILE_ANNOTATIONS)


def security_annotation(key: str) -> bool:
    """Whether the annotation ``key`` selects an AppArmor or seccomp profile."""
    return key.startswith(tuple(p.rstrip("/") for p in SECURITY_PROFILE_ANNOTATIONS))


def security_annotation_message(key: str) -> str:
    return (f"template.annotations: {key} selects an AppArmor/seccomp profile; the operator sets the pods' "
            f"profiles itself (RuntimeDefault): remove it")


def projected_token_volumes(volumes: list[dict[str, Any]]) -> list[str]:
    """Names of ``volumes`` that project a ServiceAccount token (never allowed: pods get no API token)."""
    out = []
    for v in volumes:
        sources = ((v.get("projected") or {}).get("sources")) or []
        if any(isinstance(s, dict) and "serviceAccountToken" in s for s in sources):
            out.append(str(v.get("name", "?")))
    return out


def projected_token_message(index: int, name: str) -> str:
    return (f"template.volumes[{index}] ({name}): a projected serviceAccountToken gives the pod a Kubernetes API "
            f"token, which workload pods never get; remove that source")


class EnvVar(KFModel):
    """An extra environment variable for the workload container (not one of RESERVED_ENV or INTERPRETER_ENV)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name.")
    value: str | None = Field(default=None, max_length=ENV_VALUE_MAX,
                              description="Literal value, at most 32 KiB (a larger one belongs in a ConfigMap, "
                                          "referenced by valueFrom).")
    value_from: K8sObject | None = Field(
        default=None, description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef)."
    )

    # One rule per entry (not over the list): its message can name the variable and stay cheap
    # enough for the API server's CEL cost budget.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(f"!(self.name in {cel_list(RESERVED_ENV)})",
            "template.env: a variable the operator sets cannot be overridden; remove it",
            ".name",
            message_expression="'template.env: ' + self.name + ' is set by the operator and cannot be overridden; remove it'"),
        cel(f"!({_INTERPRETER_ENV_CEL})",
            "template.env: a variable that changes which code the interpreter or the dynamic loader runs "
            "(LD_*, PYTHONPATH, PYTHONSTARTUP, ...) is not allowed; remove it",
            ".name",
            message_expression=("'template.env: ' + self.name + ' changes which code the interpreter or the dynamic "
                                "loader runs and is not allowed; remove it (put extra code in the runtime image "
                                "instead)'")),
    ]})

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_ENV:
            raise ValueError(f"template.env: {name} is set by the operator and cannot be overridden; remove it")
        if contract.interpreter_env(name):
            raise ValueError(interpreter_env_message(name))
        return name


class ResourcesSpec(KFModel):
    """Compute resources of one workload pod (for training: one node's worth)."""

    gpus: int = Field(default=0, ge=0, le=64, description="nvidia.com/gpu per pod (per node for training).")
    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. 8 or 7500m.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit, e.g. 64Gi.")
    workspace_size: Quantity | None = Field(
        default=None, description="Size limit of the /workspace scratch emptyDir (downloads, temporary files); a "
                                  "pod that writes more is evicted. Defaults to the operator's setting (the chart's "
                                  "workloadDefaults.workspaceSize, 64Gi).")
    shared_memory_size: Quantity | None = Field(
        default=None, description="Size limit of training pods' memory-backed /dev/shm (it counts against the "
                                  "pod's memory). Defaults to the operator's setting (the chart's "
                                  "workloadDefaults.sharedMemorySize, 8Gi).")
    gpu_memory: Quantity | None = Field(
        default=None,
        description="Memory of one GPU of the type the pods land on, e.g. 80Gi (else the nodeSelector's "
        "nvidia.com/gpu.memory label, in MiB, is used). With it the fit check refuses, at admission, a layout "
        "whose estimated peak per GPU exceeds it and names the nearest one that fits (`kubeforge plan`).",
    )

    @field_validator("cpu", "memory", "workspace_size", "shared_memory_size", "gpu_memory", mode="before")
    @classmethod
    def _normalise_quantity(cls, v: Any) -> str | None:
        return None if v is None else _quantity_to_str(v)


class PodTemplateOverride(KFModel):
    """Overrides merged into every workload pod the operator creates."""

    image: str | None = Field(default=None, description="Container image; defaults to the operator's configured runtime "
                                                        "image. Refused unless the platform allows it (the chart's "
                                                        "workloadPolicy.allowImageOverride).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the workload container."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, max_length=MAP_ENTRIES_MAX,
        description="Labels added to the Job/Deployment and its pods (e.g. kueue.x-k8s.io/queue-name); "
                    "kubeforge.io/ labels are the operator's and are refused.",
    )
    annotations: dict[str, Annotated[str, Field(max_length=ANNOTATION_VALUE_MAX)]] = Field(
        default_factory=dict, max_length=MAP_ENTRIES_MAX,
        description="Annotations added to the pods (at most 64, each value at most 32 KiB); AppArmor/seccomp "
                    "profile annotations are refused.")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=MAP_ENTRIES_MAX,
                                          description="Pod nodeSelector.")
    tolerations: list[K8sObject] = Field(default_factory=list, description="Pod tolerations, as in a PodSpec.")
    affinity: K8sObject | None = Field(default=None, description="Pod affinity, as in a PodSpec.")
    priority_class_name: str | None = Field(default=None, description="Pod priorityClassName.")
    scheduler_name: str | None = Field(default=None, description="Pod schedulerName (e.g. a gang scheduler).")
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of the pods; its token is never mounted. Refused unless the "
                                  "platform allows it (the chart's workloadPolicy.allowServiceAccount)."
    )
    # Bounded so that the API server can afford the CEL rules over the list.
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra environment variables.")
    volumes: list[K8sObject] = Field(default_factory=list, description="Extra pod volumes, as in a PodSpec. Only the "
                                     "types the platform allows (the chart's workloadPolicy.allowedVolumeTypes; by "
                                     "default persistentVolumeClaim, configMap, secret, emptyDir with a sizeLimit, "
                                     "downwardAPI, ephemeral, projected); never a projected serviceAccountToken.")
    volume_mounts: list[K8sObject] = Field(
        default_factory=list, description="Extra volume mounts of the workload container, as in a Container."
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.env) || self.env.all(e, !(has(e.value) && has(e.valueFrom)))",
            "an env entry sets either value or valueFrom, not both", ".env"),
        cel(f"!has(self.labels) || self.labels.all(k, !({_RESERVED_LABEL_CEL}))",
            f"template.labels: {RESERVED_LABEL_DOMAIN}/ labels are reserved for the operator; remove them",
            ".labels",
            message_expression=(f"'template.labels: ' + self.labels.filter(k, {_RESERVED_LABEL_CEL})[0] + "
                                f"' is reserved for the operator ({RESERVED_LABEL_DOMAIN}/ labels select its pods); "
                                f"remove it or use a label outside {RESERVED_LABEL_DOMAIN}'")),
        # A fixed message: naming the key (a filter over the map) would exceed the API server's
        # CEL cost budget for messageExpression; the pydantic rule below names it.
        cel(f"!has(self.annotations) || self.annotations.all(k, !({_SECURITY_ANNOTATION_CEL}))",
            "template.annotations: AppArmor/seccomp profile annotations (container.apparmor.security.beta."
            "kubernetes.io/*, seccomp.security.alpha.kubernetes.io/pod, container.seccomp.security.alpha."
            "kubernetes.io/*) are not allowed: the operator sets the pod profiles itself (RuntimeDefault); "
            "remove them",
            ".annotations"),
    ]})

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if reserved_label(key):
                raise ValueError(reserved_label_message(key))
        return labels

    @field_validator("annotations")
    @classmethod
    def _no_security_profiles(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            if security_annotation(key):
                raise ValueError(security_annotation_message(key))
        return annotations

    @field_validator("volumes")
    @classmethod
    def _no_projected_token(cls, volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Not CEL: the volumes are schemaless (preserve-unknown-fields), and a nested walk over
        # them would not fit the API server's cost budget; the webhook and the operator apply it.
        for i, v in enumerate(volumes):
            if projected_token_volumes([v]):
                raise ValueError(projected_token_message(i, str(v.get("name", "?"))))
        return volumes


Phase = Literal["Pending", "WaitingForInput", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class Condition(KFModel):
    """A status condition, as the Kubernetes API conventions define it."""

    type: str = Field(description="Condition type, e.g. Accepted, Running, Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field(default="", description="What happened, for people; says what to change if anything.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation this condition is about.")


class Kind:
    """CRD facts about one kind, next to its models (read by crd.py)."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[list[str]]
    spec_model: ClassVar[type[KFModel]]
    status_model: ClassVar[type[KFModel]]
    printer_columns: ClassVar[list[dict[str, Any]]]
    description: ClassVar[str]

    object_rules: ClassVar[list[dict[str, str]]] = []
    """CEL rules on the whole object (they may read ``self.metadata.name``), at the CRD's root."""

    @classmethod
    def validate_object(cls, name: str, spec: Any) -> None:
        """Rules that need the object's name as well as its validated spec (``object_rules`` are
        their CEL form); raises ValueError saying what to change. None by default."""

    @classmethod
    def singular(cls) -> str:
        return cls.kind.lower()

    @classmethod
    def crd_name(cls) -> str:
        return f"{cls.plural}.{GROUP}"

    @classmethod
    def resource(cls) -> tuple[str, str, str]:
        """(group, version, plural): how kopf handlers and API paths name this kind."""
        return GROUP, VERSION, cls.plural


class InvalidSpec(ValueError):
    """A spec the schema accepts but the operator cannot run; the message says what to change."""


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field (``spec.a.b: message``), joined by ``; ``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
        parts.append(f"spec.{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def spec_problem(exc: ValidationError | InvalidSpec) -> str:
    """What is wrong with a spec, for a condition, an event or a CLI error."""
    return describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
