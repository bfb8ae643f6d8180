"""Generation engines: a small protocol and a name -> implementation table.

The HTTP and gRPC front ends never touch a model; they hand token ids to an ``Engine`` and
receive token ids back through a callback. Two implementations exist:

* ``continuous`` (:mod:`.continuous`) - transformers' own continuous-batching manager with
  its paged KV cache: requests join and leave the running batch at every step.
* ``dynamic`` (:mod:`.dynamic`) - our fallback for models or devices the first refuses:
  requests that arrive while a batch runs wait and form the next batch; finished rows leave
  the batch (and the cache) at once.

Implementations are imported lazily (``create_engine``) so importing the server never pulls
in a backend that is not used. ``select_backend`` decides what ``backend: auto`` means.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .config import EngineConfig

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One generation, already tokenized and clamped by the service."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    eos_token_ids: list[int]
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # honoured by the dynamic engine only (the paged engine samples batch-wide)


@dataclass
class EngineEvent:
    """Progress of one request: all tokens generated so far, cumulative (not a delta)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


EventSink = Callable[[EngineEvent], None]
"""Called with every event of a request; must be thread-safe (engines call it from their loop thread)."""


class Engine(Protocol):
    """What the service needs from a generation backend."""

    name: str
    """Registry name of the implementation that actually runs ("continuous" or "dynamic")."""

    def start(self) -> None:
        """Start the background generation loop."""

    def warmup(self) -> None:
        """Run one short generation end to end, so the first user request pays no one-off cost."""

    def submit(self, request: EngineRequest, sink: EventSink) -> None:
        """Queue a request; events go to ``sink``. Called from the asyncio loop thread."""

    def cancel(self, request_id: str) -> None:
        """Stop a request and free its KV-cache blocks; its sink gets no further events."""

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use, 0..1 (vllm:kv_cache_usage_perc)."""

    def kv_cache_info(self) -> dict[str, Any]:
        """Facts about the cache for /v1/models and benchmarks (block size, blocks, bytes per token)."""

    def prefix_cache_stats(self) -> tuple[int, int]:
        """Prompt tokens looked up in the prefix cache and tokens found there, since start
        (vllm:prefix_cache_queries / vllm:prefix_cache_hits); (0, 0) for an engine without one."""

    def healthy(self) -> bool:
        """Whether the generation loop is alive (a dead loop fails the liveness probe)."""

    def stop(self) -> None:
        """Stop the loop; pending requests fail."""


ENGINES: dict[str, str] = {
    "continuous": "kubeforge_runtime.serve.continuous:ContinuousEngine",
    "dynamic": "kubeforge_runtime.serve.dynamic:DynamicBatchingEngine",
}


def continuous_supported(model: Any) -> tuple[bool, str]:
    """Whether transformers' continuous batching can run this model here, and why not if it cannot.

    Measured with transformers 5.24 on CPU: the manager runs with attention "sdpa" (and
    "paged|eager"); "sdpa_paged" is refused. Models loaded with another attention
    implementation (e.g. "flex_attention"), models without ``init_continuous_batching``
    (older transformers, PEFT wrappers) and sliding-window/hybrid caches that the
    installed version cannot page all take the dynamic fallback.
    """
    if not hasattr(model, "init_continuous_batching"):
        return False, f"{type(model).__name__} has no init_continuous_batching (transformers too old or wrapped model)"
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
        except ImportError:
            return False, "this transformers has no ContinuousBatchingConfig"
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager", "paged|eager") and not str(attn).startswith("flash_attention"):
        return False, f"attention implementation {attn!r} is not one continuous batching accepts"
    if getattr(model.config, "is_encoder_decoder", False):
        return False, "encoder-decoder models are not supported by continuous batching"
    return True, "supported"


def select_backend(requested: str, model: Any) -> tuple[str, str]:
    """Map the config's backend to an implementation name, with the reason for the choice."""
    if requested == "dynamic":
        return "dynamic", "requested in the config"
    ok, why = continuous_supported(model)
    if requested == "continuous":
        if not ok:
            raise RuntimeError(f"engine.batching is 'continuous' but {why}; use 'auto' or 'dynamic'")
        return "continuous", "requested in the config"
    return ("continuous", "auto: supported") if ok else ("dynamic", f"auto: {why}")


def create_engine(name: str, model: Any, tokenizer: Any, config: EngineConfig, max_model_length: int) -> Engine:
    """Import and build the engine registered under ``name``."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    engine: Engine = cls(model=model, tokenizer=tokenizer, config=config, max_model_length=max_model_length)
    return engine
