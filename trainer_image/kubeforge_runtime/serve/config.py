"""The serving config file: what the operator renders into the InferenceService's ConfigMap.

The operator writes one JSON object (camelCase keys) to ``/etc/kubeforge/config.json`` and
starts ``python -m kubeforge_runtime.serve --config /etc/kubeforge/config.json``. This module
parses exactly that object; an unknown key is an error that names the key (so a typo in the
operator, or a field this runtime does not know yet, fails the pod at start with exit code 78
instead of being silently ignored). The shape is documented in ``trainer_image/CONTRACT.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from .. import contract
from ..configfile import read_config_object


class ConfigError(ValueError):
    """The config file is missing, not JSON, or does not match the schema; the message says why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class ModelSource(_Strict):
    uri: str = Field(description="Where the model directory lives: file://, pvc://, hf:// or s3:// (see storage.py).")


class AdapterSource(_Strict):
    name: str = Field(min_length=1, description="The model name clients use to reach this LoRA adapter.")
    uri: str = Field(description="Directory holding adapter_config.json and the adapter weights.")


class EngineConfig(_Strict):
    backend: Literal["auto", "continuous", "dynamic"] = Field(
        "auto",
        description="continuous: transformers' continuous batching with a paged KV cache; dynamic: the "
        "in-house dynamic-batching fallback; auto: continuous where it supports the model and device.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and KV-cache dtype; auto keeps what the checkpoint says."
    )
    max_batch_tokens: int = Field(4096, ge=16, description="Most tokens (prefill + decode) in one forward pass.")
    max_concurrent_requests: int = Field(16, ge=1, description="Requests generating at once; the rest wait.")
    max_queued_requests: int = Field(64, ge=0, description="Requests allowed to wait; past this the server answers 429.")
    kv_block_size: int = Field(16, ge=4, description="Tokens per KV-cache block (page) of the paged cache.")
    max_model_length: int | None = Field(
        None, ge=2, description="Prompt + completion limit in tokens; default and ceiling: the model's own."
    )
    request_timeout_seconds: float = Field(
        120, gt=0, description="Deadline of one request, queueing included; past it the request is cancelled."
    )


class ServeConfig(_Strict):
    kind: Literal["InferenceService"] = "InferenceService"
    name: str = Field(min_length=1)
    namespace: str = "default"
    served_model_name: str | None = Field(None, description="Model name of the base model in the API; default: name.")
    model: ModelSource
    adapters: list[AdapterSource] = Field(default_factory=list)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    port: int = Field(contract.SERVE_HTTP_PORT, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    grpc_port: int | None = Field(
        contract.SERVE_GRPC_PORT, ge=0, le=65535, description="gRPC port (0: pick a free one; null: no gRPC)."
    )

    @field_validator("adapters")
    @classmethod
    def _unique_adapter_names(cls, adapters: list[AdapterSource]) -> list[AdapterSource]:
        names = [a.name for a in adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        return adapters

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.name

    def model_names(self) -> list[str]:
        return [self.model_name, *(a.name for a in self.adapters)]


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_config(data: object) -> ServeConfig:
    """Validate a decoded JSON object; raise ConfigError naming each bad or unknown key."""
    try:
        config = ServeConfig.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise ConfigError(f"invalid serving config: {_describe(exc)}") from None
    if config.adapters and config.model_name in {a.name for a in config.adapters}:
        raise ConfigError(f"invalid serving config: adapter name {config.model_name!r} clashes with servedModelName")
    return config


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate the config file the operator mounted."""
    return parse_config(read_config_object(path, ConfigError))
