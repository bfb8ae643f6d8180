"""The QuantizeJob runtime config: the JSON file the operator renders and mounts.

Called by :mod:`kubeforge_runtime.quantize.runner` (``--config PATH``). The operator writes
exactly this shape (camelCase, the CRD's field names)::

    {"kind": "QuantizeJob", "name": "demo", "namespace": "default",
     "model": {"uri": "file:///models/m"},
     "method": "int8-dynamic", "groupSize": 128, "quantizeEmbeddings": true,
     "calibration": {"uri": null, "samples": 128},
     "evaluation": {"uri": "file:///data/eval.jsonl", "maxPerplexityIncreasePercent": 1.0,
                    "maxSamples": 64, "sequenceLength": 256,
                    "task": {"uri": "file:///data/test.jsonl", "metric": "accuracy", "maxSamples": 200},
                    "maxAccuracyDropPoints": 1.0},
     "output": {"uri": "file:///out/q"}}

Parsing is strict on purpose: an unknown key is an error that names the key, because a key
the runtime silently ignores is a setting the user believes is applied and is not; a wrong
type (``"128"``, ``true`` for a count) or an out-of-range value names the field. Every error
raises :class:`ConfigError`, which the runner turns into exit code
``contract.EXIT_CONFIG_ERROR`` (78) so the Job fails at once instead of retrying.

The models are pydantic (:class:`~kubeforge_runtime.configmodel.CamelConfig`: snake_case
attributes, camelCase keys); the operator renders the QuantizeJob API's sub-models into this
shape, and a contract test compares the two schemas (types, bounds, enums). Nothing heavier
than pydantic is imported here, so the operator's tests may import this module to check that
what they render parses.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .. import configmodel
from ..configfile import read_config_object
from ..configmodel import CamelConfig

Method = Literal["int8-dynamic", "int8-weight-only", "int4-weight-only", "int4-weight-only-awq", "fp16", "bf16"]
METHODS: tuple[str, ...] = typing.get_args(Method)
"""Method names accepted in ``method``; the registry in ``methods.py`` implements each."""

CALIBRATED_METHODS: dict[str, str] = {"int4-weight-only-awq": "int4-weight-only"}
"""Methods that read ``calibration`` -> the same method without calibration, which the report
measures on the same data next to it."""

GroupSize = Literal[32, 64, 128]
GROUP_SIZES: tuple[int, ...] = typing.get_args(GroupSize)
"""Group sizes int4 accepts: the CPU tinygemm kernel takes exactly these (CUDA also 256)."""

TaskMetric = Literal["accuracy", "exactMatch", "f1", "passAtOne"]
TASK_METRICS: tuple[str, ...] = typing.get_args(TaskMetric)
"""Task metrics ``kubeforge_runtime.evaluate`` computes."""


class ConfigError(ValueError):
    """The config is invalid; the message names the offending key and what to change."""


class _Frozen(CamelConfig):
    model_config = ConfigDict(frozen=True)


class ModelSource(_Frozen):
    """The model to compress (the operator resolves ``fineTuneJobRef`` to this URI)."""

    uri: str = Field(min_length=1)
    """file://, pvc://, hf:// or s3:// (see storage.py): a full model dir or a LoRA adapter dir
    (merged into its base first)."""


class CalibrationSpec(_Frozen):
    """Calibration data, read by the calibrating methods (``CALIBRATED_METHODS``: AWQ) and
    by no other; a non-calibrating method given a ``uri`` says so in its report message."""

    uri: str | None = None
    """Dataset URI (JSONL with "text", or "prompt" + "completion"), or null; required by a
    calibrating method."""
    samples: int = Field(128, ge=1, le=100000)
    """How many records a calibrating method reads (tokenized, cut into windows of
    ``evaluation.sequenceLength`` tokens)."""


class TaskSpec(_Frozen):
    """A held-out task metric measured on the input and the output (``evaluate.py``)."""

    uri: str = Field(min_length=1)
    """JSONL of prompt-completion or chat records (the format is read from the records)."""
    metric: TaskMetric
    """One of TASK_METRICS."""
    max_samples: int = Field(200, ge=1, le=100000)
    """At most this many records are evaluated."""


class EvaluationSpec(_Frozen):
    """Where and how quality is measured before and after quantization."""

    uri: str | None = None
    """JSONL with "text" (or "prompt" + "completion", concatenated); null: the runtime's
    reference text (see ``quantize/data.py``)."""
    max_perplexity_increase_percent: float = Field(1.0, ge=0, le=1000)
    """The quality gate: a larger relative perplexity increase rejects the output."""
    max_samples: int = Field(64, ge=1, le=100000)
    """At most this many records are read from the evaluation set."""
    sequence_length: int = Field(256, ge=8, le=131072)
    """Tokens per evaluation window (the records' tokens are concatenated, then cut)."""
    task: TaskSpec | None = None
    """The task metric, or null for perplexity only."""
    max_accuracy_drop_points: float | None = Field(None, ge=0, le=100)
    """The task metric's gate: a larger drop in percentage points rejects the output."""

    @model_validator(mode="after")
    def _gate_needs_task(self) -> "EvaluationSpec":
        if self.max_accuracy_drop_points is not None and self.task is None:
            raise ValueError("'evaluation.maxAccuracyDropPoints' gates the task metric: set evaluation.task too")
        return self


class OutputSpec(_Frozen):
    """Where the quantized model is written."""

    uri: str = Field(min_length=1)
    """file:// or pvc:// (a mounted volume), or s3:// (staged locally, uploaded with the lineage record last)."""


class QuantizeConfig(_Frozen):
    """A parsed, validated QuantizeJob runtime config."""

    kind: Literal["QuantizeJob"] = "QuantizeJob"
    """Always QuantizeJob."""
    name: str = Field("quantize", min_length=1)
    """The QuantizeJob's name (written to the lineage record)."""
    namespace: str = Field("default", min_length=1)
    """The QuantizeJob's namespace."""
    model: ModelSource
    """The model to compress."""
    method: Method
    """The quantization method (``methods.REGISTRY``)."""
    group_size: GroupSize = 128
    """int4 group size; it must divide the layers' input widths (layers it does not divide stay
    in full precision)."""
    quantize_embeddings: bool = True
    """int8/int4 methods: also quantize the input embedding and the (tied or untied) output
    embedding ``lm_head`` to int8 (one scale per 32 values of a row); false keeps them in the model's dtype."""
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    """Calibration data (read by the methods in ``CALIBRATED_METHODS`` only)."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Quality measurement and gates."""
    output: OutputSpec
    """Where the result is written."""

    @model_validator(mode="after")
    def _calibrating_method_needs_data(self) -> "QuantizeConfig":
        if self.method in CALIBRATED_METHODS and self.calibration.uri is None:
            raise ValueError(f"method {self.method!r} calibrates on your data: set 'calibration.uri' (JSONL with "
                             "'text', or 'prompt' and 'completion' records)")
        return self


def parse_config(data: Any) -> QuantizeConfig:
    """Validate a decoded config object and return it typed; raise ConfigError otherwise."""
    return configmodel.parse(QuantizeConfig, data, ConfigError)


def load_config(path: str | Path) -> QuantizeConfig:
    """Read and parse the config file at ``path``."""
    return parse_config(read_config_object(path, ConfigError))
