"""QuantizeJob runtime: compress a causal LM with torchao and prove what it cost.

Entry point: ``python -m kubeforge_runtime.quantize --config PATH`` (see ``runner``), run in
the QuantizeJob pod. Modules:

* ``config``  - the rendered config file (strict pydantic models, camelCase) -> ``QuantizeConfig``;
* ``methods`` - the method registry (int8-dynamic, int8-weight-only, int4-weight-only,
  int4-weight-only-awq, fp16, bf16), each a torchao ``quantize_`` config applied through transformers;
* ``metrics`` - bytes, perplexity, per-token latency;
* ``data``    - evaluation texts, token windows, latency prompts;
* ``report``  - the compact termination-message report and the full on-disk report;
* ``runner``  - the steps, the quality gate and the exit codes.

Calibration data is read by ``int4-weight-only-awq`` only (torchao's AWQ, ``methods.Int4AwqMethod``);
the other methods do not need it: weight-only methods use only the weights and int8-dynamic
scales activations per token at run time.
"""

from __future__ import annotations

from .config import METHODS, ConfigError, QuantizeConfig, load_config, parse_config
from .methods import REGISTRY, UnsupportedMethodError, get_method

__all__ = [
    "METHODS",
    "REGISTRY",
    "ConfigError",
    "QuantizeConfig",
    "UnsupportedMethodError",
    "get_method",
    "load_config",
    "parse_config",
]
