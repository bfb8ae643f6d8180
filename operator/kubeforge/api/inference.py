"""InferenceService: serve a model over an OpenAI-compatible API, autoscaled."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from .base import (
    S3_ENV_CEL_RULE, S3_ENV_MESSAGE, Condition, Kind, KFModel, Name, ObjectReference, Phase, PodTemplateOverride,
    ResourcesSpec, SecretKeyRef, StorageSpec, cel, s3_env_conflicts,
)
from .finetune import MODEL_URI_PATTERN, URI_MAX_LENGTH


class ServeModelSource(KFModel):
    """The model to serve: exactly one of uri, fineTuneJobRef, quantizeJobRef."""

    uri: str | None = Field(default=None, pattern=MODEL_URI_PATTERN, max_length=URI_MAX_LENGTH, description="hf://, pvc://, s3:// or file:/// URI of the model.")
    fine_tune_job_ref: ObjectReference | None = Field(default=None, description="Serve this FineTuneJob's output.")
    quantize_job_ref: ObjectReference | None = Field(default=None, description="Serve this QuantizeJob's output.")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("(has(self.uri) ? 1 : 0) + (has(self.fineTuneJobRef) ? 1 : 0) + (has(self.quantizeJobRef) ? 1 : 0) == 1",
            "model: give exactly one of uri, fineTuneJobRef or quantizeJobRef", reason="FieldValueInvalid"),
    ]})

    @model_validator(mode="after")
    def _exactly_one(self) -> "ServeModelSource":
        given = [x for x in (self.uri, self.fine_tune_job_ref, self.quantize_job_ref) if x is not None]
        if len(given) != 1:
            raise ValueError("model: give exactly one of uri, fineTuneJobRef or quantizeJobRef")
        return self


class ReplicasSpec(KFModel):
    """Replica range; the autoscaler moves between them."""

    min: int = Field(default=1, ge=0, le=1000, description="Fewest replicas.")
    max: int = Field(default=1, ge=1, le=1000, description="Most replicas; an autoscaler is created when max > min.")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.min <= self.max", "replicas.min must be less than or equal to replicas.max", ".min"),
    ]})


class AutoscalingSpec(KFModel):
    """Per-pod metric the HorizontalPodAutoscaler follows."""

    metric: Literal["concurrency", "queueDepth", "kvCacheUsage"] = Field(
        default="concurrency",
        description="concurrency: vllm:num_requests_running; queueDepth: vllm:num_requests_waiting; kvCacheUsage: "
        "vllm:kv_cache_usage_perc. The HPA reads the per-pod average from the custom metrics API under the name a "
        "Prometheus adapter gives the series, vllm:<x> exposed as vllm_<x> (e.g. vllm_num_requests_waiting).",
    )
    target: float = Field(default=8, gt=0, description="Target average value per pod (kvCacheUsage: a fraction 0-1).")


VLLM_ONLY_DEFAULTS: dict[str, Any] = {
    "batching": "auto",
    "maxQueuedRequests": 64,
    "kvBlockSize": 16,
    "requestTimeoutSeconds": 120.0,
    "maxRequestBodyBytes": 8 * 2**20,
}
"""Engine settings only the KubeForge server has, with their defaults: with ``backend: vllm``
each must stay at its default (vLLM's OpenAI server has no such setting; a value would be
silently ignored). The CRD's CEL, the webhook and the operator refuse anything else."""

VLLM_ONLY_REASONS = {
    "batching": "vLLM always batches continuously",
    "maxQueuedRequests": "vLLM's server has no waiting-queue limit",
    "kvBlockSize": "vLLM chooses its own KV-cache block size per device",
    "requestTimeoutSeconds": "vLLM's server has no per-request deadline",
    "maxRequestBodyBytes": "vLLM's server has no request-body limit",
}


