"""The serving runtime of an InferenceService pod: an OpenAI-compatible HTTP API and a gRPC
generation service over a batching engine.

Modules, in the order a request meets them: ``__main__`` (entry point) -> ``server`` (process
wiring, startup and probes) -> ``app`` (HTTP routes, OpenAI shapes) / ``grpc_server`` ->
``service`` (admission, deadlines, cancellation, metrics) -> ``engine`` (protocol and
registry) -> ``continuous`` (transformers' continuous batching, paged KV cache) or
``dynamic`` (fallback). ``config`` parses the file the operator renders; ``protocol`` holds
the OpenAI request models; ``metrics`` the vLLM-named Prometheus metrics.
"""

from .config import ConfigError, ServeConfig, load_config, parse_config

__all__ = ["ConfigError", "ServeConfig", "load_config", "parse_config"]
