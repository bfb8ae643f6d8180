"""The QuantizeJob runtime config: the JSON file the operator renders and mounts.

Called by :mod:`kubeforge_runtime.quantize.runner` (``--config PATH``). The operator writes
exactly this shape (camelCase, the CRD's field names)::

    {"kind": "QuantizeJob", "name": "demo", "namespace": "default",
     "model": {"uri": "file:///models/m"},
     "method": "int8-dynamic", "groupSize": 128,
     "calibration": {"uri": null, "samples": 128},
     "evaluation": {"uri": "file:///data/eval.jsonl", "maxPerplexityIncreasePercent": 1.0,
                    "maxSamples": 64, "sequenceLength": 256,
                    "task": {"uri": "file:///data/test.jsonl", "metric": "accuracy", "maxSamples": 200},
                    "maxAccuracyDropPoints": 1.0},
     "output": {"uri": "file:///out/q"}}

Parsing is strict on purpose: an unknown key is an error that names the key, because a key
the runtime silently ignores is a setting the user believes is applied and is not. Every
error raises :class:`ConfigError`, which the runner turns into exit code
``contract.EXIT_CONFIG_ERROR`` (78) so the Job fails at once instead of retrying.

Only the standard library is imported here, so the operator's tests may import this module
to check that what they render parses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from ..configfile import read_config_object

METHODS: tuple[str, ...] = ("int8-dynamic", "int8-weight-only", "int4-weight-only", "fp16", "bf16")
"""Method names accepted in ``method``; the registry in ``methods.py`` implements each."""

GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
"""Group sizes int4 accepts: the CPU tinygemm kernel takes exactly these (CUDA also 256)."""


class ConfigError(ValueError):
    """The config is invalid; the message names the offending key and what to change."""


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration data. None of the torchao methods offered here uses it (they are
    weight-only or quantize activations dynamically at run time); it is accepted so that a
    future static method (e.g. SmoothQuant/AWQ) needs no contract change."""

    uri: str | None = None
    """Dataset URI (JSONL), or null."""
    samples: int = 128
    """How many records a calibrating method would read."""


TASK_METRICS: tuple[str, ...] = ("accuracy", "exactMatch", "f1", "passAtOne")
"""Task metrics ``kubeforge_runtime.evaluate`` computes."""


@dataclass(frozen=True)
class TaskSpec:
    """A held-out task metric measured on the input and the output (``evaluate.py``)."""

    uri: str
    """JSONL of prompt-completion or chat records (the format is read from the records)."""
    metric: str
    """One of TASK_METRICS."""
    max_samples: int = 200
    """At most this many records are evaluated."""


@dataclass(frozen=True)
class EvaluationSpec:
    """Where and how quality is measured before and after quantization."""

    uri: str | None = None
    """JSONL with "text" (or "prompt" + "completion", concatenated); null: the runtime's
    reference text (see ``quantize/data.py``)."""
    max_perplexity_increase_percent: float = 1.0
    """The quality gate: a larger relative perplexity increase rejects the output."""
    max_samples: int = 64
    """At most this many records are read from the evaluation set."""
    sequence_length: int = 256
    """Tokens per evaluation window (the records' tokens are concatenated, then cut)."""
    task: TaskSpec | None = None
    """The task metric, or null for perplexity only."""
    max_accuracy_drop_points: float | None = None
    """The task metric's gate: a larger drop in percentage points rejects the output."""


@dataclass(frozen=True)
class QuantizeConfig:
    """A parsed, validated QuantizeJob runtime config."""

    name: str
    namespace: str
    model_uri: str
    method: str
    output_uri: str
    group_size: int = 128
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)


def _check_keys(obj: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(obj, dict):
        raise ConfigError(f"{where or 'config'}: expected an object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key {path!r}; allowed here: {', '.join(sorted(allowed))}")
    for key in required:
        if obj.get(key) is None:
            path = f"{where}.{key}" if where else key
            raise ConfigError(f"missing required key {path!r}")
    return obj


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path!r} must be a non-empty string, got {value!r}")
    return value


