"""The training config: the FineTuneJob's training-relevant spec, as the operator renders it.

The operator writes this JSON (camelCase keys) into a ConfigMap mounted at
``contract.CONFIG_DIR/contract.CONFIG_FILE``; ``launch.py`` (preflight) and the trainer
(``python -m kubeforge_runtime.train``) both parse it with :func:`parse_config`. The models
are pydantic (:class:`~kubeforge_runtime.configmodel.StrictConfig`), with the JSON keys as
attribute names (``cfg.training.maxSteps``); the operator renders the FineTuneJob API's
sub-models into exactly this shape, and a contract test compares the two schemas (types,
bounds, enums). Parsing is strict: an unknown key is an error naming the key, a wrong type
or an out-of-range value is an error naming the field, and every error is a
:class:`ConfigError` (exit code 78 in the pod), because retrying a bad config can never help.

Each field has a docstring; missing optional keys take the defaults below (some differ from
the API's, which the operator always writes out). Named presets (:data:`PRESETS`) give
ready-made configs, including a tiny CPU preset used by tests and examples.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from .. import configmodel
from ..pii import PiiKind
from ..configfile import read_config_object
from ..configmodel import StrictConfig


QLORA_LAYOUT = ("method qlora runs data parallel with FSDP2 only (the NF4 base shards with fully_shard): set "
                "parallelism.strategy fsdp, tensor 1 and pipeline 1, or use method lora")


class ConfigError(ValueError):
    """The config is invalid; the message names the field and says what to change."""


DatasetFormat = Literal["text", "prompt-completion", "chat"]
Method = Literal["full", "lora", "qlora", "distill"]
ADAPTER_METHODS = ("lora", "qlora")
"""Methods that train LoRA adapters (on a frozen base: plain for lora, NF4-quantized for qlora)."""
Strategy = Literal["fsdp", "ddp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"]
PipelineSchedule = Literal["1F1B", "GPipe"]
Precision = Literal["fp32", "bf16", "fp16"]
OutputFormat = Literal["merged", "adapter"]
TaskMetric = Literal["accuracy", "exactMatch", "f1", "passAtOne"]


class ModelConfig(StrictConfig):
    uri: str = Field(min_length=1)
    """Base model: file:///path, pvc://claim/path, hf://org/name[@rev] (or org/name), s3://b/p.
    A directory written by ``save_pretrained`` (config.json, safetensors, tokenizer)."""


class DataChecksConfig(StrictConfig):
    """Red lines on the training file, measured by the preflight (``launch.py``) before torchrun
    starts (``kubeforge_runtime/datacheck.py`` defines each measurement). Unset: not checked.
    A crossed line exits 78 with a ``DataQualityReport`` in the termination log."""

    maxUnparseableShare: float | None = Field(None, ge=0, le=1)
    """Most bad lines (invalid JSON, or not a record of the format) as a fraction of the
    non-blank lines of ``dataset.uri``; bad lines under it are skipped by the trainer. Unset:
    any bad line is an error (the strict default)."""
    maxDuplicateShare: float | None = Field(None, ge=0, le=1)
    """Most records repeating an earlier one by ``data.normalized_key`` (exact and near
    duplicates), as a fraction of the records."""
    maxLabelImbalance: float | None = Field(None, ge=1)
    """Largest most/least frequent label ratio; labels are completions (prompt-completion) or
    last assistant messages (chat). Not for format text."""
    minRecords: int | None = Field(None, ge=1)
    """Fewest valid records."""
    maxOverlongShare: float | None = Field(None, ge=0, le=1)
    """Most records longer than ``sequenceLength`` tokens (as tokenised for training), as a
    fraction of the records."""
    maxPiiShare: float | None = Field(None, ge=0, le=1)
    """Most records holding personal data of any kind ``kubeforge_runtime.pii`` finds, in the
    strings trained on, as a fraction of the records (measured before ``dataset.redact``)."""


class DatasetConfig(StrictConfig):
    uri: str = Field(min_length=1)
    """Training data: one JSONL file (file://, pvc://, or s3://bucket/key: that one object)."""
    format: DatasetFormat = "text"
    """Record shape: ``text`` ({"text"}), ``prompt-completion`` ({"prompt","completion"}; the
    loss is taken on the completion only) or ``chat`` ({"messages":[{"role","content"}]},
    rendered with the tokenizer's chat template; the loss is taken on assistant turns only)."""
    validationUri: str | None = None
    """Optional separate validation JSONL (same format). When null, ``validationSplit`` of the
    training records is held out instead."""
    validationSplit: float = Field(0.1, ge=0, lt=1)
    """Fraction of training records held out for validation when ``validationUri`` is null
    (0 disables validation). The split is seeded by ``training.seed``."""
    sequenceLength: int = Field(512, ge=8, le=131072)
    """Tokens per sample. Every sample is padded or packed to exactly this length (pipeline
    parallelism needs static shapes); longer records are truncated."""
    packing: bool = True
    """Concatenate tokenized records (each ending in EOS) and cut the stream into
    ``sequenceLength`` chunks, instead of padding each record on its own. Packed records do
    not attend to each other (position ids restart per record; see data.py)."""
    redact: list[PiiKind] = Field(default_factory=list, max_length=5)
    """Kinds of personal data (``email``, ``phone``, ``ipAddress``, ``creditCard``,
    ``idNumber``) replaced by typed placeholders (``<EMAIL>``, ...) in the training and
    validation records before tokenising (``kubeforge_runtime.pii``); the files are not
    changed. Counts per kind are logged and written to the lineage record."""
    checks: DataChecksConfig | None = None
    """Data red lines checked by the preflight (null: none)."""

    @model_validator(mode="after")
    def _labels_need_answers(self) -> "DatasetConfig":
        if self.checks is not None and self.checks.maxLabelImbalance is not None and self.format == "text":
            raise ValueError("dataset.checks.maxLabelImbalance needs labels: set dataset.format to prompt-completion "
                             "or chat, or remove maxLabelImbalance")
        return self

    @property
    def skip_unparseable(self) -> bool:
        """Bad lines are skipped (not an error) when maxUnparseableShare bounds them."""
        return self.checks is not None and self.checks.maxUnparseableShare is not None


class LoraConfig(StrictConfig):
    r: int = Field(8, ge=1, le=1024)
    """LoRA rank."""
    alpha: int = Field(16, ge=1, le=4096)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    targetModules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    """Linear module names that get adapters (peft ``target_modules``)."""


class ParallelismConfig(StrictConfig):
    tensor: int = Field(1, ge=1, le=64)
    """Tensor-parallel degree (DTensor; heads, KV heads, hidden and FFN sizes must divide by it).
    Tensor-parallel groups are the innermost mesh dimension, so keep them inside one node.
    Needs strategy ``fsdp`` when > 1 (ddp and DeepSpeed replicate or partition whole layers)."""
    pipeline: int = Field(1, ge=1, le=64)
    """Pipeline-parallel degree (torch.distributed.pipelining); decoder layers are split into
    this many contiguous stages. The data-parallel degree is world_size / (tensor*pipeline)."""
    strategy: Strategy = "fsdp"
    """Data-parallel strategy: ``fsdp`` (FSDP2 ``fully_shard``: parameters, gradients and
    optimizer state sharded, the ZeRO-3 equivalent; combines with tensor and pipeline
    parallelism), ``ddp`` (replicated; not with tensor parallelism), or
    ``deepspeed-zero1|2|3`` (DeepSpeed ZeRO: optimizer state, plus gradients, plus
    parameters partitioned; data parallel only, fp32 or bf16; see train/zero.py)."""
    pipelineSchedule: PipelineSchedule = "1F1B"
    """Pipeline schedule when ``pipeline`` > 1: ``1F1B`` (needs at least ``pipeline``
    micro-batches per data-parallel rank and step) or ``GPipe``."""

    @model_validator(mode="after")
    def _strategy_fits_the_degrees(self) -> "ParallelismConfig":
        if self.strategy.startswith("deepspeed") and (self.tensor > 1 or self.pipeline > 1):
            raise ValueError(
                f"parallelism.strategy {self.strategy!r} runs data parallel only: set tensor and pipeline to 1, "
                "or use 'fsdp' to combine data parallelism with tensor/pipeline parallelism"
            )
        if self.strategy == "ddp" and self.tensor > 1:
            raise ValueError(
                f"parallelism.strategy ddp cannot be combined with parallelism.tensor {self.tensor} (ddp replicates "
                "whole layers, tensor parallelism shards them): use strategy fsdp, or set tensor to 1"
            )
        return self


class TeacherConfig(StrictConfig):
    uri: str = Field(min_length=1)
    """The teacher model (a directory written by ``save_pretrained``, any URI ``model.uri``
    takes); the operator writes the resolved output of a ``fineTuneJobRef`` here."""


class DistillationConfig(StrictConfig):
    """Knowledge distillation (``method: distill``): the student (``model``) learns from the
    teacher's token distributions as well as from the labels (``train/distill.py``)."""

    teacher: TeacherConfig
    """The teacher; it must share the student's tokenizer (checked by the preflight)."""
    temperature: float = Field(2.0, gt=0, le=100)
    """Softmax temperature T of both distributions in the KL term (scaled by T^2)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the ordinary (label) loss: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)."""


class TrainingConfig(StrictConfig):
    epochs: int = Field(1, ge=1, le=1000)
    """Passes over the training set (ignored when ``maxSteps`` is set)."""
    maxSteps: int | None = Field(None, ge=1)
    """Optimizer steps to run; overrides ``epochs``."""
    globalBatchSize: int = Field(8, ge=1)
    """Samples per optimizer step, over all data-parallel ranks."""
    microBatchSize: int = Field(1, ge=1)
    """Samples per forward/backward on one rank (and per pipeline micro-batch). Gradient
    accumulation = globalBatchSize / (microBatchSize * dataParallel)."""
    learningRate: float = Field(1e-4, gt=0, le=1)
    """Peak AdamW learning rate: linear warmup to it, then cosine decay to 10% of it."""
    warmupSteps: int = Field(0, ge=0)
    """Linear warmup steps."""
    weightDecay: float = Field(0.0, ge=0, le=1)
    """AdamW weight decay (applied to matrices only, not to norms and biases)."""
    maxGradNorm: float = Field(1.0, ge=0)
    """Clip the whole gradient to this L2 norm before each optimizer step (0 disables)."""
    seed: int = Field(42, ge=0)
    """Seed for weight init of adapters, the data order, the validation split and dropout."""
    precision: Precision = "fp32"
    """Compute precision: ``fp32``; ``bf16`` (autocast, fp32 master weights); ``fp16``
    (autocast plus loss scaling: CUDA only, and only without pipeline parallelism)."""
    gradientCheckpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder block (``train/compiled.py``); ``auto``: on CUDA only."""
    fused: Literal["auto", "on", "off"] = "auto"
    """Fused RMSNorm, RoPE and lm_head + cross-entropy (``train/fused.py``, where they apply);
    ``auto``: off for now (not measured faster on a whole step); ``on`` holds fewer tensors."""
    mergedProjections: Literal["auto", "on", "off"] = "auto"
    """One GEMM for q/k/v and one for gate/up per decoder layer (``train/merged.py``, where the
    weights are plain whole tensors; parameter names unchanged); ``auto``: off for now (not
    measured faster on a whole step); never with compiled blocks."""
    attention: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = "auto"
    """Attention kernel (``train/attention.py``): ``auto`` is flash_attention_2 (varlen) on CUDA
    with flash_attn installed, else flex_attention (block mask) on CUDA, else sdpa."""
    evalIntervalSteps: int = Field(0, ge=0)
    """Evaluate on the validation set every N steps (0: only before the first and after the
    last step)."""

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> "TrainingConfig":
        if self.globalBatchSize % self.microBatchSize:
            raise ValueError(
                f"training.globalBatchSize ({self.globalBatchSize}) must be a multiple of "
                f"training.microBatchSize ({self.microBatchSize})"
            )
        return self


class CheckpointConfig(StrictConfig):
    intervalSteps: int = Field(100, ge=0)
    """Save a torch.distributed.checkpoint every N steps (0 disables periodic saves; a
    checkpoint is still written on SIGTERM and at the end)."""
    keepLast: int = Field(2, ge=1, le=100)
    """Completed checkpoints to keep; older ones are deleted."""
    uri: str | None = None
    """Where checkpoints go (file:// or pvc://, on a volume every worker can write; or s3://,
    staged locally and uploaded after each complete checkpoint); null means
    ``<output uri>/checkpoints``."""


class OutputConfig(StrictConfig):
    uri: str = Field(min_length=1)
    """Where the trained model is written (file://, pvc://, or s3://: staged locally, then
    uploaded with the lineage record last)."""
    format: OutputFormat = "merged"
    """``merged``: a full model (LoRA merged into the base weights; for qlora into the
    dequantized NF4 base, in the base's dtype); ``adapter``: only the peft adapter
    (``method: lora`` or ``qlora``)."""


class EvaluationConfig(StrictConfig):
    uri: str = Field(min_length=1)
    """Held-out JSONL (prompt-completion or chat; passAtOne records carry "tests"). Its
    records are removed from the training data, and the metric is measured by greedy
    generation on the base model before training and on the output after it."""
    metric: TaskMetric = "accuracy"
    """How an answer is scored (``kubeforge_runtime.evaluate``)."""
    maxSamples: int = Field(200, ge=1, le=100000)
    """Records evaluated (the first N of the file)."""


class TrainConfig(StrictConfig):
    """The whole rendered config (the FineTuneJob spec's training subset)."""

    kind: Literal["FineTuneJob"] = "FineTuneJob"
    """Always FineTuneJob."""
    name: str = "finetune"
    """The FineTuneJob's name (used in logs and the lineage record)."""
    namespace: str = "default"
    """The FineTuneJob's namespace."""
    model: ModelConfig
    """The base model."""
    dataset: DatasetConfig
    """Training (and validation) data."""
    method: Method = "full"
    """``full`` fine-tuning, ``lora`` adapters, ``qlora`` (LoRA adapters on a base whose
    decoder-layer linear weights are quantized to 4-bit NF4, ``train/qlora.py``), or
    ``distill`` (all weights, learning from ``distillation.teacher`` too)."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA settings (used when method is lora or qlora)."""
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    """Tensor/pipeline degrees and the data-parallel strategy."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Optimisation settings."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    output: OutputConfig
    """Where and how the result is written."""
    evaluation: EvaluationConfig | None = None
    """A held-out task metric measured before and after training, or null."""
    distillation: DistillationConfig | None = None
    """The teacher and the loss mix; required with (and only with) ``method: distill``."""

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "TrainConfig":
        """Checks that need no model, data or world size (those live in launch.py/ParallelDims)."""
        p, t = self.parallelism, self.training
        if p.strategy.startswith("deepspeed") and t.precision == "fp16":
            raise ValueError(f"training.precision fp16 is not supported with {p.strategy!r}; use bf16 or fp32")
        if self.evaluation is not None and self.dataset.format == "text":
            raise ValueError("evaluation needs prompts and answers: dataset.format must be prompt-completion or chat")
        if self.output.format == "adapter" and self.method not in ADAPTER_METHODS:
            raise ValueError("output.format: 'adapter' needs method 'lora' or 'qlora'; use 'merged' for full fine-tuning")
        if self.method == "qlora" and (p.strategy != "fsdp" or p.tensor > 1 or p.pipeline > 1):
            raise ValueError(QLORA_LAYOUT)
        if (self.method == "distill") != (self.distillation is not None):
            raise ValueError("distillation: set it together with method 'distill' (and only then): "
                             "give distillation.teacher.uri, or change method")
        if t.precision == "fp16" and p.pipeline > 1:
            raise ValueError("training.precision: fp16 loss scaling is not supported with pipeline parallelism; use bf16")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as the camelCase JSON dict it was parsed from (defaults filled in)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def parse_config(data: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from the rendered JSON dict; :class:`ConfigError` if invalid."""
    return configmodel.parse(TrainConfig, data, ConfigError, quote_keys=False)


def load_config(path: str | Path) -> TrainConfig:
    """Read and parse the config file at ``path``."""
    return parse_config(read_config_object(path, ConfigError))


# --- presets ------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and examples on CPU: the `tiny` model from kubeforge_runtime.tiny, fp32, short.
    "tiny-cpu": {
        "dataset": {"format": "text", "sequenceLength": 64, "packing": True, "validationSplit": 0.1},
        "parallelism": {"strategy": "fsdp", "pipelineSchedule": "1F1B"},
        "training": {"maxSteps": 20, "globalBatchSize": 8, "microBatchSize": 2, "learningRate": 1e-3,
                     "warmupSteps": 2, "seed": 42, "precision": "fp32"},
        "checkpoint": {"intervalSteps": 10, "keepLast": 2},
    },
    # A LoRA fine-tune of a real model on GPUs.
    "lora-gpu": {
        "method": "lora",
        "dataset": {"format": "chat", "sequenceLength": 2048, "packing": True},
        "training": {"epochs": 1, "globalBatchSize": 64, "microBatchSize": 4, "learningRate": 2e-4,
                     "warmupSteps": 20, "precision": "bf16", "gradientCheckpointing": True},
        "output": {"format": "adapter"},
    },
    # Full fine-tuning of a real model on GPUs with FSDP2.
    "full-gpu": {
        "dataset": {"format": "prompt-completion", "sequenceLength": 2048, "packing": True},
        "training": {"epochs": 1, "globalBatchSize": 64, "microBatchSize": 2, "learningRate": 2e-5,
                     "warmupSteps": 50, "weightDecay": 0.01, "precision": "bf16",
                     "gradientCheckpointing": True},
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A named preset with camelCase ``overrides`` merged in (model/dataset/output URIs are
    usually among them)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return parse_config(_merge(PRESETS[name], overrides or {}))


def preset_dict(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Like :func:`preset` but returns the JSON dict (e.g. to write a config file)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return _merge(PRESETS[name], overrides or {})
