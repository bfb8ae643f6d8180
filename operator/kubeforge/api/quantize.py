"""QuantizeJob: compress a model and measure what it cost (size, latency, quality)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from kubeforge_runtime import contract

from .base import (
    S3_ENV_CEL_RULE, S3_ENV_MESSAGE, Condition, Kind, KFModel, ObjectReference, Phase, PodTemplateOverride,
    ResourcesSpec, StorageSpec, cel, cel_list, s3_env_conflicts,
)
from .finetune import (
    DATA_URI_PATTERN, MODEL_URI_PATTERN, OUTPUT_URI_PATTERN, URI_MAX_LENGTH, OutputStatus, TaskEvaluationSpec,
    TaskMetricResult,
)


class QuantizeModelSource(KFModel):
    """The model to compress: exactly one of uri or fineTuneJobRef."""

    uri: str | None = Field(default=None, pattern=MODEL_URI_PATTERN, max_length=URI_MAX_LENGTH, description="hf://, pvc://, s3:// or file:/// URI of the model.")
    fine_tune_job_ref: ObjectReference | None = Field(
        default=None, description="Use the output of this FineTuneJob once it has succeeded."
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("has(self.uri) != has(self.fineTuneJobRef)",
            "model: give exactly one of uri or fineTuneJobRef", reason="FieldValueInvalid"),
    ]})

    @model_validator(mode="after")
    def _exactly_one(self) -> "QuantizeModelSource":
        if (self.uri is None) == (self.fine_tune_job_ref is None):
            raise ValueError("model: give exactly one of uri or fineTuneJobRef")
        return self


class CalibrationSpec(KFModel):
    """Calibration data, read by the calibrating method (int4-weight-only-awq) and by no other."""

    uri: str | None = Field(
        default=None, pattern=DATA_URI_PATTERN, max_length=URI_MAX_LENGTH,
        description="JSONL calibration data (records with \"text\", or \"prompt\" and \"completion\"): required by "
        "int4-weight-only-awq; any other method does not read it and says so in its condition message.")
    samples: int = Field(
        default=128, ge=1, le=100000,
        description="Records read for calibration, cut into windows of evaluation.sequenceLength tokens. AWQ keeps "
        "every layer's inputs in memory: about 300 KB per token on a 135 M-parameter model.")


class EvaluationSpec(KFModel):
    """How quality is measured and the gate it must pass."""

    uri: str | None = Field(
        default=None, pattern=DATA_URI_PATTERN, max_length=URI_MAX_LENGTH,
        description="JSONL text for perplexity; when unset, the runtime's reference text (real English prose "
        "from other projects' documentation, in no training set).",
    )
    max_perplexity_increase_percent: float = Field(
        default=1.0, ge=0, le=1000, description="Quality gate: fail when perplexity rises by more than this percentage."
    )
    max_samples: int = Field(default=64, ge=1, le=100000, description="Evaluation samples used.")
    sequence_length: int = Field(default=256, ge=8, le=131072, description="Tokens per evaluation sequence.")
    task: TaskEvaluationSpec | None = Field(
        default=None, description="A held-out task metric measured on the input and on the quantized output.",
    )
    max_accuracy_drop_points: float | None = Field(
        default=None, ge=0, le=100,
        description="Quality gate on the task metric: fail when it drops by more than this many percentage points.",
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.maxAccuracyDropPoints) || has(self.task)",
            "evaluation.maxAccuracyDropPoints gates the task metric: set evaluation.task too", ".maxAccuracyDropPoints"),
    ]})

    @model_validator(mode="after")
    def _gate_needs_task(self) -> "EvaluationSpec":
        if self.max_accuracy_drop_points is not None and self.task is None:
            raise ValueError("evaluation.maxAccuracyDropPoints gates the task metric: set evaluation.task too")
        return self


class QuantizeOutputSpec(KFModel):
    """Where the compressed model is written."""

    uri: str = Field(pattern=OUTPUT_URI_PATTERN, max_length=URI_MAX_LENGTH, description="pvc://claim/path, s3://bucket/path or file:///path.")


CALIBRATED_METHODS = ("int4-weight-only-awq",)
"""Methods that read calibration data (kubeforge_runtime.quantize.config.CALIBRATED_METHODS)."""
CALIBRATION_MESSAGE = ("method int4-weight-only-awq calibrates on your data: set calibration.uri (JSONL with 'text', "
                       "or 'prompt' and 'completion' records), or choose int4-weight-only")


class QuantizeJobSpec(KFModel):
    """Desired state of a QuantizeJob."""

    model: QuantizeModelSource = Field(description="The model to compress.")
    method: Literal["int8-dynamic", "int8-weight-only", "int4-weight-only", "int4-weight-only-awq", "fp16", "bf16"] = Field(
        default="int8-dynamic",
        description="int8-dynamic: int8 weights and dynamically quantized activations; int8/int4-weight-only; "
        "int4-weight-only-awq: int4 weight-only with AWQ scales calibrated on calibration.uri (the report shows "
        "int4-weight-only's quality on the same data next to it); fp16; bf16.",
    )
    group_size: Literal[32, 64, 128] = Field(
        default=128, description="Group size for int4-weight-only: 32, 64 or 128 (what the int4 kernels support)."
    )
    quantize_embeddings: bool = Field(
        default=True,
        description="int8/int4 methods: also quantize the input embedding and the (tied or untied) output embedding "
        "(lm_head) to int8, one scale per 32 values of a row; on a small model they are a fifth of the weights. "
        "false keeps them in full precision.",
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Calibration data.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Quality measurement and gate.")
    output: QuantizeOutputSpec = Field(description="Where the result is written.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources of the quantizer pod.")
    backoff_limit: int = Field(default=1, ge=0, le=10, description="Pod failures before the job fails.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Fail with DeadlineExceeded after this long.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete the job this long after it finishes.")
    template: PodTemplateOverride = Field(default_factory=PodTemplateOverride, description="Pod overrides.")
    storage: StorageSpec | None = Field(
        default=None, description="Remote storage access: storage.s3 for s3:// URIs (credentials by Secret reference).")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(S3_ENV_CEL_RULE, S3_ENV_MESSAGE, ".storage"),
        cel(f"!has(self.method) || !({cel_list(CALIBRATED_METHODS)}.exists(m, m == self.method)) || "
            "(has(self.calibration) && has(self.calibration.uri))",
            CALIBRATION_MESSAGE, ".calibration.uri", reason="FieldValueRequired"),
    ]})

    @model_validator(mode="after")
    def _calibration_data(self) -> "QuantizeJobSpec":
        if self.method in CALIBRATED_METHODS and self.calibration.uri is None:
            raise ValueError(CALIBRATION_MESSAGE)
        return self

    @model_validator(mode="after")
    def _s3_env(self) -> "QuantizeJobSpec":
        s3_env_conflicts(self.storage, self.template)
        return self

    @model_validator(mode="after")
    def _output_apart_from_input(self) -> "QuantizeJobSpec":
        # The quantizer clears weight files in its output before saving. Compared after
        # normalisation. No CEL twin (CEL cannot resolve ".."): the API server admits such a
        # spec, the operator marks it Invalid, and the quantizer itself refuses it (exit 78).
        if self.model.uri and contract.uris_overlap(self.model.uri, self.output.uri):
            raise ValueError(
                f"output.uri {self.output.uri} overlaps model.uri {self.model.uri}: the quantizer replaces the "
                "weight files in its output, so it would delete its own input; choose an output.uri outside "
                "the model's directory")
        return self


class LatencyResult(KFModel):
    """Median milliseconds per generated token."""

    before: float | None = Field(default=None, description="Original model.")
    after: float | None = Field(default=None, description="Quantized model.")


class PerplexityResult(KFModel):
    """Perplexity on the evaluation set."""

    before: float | None = Field(default=None, description="Original model.")
    after: float | None = Field(default=None, description="Quantized model.")


class UncalibratedTask(KFModel):
    """A task metric of one model (a fraction: 0.9 is 90 %)."""

    metric: str | None = Field(default=None, description="accuracy, exactMatch, f1 or passAtOne.")
    value: float | None = Field(default=None, description="The score.")


class UncalibratedResult(KFModel):
    """A calibrating method's report: the same method without calibration, on the same data."""

    method: str | None = Field(default=None, description="The method without calibration (e.g. int4-weight-only).")
    perplexity: float | None = Field(default=None, description="Its perplexity on the evaluation set.")
    perplexity_increase_percent: float | None = Field(default=None, description="Its perplexity change in percent.")
    task: UncalibratedTask | None = Field(default=None, description="Its task metric, when evaluation.task is set.")


