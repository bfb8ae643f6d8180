"""The serving config file: what the operator renders into the InferenceService's ConfigMap.

The operator writes one JSON object (camelCase keys) to ``/etc/kubeforge/config.json`` and
starts ``python -m kubeforge_runtime.serve --config /etc/kubeforge/config.json``. This module
parses exactly that object; an unknown key is an error that names the key (so a typo in the
operator, or a field this runtime does not know yet, fails the pod at start with exit code 78
instead of being silently ignored); a wrong type or an out-of-range value names the field.
The shape is documented in ``trainer_image/CONTRACT.md``; the models are pydantic
(:class:`~kubeforge_runtime.configmodel.CamelConfig`) and the operator renders the
InferenceService API's ``engine`` and ``adapters`` into them unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .. import configmodel, contract
from ..configfile import read_config_object
from ..configmodel import CamelConfig


class ConfigError(ValueError):
    """The config file is missing, not JSON, or does not match the schema; the message says why."""


class _Strict(CamelConfig):
    model_config = ConfigDict(frozen=True)


class ModelSource(_Strict):
    uri: str = Field(min_length=1, description="Where the model directory lives: file://, pvc://, hf:// or s3:// (see storage.py).")


class AdapterSource(_Strict):
    name: str = Field(min_length=1, description="The model name clients use to reach this LoRA adapter.")
    uri: str = Field(min_length=1, description="Directory holding adapter_config.json and the adapter weights.")


class EngineConfig(_Strict):
    """The serving engine's settings; the InferenceService API's ``spec.engine`` renders into this
    unchanged, so the types and bounds here are the API's (a contract test compares them)."""

    backend: Literal["kubeforge", "vllm"] = Field(
        "kubeforge",
        description="Which server the InferenceService runs; this one is kubeforge (a vllm service runs vLLM's own "
        "server and never this module, so vllm here is refused).",
    )
    batching: Literal["auto", "continuous", "dynamic"] = Field(
        "auto",
        description="continuous: transformers' continuous batching with a paged KV cache; dynamic: the "
        "in-house dynamic-batching fallback; auto: continuous where it supports the model and device.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and KV-cache dtype; auto keeps what the checkpoint says."
    )
    max_batch_tokens: int = Field(4096, ge=16, description="Most tokens (prefill + decode) in one forward pass.")
    max_concurrent_requests: int = Field(16, ge=1, le=4096, description="Requests generating at once; the rest wait.")
    max_queued_requests: int = Field(
        64, ge=0, le=100000, description="Requests allowed to wait; past this the server answers 429."
    )
    kv_block_size: int = Field(16, ge=4, le=1024, description="Tokens per KV-cache block (page) of the paged cache.")
    prefix_caching: bool = Field(
        True,
        description="Reuse the cached KV blocks of a prompt prefix another request already computed (a shared system "
        "prompt) instead of computing them again; continuous engine only (the dynamic engine has no prefix cache).",
    )
    max_model_length: int | None = Field(
        None, ge=8, description="Prompt + completion limit in tokens; default and ceiling: the model's own."
    )
    request_timeout_seconds: float = Field(
        120, gt=0, le=86400,
        description="Deadline of one request in seconds, queueing included; past it the request is cancelled.",
    )
    max_request_body_bytes: int = Field(
        8 * 2**20, ge=1024, le=2**30,
        description="Largest HTTP request body (and gRPC message) in bytes; a larger one is refused (HTTP 413) "
        "before it is read.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on: torch.compile the forward pass (and CUDA graphs on GPUs), compiled during warm-up before "
        "/ready; off: eager; auto: what measured faster on the device (see serve/decode.py).",
    )

    @model_validator(mode="after")
    def _kubeforge_backend(self) -> "EngineConfig":
        if self.backend != "kubeforge":
            raise ValueError("engine.backend: this is the KubeForge server; a backend: vllm service runs vLLM's "
                             "OpenAI server instead (the operator renders that pod), so use backend: kubeforge here")
        return self


class ServeConfig(_Strict):
    kind: Literal["InferenceService"] = Field("InferenceService", description="Always InferenceService.")
    name: str = Field(min_length=1, description="The InferenceService's name (the base model's name by default).")
    namespace: str = Field("default", description="The InferenceService's namespace.")
    served_model_name: str | None = Field(None, description="Model name of the base model in the API; default: name.")
    model: ModelSource = Field(description="The base model.")
    adapters: list[AdapterSource] = Field(
        default_factory=list, max_length=64, description="LoRA adapters, each served under its own model name."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Serving engine settings.")
    port: int = Field(contract.SERVE_HTTP_PORT, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    grpc_port: int | None = Field(
        contract.SERVE_GRPC_PORT, ge=0, le=65535, description="gRPC port (0: pick a free one; null: no gRPC)."
    )

    @model_validator(mode="after")
    def _model_names_are_distinct(self) -> "ServeConfig":
        # The operator's API refuses these too (kubeforge.api.inference); this check stays for
        # configs that reach the server without it (a hand-written file, a local run), because
        # the model table is keyed by name: a repeated name would silently shadow a model.
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        if self.model_name in names:
            raise ValueError(f"adapter name {self.model_name!r} clashes with servedModelName")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.name

    def model_names(self) -> list[str]:
        return [self.model_name, *(a.name for a in self.adapters)]


def parse_config(data: object) -> ServeConfig:
    """Validate a decoded JSON object; raise ConfigError naming each bad or unknown key."""
    return configmodel.parse(ServeConfig, data, ConfigError, prefix="invalid serving config: ")


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate the config file the operator mounted."""
    return parse_config(read_config_object(path, ConfigError))