def _vllm_rule(key: str, default: Any) -> dict[str, str]:
    literal = f"'{default}'" if isinstance(default, str) else repr(default)
    return cel(f"self.backend != 'vllm' || !has(self.{key}) || self.{key} == {literal}",
               f"engine.{key}: {VLLM_ONLY_REASONS[key]}; remove it (default {default}) or use engine.backend: kubeforge",
               f".{key}", reason="FieldValueForbidden")


def vllm_engine_problems(engine: "EngineSpec") -> list[str]:
    """The ``engine`` settings vLLM cannot honour (the CEL rules' messages), empty when none."""
    data = engine.model_dump(by_alias=True, mode="json")
    if engine.backend != "vllm":
        return []
    return [f"engine.{k}: {VLLM_ONLY_REASONS[k]}; remove it (default {d}) or use engine.backend: kubeforge"
            for k, d in VLLM_ONLY_DEFAULTS.items() if data[k] != d]


class EngineSpec(KFModel):
    """Serving engine settings. ``backend`` picks the server: ``kubeforge`` (the bundled
    runtime; every other field is rendered unchanged into its config,
    ``kubeforge_runtime.serve.config.EngineConfig``, same types and bounds, a contract test
    compares them) or ``vllm`` (vLLM's OpenAI server: dtype, maxBatchTokens,
    maxConcurrentRequests, maxModelLength, prefixCaching and compile: off become its flags; the KubeForge-only settings
    must stay at their defaults)."""

    backend: Literal["kubeforge", "vllm"] = Field(
        default="kubeforge",
        description="kubeforge: the bundled KubeForge server; vllm: vLLM's OpenAI-compatible server (image from the "
        "chart's vllm.image, or template.image where the workload policy allows it).",
    )
    batching: Literal["auto", "continuous", "dynamic"] = Field(
        default="auto", description="KubeForge server only. continuous: transformers' continuous batching (paged KV "
        "cache); dynamic: the fallback; auto: continuous where supported."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Weights dtype.")
    max_batch_tokens: int = Field(default=4096, ge=16, description="Token budget of one batch.")
    max_concurrent_requests: int = Field(default=16, ge=1, le=4096, description="Requests decoded at once.")
    max_queued_requests: int = Field(default=64, ge=0, le=100000, description="Waiting requests before 429.")
    kv_block_size: int = Field(default=16, ge=4, le=1024, description="Tokens per KV-cache block (at least 4, the server's minimum).")
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV cache of a prompt prefix another request already computed (a shared chat system "
        "prompt) instead of computing it again; hits are counted in vllm:prefix_cache_hits_total. KubeForge server: "
        "continuous engine only; vLLM: --enable-prefix-caching / --no-enable-prefix-caching.",
    )
    max_model_length: int | None = Field(default=None, ge=8, description="Longest prompt+completion; default the model's.")
    request_timeout_seconds: float = Field(
        default=120, gt=0, le=86400, description="Per-request deadline in seconds (fractions allowed), queueing included."
    )
    max_request_body_bytes: int = Field(
        default=8 * 2**20, ge=1024, le=2**30,
        description="Largest request body in bytes (HTTP 413 past it; also the gRPC message limit).",
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto", description="KubeForge server: on: torch.compile the forward pass (and CUDA graphs on "
        "GPUs), compiled during warm-up before the pod is ready; off: eager; auto: on where it measured faster "
        "(CUDA: CUDA graphs; CPU: eager, see the README). A QuantizeJob times its latency through the default, auto. "
        "vLLM: off starts it in eager mode (--enforce-eager --optimization-level 0: no torch.compile, no CUDA "
        "graphs; ready in seconds instead of minutes, slower decoding); auto and on leave vLLM's own compilation.",
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _vllm_rule(k, d) for k, d in VLLM_ONLY_DEFAULTS.items()]})

    @model_validator(mode="after")
    def _vllm_settings(self) -> "EngineSpec":
        problems = vllm_engine_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class AdapterSpec(KFModel):
    """A LoRA adapter served under its own model name."""

    name: Name = Field(description="Model name clients use for this adapter.")
    uri: str = Field(pattern=MODEL_URI_PATTERN, max_length=URI_MAX_LENGTH, description="URI of the adapter directory.")