class QuantizeResult(KFModel):
    """What compression cost, as measured by the quantizer."""

    method: str | None = Field(default=None, description="Method applied.")
    original_bytes: int | None = Field(default=None, description="Size of the original weights.")
    quantized_bytes: int | None = Field(default=None, description="Size of the quantized weights.")
    compression_ratio: float | None = Field(default=None, description="originalBytes / quantizedBytes.")
    latency_ms_per_token: LatencyResult | None = Field(default=None, description="Latency per generated token.")
    perplexity: PerplexityResult | None = Field(default=None, description="Perplexity before and after.")
    perplexity_increase_percent: float | None = Field(default=None, description="Relative perplexity change in percent.")
    task: TaskMetricResult | None = Field(default=None, description="The task metric of the input and the output.")
    task_drop_points: float | None = Field(default=None, description="(before - after) x 100: percentage points lost.")
    uncalibrated: UncalibratedResult | None = Field(
        default=None, description="A calibrating method only: the same method without calibration on the same data.")
    latency_path: str | None = Field(default=None, description="How latency was measured: the serving engine, device, "
                                     "eager or compiled (the InferenceService default engine.compile), batch.")
    latency_note: str | None = Field(default=None, description="Why the method is not fast on this device and path, "
                                     "or that it measured slower than the original; absent when there is nothing to say.")
    gate_passed: bool | None = Field(default=None, description="Whether the quality gate passed.")
    lineage_digest: str | None = Field(
        default=None, description="sha256 of the output's lineage record (kubeforge.json; `kubeforge audit` shows it).")


class QuantizeJobStatus(KFModel):
    """Observed state of a QuantizeJob. Written by the operator only."""

    phase: Phase | None = Field(default=None, description="Pending, WaitingForInput, Running, Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions by the Kubernetes API conventions.")
    observed_generation: int | None = Field(default=None, description="The spec generation last reconciled.")
    model_uri: str | None = Field(default=None, description="The model URI resolved from the spec or the referenced job.")
    result: QuantizeResult | None = Field(default=None, description="Measured result.")
    output: OutputStatus | None = Field(default=None, description="The result, once succeeded.")
    start_time: str | None = Field(default=None, description="When the quantizer pod started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")


class QuantizeJob(Kind):
    kind = "QuantizeJob"
    plural = "quantizejobs"
    short_names = ["qj"]
    spec_model = QuantizeJobSpec
    status_model = QuantizeJobStatus
    description = "QuantizeJob compresses a model and measures its size, latency and quality before and after."
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
        {"name": "Ratio", "type": "number", "jsonPath": ".status.result.compressionRatio"},
        {"name": "Gate", "type": "boolean", "jsonPath": ".status.result.gatePassed"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