def _optional_string(value: Any, path: str) -> str | None:
    return None if value is None else _string(value, path)


def _int(value: Any, path: str, minimum: int) -> int:
    # bool is an int subclass in Python; `true` is never a sensible count.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{path!r} must be a number >= 0, got {value!r}")
    return float(value)


def parse_config(data: Any) -> QuantizeConfig:
    """Validate a decoded config object and return it typed; raise ConfigError otherwise."""
    top = _check_keys(
        data,
        "",
        {"kind", "name", "namespace", "model", "method", "groupSize", "calibration", "evaluation", "output"},
        {"model", "method", "output"},
    )
    kind = top.get("kind", "QuantizeJob")
    if kind != "QuantizeJob":
        raise ConfigError(f"'kind' must be 'QuantizeJob', got {kind!r}")

    model = _check_keys(top["model"], "model", {"uri"}, {"uri"})
    output = _check_keys(top["output"], "output", {"uri"}, {"uri"})

    method = top["method"]
    if method not in METHODS:
        raise ConfigError(f"'method' must be one of {', '.join(METHODS)}; got {method!r}")

    group_size = _int(top.get("groupSize", 128), "groupSize", 1)
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"'groupSize' must be one of {GROUP_SIZES}, got {group_size}")

    cal = _check_keys(top.get("calibration") or {}, "calibration", {"uri", "samples"})
    calibration = CalibrationSpec(
        uri=_optional_string(cal.get("uri"), "calibration.uri"),
        samples=_int(cal.get("samples", 128), "calibration.samples", 1),
    )

    ev = _check_keys(
        top.get("evaluation") or {},
        "evaluation",
        {"uri", "maxPerplexityIncreasePercent", "maxSamples", "sequenceLength", "task", "maxAccuracyDropPoints"},
    )
    max_increase = _number(ev.get("maxPerplexityIncreasePercent", 1.0), "evaluation.maxPerplexityIncreasePercent")
    task = None
    if ev.get("task") is not None:
        tk = _check_keys(ev["task"], "evaluation.task", {"uri", "metric", "maxSamples"}, {"uri", "metric"})
        if tk["metric"] not in TASK_METRICS:
            raise ConfigError(f"'evaluation.task.metric' must be one of {', '.join(TASK_METRICS)}; got {tk['metric']!r}")
        task = TaskSpec(uri=_string(tk["uri"], "evaluation.task.uri"), metric=tk["metric"],
                        max_samples=_int(tk.get("maxSamples", 200), "evaluation.task.maxSamples", 1))
    max_drop = ev.get("maxAccuracyDropPoints")
    if max_drop is not None:
        max_drop = _number(max_drop, "evaluation.maxAccuracyDropPoints")
        if task is None:
            raise ConfigError("'evaluation.maxAccuracyDropPoints' gates the task metric: set evaluation.task too")
    evaluation = EvaluationSpec(
        uri=_optional_string(ev.get("uri"), "evaluation.uri"),
        max_perplexity_increase_percent=float(max_increase),
        max_samples=_int(ev.get("maxSamples", 64), "evaluation.maxSamples", 1),
        # Two tokens is the least that gives one next-token prediction.
        sequence_length=_int(ev.get("sequenceLength", 256), "evaluation.sequenceLength", 2),
        task=task,
        max_accuracy_drop_points=max_drop,
    )

    return QuantizeConfig(
        name=_string(top.get("name", "quantize"), "name"),
        namespace=_string(top.get("namespace", "default"), "namespace"),
        model_uri=_string(model["uri"], "model.uri"),
        method=method,
        output_uri=_string(output["uri"], "output.uri"),
        group_size=group_size,
        calibration=calibration,
        evaluation=evaluation,
    )


def load_config(path: str | Path) -> QuantizeConfig:
    """Read and parse the config file at ``path``."""
    return parse_config(read_config_object(path, ConfigError))