_CLASH = "clashes with the base model, which is served under the name of the InferenceService; rename the adapter"


def repeated(names: list[str]) -> list[str]:
    """Names given more than once, each once, in the order they first repeat."""
    seen: set[str] = set()
    dups: list[str] = []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    return dups


def served_names_problem(name: str, adapters: list[AdapterSpec]) -> str | None:
    """Why the models an InferenceService serves cannot all be told apart, or None.

    Clients pick a model by name: the base model is served under the InferenceService's name
    and each adapter under its own, so every adapter name is unique and none is the service's.
    (The serving runtime keeps the same check for configs that reach it without this API.)
    """
    names = [a.name for a in adapters]
    dups = repeated(names)
    if dups:
        return f"spec.adapters: names must be unique; repeated: {', '.join(dups)}"
    if name in names:
        return f'spec.adapters: adapter name "{name}" {_CLASH}'
    return None


class InferenceServiceSpec(KFModel):
    """Desired state of an InferenceService."""

    model: ServeModelSource = Field(description="The model to serve.")
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec, description="Replica range.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Autoscaling metric and target.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources of each replica.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Serving engine.")
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=64, description="LoRA adapters served by name.")
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, description="Require this API key (Bearer token).")
    template: PodTemplateOverride = Field(default_factory=PodTemplateOverride, description="Pod overrides.")
    storage: StorageSpec | None = Field(
        default=None, description="Remote storage access: storage.s3 for s3:// URIs (credentials by Secret reference).")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(S3_ENV_CEL_RULE, S3_ENV_MESSAGE, ".storage"),
        cel("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "spec.adapters: names must be unique",
            ".adapters",
            message_expression=(
                "'spec.adapters: names must be unique; repeated: ' + self.adapters.map(a, a.name)"
                ".filter(n, !self.adapters.exists_one(b, b.name == n))[0]"
            )),
    ]})

    @model_validator(mode="after")
    def _s3_env(self) -> "InferenceServiceSpec":
        s3_env_conflicts(self.storage, self.template)
        return self


class ReplicaStatus(KFModel):
    """Replica counts."""

    ready: int = Field(default=0, description="Ready replicas.")
    desired: int = Field(default=0, description="Replicas the Deployment wants.")


class InferenceServiceStatus(KFModel):
    """Observed state of an InferenceService. Written by the operator only."""

    phase: Phase | None = Field(default=None, description="Pending, WaitingForInput, Running or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Accepted, ModelReady, Ready.")
    observed_generation: int | None = Field(default=None, description="The spec generation last reconciled.")
    url: str | None = Field(default=None, description="In-cluster URL of the OpenAI-compatible API.")
    replicas: ReplicaStatus | None = Field(default=None, description="Replica counts.")
    model_uri: str | None = Field(default=None, description="The model URI being served.")
    model_revision: str | None = Field(default=None, description="Revision of the served model (changes roll the pods).")


class InferenceService(Kind):
    kind = "InferenceService"
    plural = "inferenceservices"
    short_names = ["kfis", "kfsvc"]
    spec_model = InferenceServiceSpec
    status_model = InferenceServiceStatus
    description = "InferenceService serves a model over an OpenAI-compatible API with continuous batching."
    object_rules: ClassVar[list[dict[str, str]]] = [
        cel("!has(self.spec.adapters) || self.spec.adapters.all(a, a.name != self.metadata.name)",
            f"spec.adapters: an adapter name {_CLASH}",
            message_expression=f"'spec.adapters: adapter name \"' + self.metadata.name + '\" {_CLASH}'",
            reason="FieldValueInvalid"),
    ]

    @classmethod
    def validate_object(cls, name: str, spec: Any) -> None:
        problem = served_names_problem(name, spec.adapters)
        if problem:
            raise ValueError(problem)

    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.replicas.ready"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
