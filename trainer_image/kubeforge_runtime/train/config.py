"""The training config: the FineTuneJob's training-relevant spec, as the operator renders it.

The operator writes this JSON (camelCase keys) into a ConfigMap mounted at
``contract.CONFIG_DIR/contract.CONFIG_FILE``; ``launch.py`` (preflight) and the trainer
(``python -m kubeforge_runtime.train``) both parse it with :func:`parse_config`. Parsing is
strict: an unknown key is an error naming the key, a wrong type or an out-of-range value is
an error naming the field, and every error is a :class:`ConfigError` (exit code 78 in the
pod), because retrying a bad config can never help.

Each dataclass field has a docstring; missing optional keys take the defaults below.
Named presets (:data:`PRESETS`) give ready-made configs, including a tiny CPU preset used by
tests and examples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from ..configfile import read_config_object


class ConfigError(ValueError):
    """The config is invalid; the message names the field and says what to change."""


DatasetFormat = Literal["text", "prompt-completion", "chat"]
Method = Literal["full", "lora"]
Strategy = Literal["fsdp", "ddp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"]
PipelineSchedule = Literal["1F1B", "GPipe"]
Precision = Literal["fp32", "bf16", "fp16"]
OutputFormat = Literal["merged", "adapter"]


@dataclass
class ModelConfig:
    uri: str = ""
    """Base model: file:///path, pvc://claim/path, hf://org/name[@rev] (or org/name), s3://b/p.
    A directory written by ``save_pretrained`` (config.json, safetensors, tokenizer)."""


@dataclass
class DatasetConfig:
    uri: str = ""
    """Training data: one JSONL file (file:// or pvc://)."""
    format: DatasetFormat = "text"
    """Record shape: ``text`` ({"text"}), ``prompt-completion`` ({"prompt","completion"}; the
    loss is taken on the completion only) or ``chat`` ({"messages":[{"role","content"}]},
    rendered with the tokenizer's chat template; the loss is taken on assistant turns only)."""
    validationUri: str | None = None
    """Optional separate validation JSONL (same format). When null, ``validationSplit`` of the
    training records is held out instead."""
    validationSplit: float = 0.1
    """Fraction of training records held out for validation when ``validationUri`` is null
    (0 disables validation). The split is seeded by ``training.seed``."""
    sequenceLength: int = 512
    """Tokens per sample. Every sample is padded or packed to exactly this length (pipeline
    parallelism needs static shapes); longer records are truncated."""
    packing: bool = True
    """Concatenate tokenized records (each ending in EOS) and cut the stream into
    ``sequenceLength`` chunks, instead of padding each record on its own. Packed records do
    not attend to each other (position ids restart per record; see data.py)."""


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targetModules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear module names that get adapters (peft ``target_modules``)."""


@dataclass
class ParallelismConfig:
    tensor: int = 1
    """Tensor-parallel degree (DTensor; heads, KV heads, hidden and FFN sizes must divide by it).
    Tensor-parallel groups are the innermost mesh dimension, so keep them inside one node."""
    pipeline: int = 1
    """Pipeline-parallel degree (torch.distributed.pipelining); decoder layers are split into
    this many contiguous stages. The data-parallel degree is world_size / (tensor*pipeline)."""
    strategy: Strategy = "fsdp"
    """Data-parallel strategy: ``fsdp`` (FSDP2 ``fully_shard``: parameters, gradients and
    optimizer state sharded, the ZeRO-3 equivalent), ``ddp`` (replicated), or
    ``deepspeed-zero1|2|3`` (DeepSpeed ZeRO: optimizer state, plus gradients, plus
    parameters partitioned; data parallel only, fp32 or bf16; see train/zero.py)."""
    pipelineSchedule: PipelineSchedule = "1F1B"
    """Pipeline schedule when ``pipeline`` > 1: ``1F1B`` (needs at least ``pipeline``
    micro-batches per data-parallel rank and step) or ``GPipe``."""


@dataclass
class TrainingConfig:
    epochs: int = 1
    """Passes over the training set (ignored when ``maxSteps`` is set)."""
    maxSteps: int | None = None
    """Optimizer steps to run; overrides ``epochs``."""
    globalBatchSize: int = 8
    """Samples per optimizer step, over all data-parallel ranks."""
    microBatchSize: int = 1
    """Samples per forward/backward on one rank (and per pipeline micro-batch). Gradient
    accumulation = globalBatchSize / (microBatchSize * dataParallel)."""
    learningRate: float = 1e-4
    """Peak AdamW learning rate: linear warmup to it, then cosine decay to 10% of it."""
    warmupSteps: int = 0
    """Linear warmup steps."""
    weightDecay: float = 0.0
    """AdamW weight decay (applied to matrices only, not to norms and biases)."""
    maxGradNorm: float = 1.0
    """Clip the whole gradient to this L2 norm before each optimizer step (0 disables)."""
    seed: int = 42
    """Seed for weight init of adapters, the data order, the validation split and dropout."""
    precision: Precision = "fp32"
    """Compute precision: ``fp32``; ``bf16`` (autocast, fp32 master weights); ``fp16``
    (autocast plus loss scaling: CUDA only, and only without pipeline parallelism)."""
    gradientCheckpointing: bool = False
    """Recompute decoder-layer activations in backward to save memory."""
    evalIntervalSteps: int = 0
    """Evaluate on the validation set every N steps (0: only before the first and after the
    last step)."""


@dataclass
class CheckpointConfig:
    intervalSteps: int = 100
    """Save a torch.distributed.checkpoint every N steps (0 disables periodic saves; a
    checkpoint is still written on SIGTERM and at the end)."""
    keepLast: int = 2
    """Completed checkpoints to keep; older ones are deleted."""
    uri: str | None = None
    """Where checkpoints go (file:// or pvc://, on a volume every worker can write);
    null means ``<output path>/checkpoints``."""


@dataclass
class OutputConfig:
    uri: str = ""
    """Where the trained model is written (file:// or pvc://)."""
    format: OutputFormat = "merged"
    """``merged``: a full model (LoRA merged into the base weights); ``adapter``: only the peft
    adapter (``method: lora`` only)."""


@dataclass
class EvaluationConfig:
    uri: str = ""
    """Held-out JSONL (prompt-completion or chat; passAtOne records carry "tests"). Its
    records are removed from the training data, and the metric is measured by greedy
    generation on the base model before training and on the output after it."""
    metric: Literal["accuracy", "exactMatch", "f1", "passAtOne"] = "accuracy"
    """How an answer is scored (``kubeforge_runtime.evaluate``)."""
    maxSamples: int = 200
    """Records evaluated (the first N of the file)."""


@dataclass
class TrainConfig:
    """The whole rendered config (the FineTuneJob spec's training subset)."""

    kind: str = "FineTuneJob"
    """Always FineTuneJob."""
    name: str = "finetune"
    """The FineTuneJob's name (used in logs and the lineage record)."""
    namespace: str = "default"
    """The FineTuneJob's namespace."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """Training (and validation) data."""
    method: Method = "full"
    """``full`` fine-tuning or ``lora`` adapters."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (used when method is lora)."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Tensor/pipeline degrees and the data-parallel strategy."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where and how the result is written."""
    evaluation: EvaluationConfig | None = None
    """A held-out task metric measured before and after training, or null."""

    def to_dict(self) -> dict[str, Any]:
        """The config as the camelCase JSON dict it was parsed from (defaults filled in)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --- parsing ------------------------------------------------------------------------------

def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a (simple) type annotation; return it, converted where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(path, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    return value


def _build(cls: Any, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys{' in ' + path if path else ''}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(f"{path}.{name}" if path else name, value, hints[name])
    return cls(**kwargs)


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from the rendered JSON dict and validate it."""
    cfg = _build(TrainConfig, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and parse the config file at ``path``."""
    return parse_config(read_config_object(path, ConfigError))


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model, data or world size (those live in launch.py/ParallelDims)."""
    if cfg.kind != "FineTuneJob":
        raise ConfigError(f"kind: expected FineTuneJob, got {cfg.kind!r}")
    if not cfg.model.uri:
        raise ConfigError("model.uri: required (the base model directory or hub id)")
    if not cfg.dataset.uri:
        raise ConfigError("dataset.uri: required (a JSONL file)")
    if not cfg.output.uri:
        raise ConfigError("output.uri: required (where the trained model is written)")
    d, t, p, lo = cfg.dataset, cfg.training, cfg.parallelism, cfg.lora
    if not 0.0 <= d.validationSplit < 1.0:
        raise ConfigError(f"dataset.validationSplit: {d.validationSplit} must be in [0, 1)")
    if d.sequenceLength < 2:
        raise ConfigError(f"dataset.sequenceLength: {d.sequenceLength} must be at least 2")
    for name in ("tensor", "pipeline"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallelism.{name}: must be >= 1")
    if p.strategy.startswith("deepspeed") and (p.tensor > 1 or p.pipeline > 1):
        raise ConfigError(
            f"parallelism.strategy {p.strategy!r} runs data parallel only: set tensor and pipeline to 1, "
            "or use 'fsdp' to combine data parallelism with tensor/pipeline parallelism"
        )
    if p.strategy.startswith("deepspeed") and t.precision == "fp16":
        raise ConfigError(f"training.precision fp16 is not supported with {p.strategy!r}; use bf16 or fp32")
    if t.epochs < 1:
        raise ConfigError("training.epochs: must be >= 1")
    if t.maxSteps is not None and t.maxSteps < 1:
        raise ConfigError("training.maxSteps: must be >= 1 or null")
    if t.globalBatchSize < 1 or t.microBatchSize < 1:
        raise ConfigError("training.globalBatchSize and training.microBatchSize: must be >= 1")
    if t.globalBatchSize % t.microBatchSize:
        raise ConfigError(
            f"training.globalBatchSize ({t.globalBatchSize}) must be a multiple of "
            f"training.microBatchSize ({t.microBatchSize})"
        )
    if t.learningRate <= 0:
        raise ConfigError("training.learningRate: must be > 0")
    if t.warmupSteps < 0 or t.weightDecay < 0 or t.evalIntervalSteps < 0 or t.maxGradNorm < 0:
        raise ConfigError("training.warmupSteps, weightDecay, maxGradNorm and evalIntervalSteps: must be >= 0")
    if cfg.checkpoint.intervalSteps < 0 or cfg.checkpoint.keepLast < 1:
        raise ConfigError("checkpoint.intervalSteps must be >= 0 and checkpoint.keepLast >= 1")
    if cfg.method == "lora":
        if lo.r < 1 or lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0 or not lo.targetModules:
            raise ConfigError("lora: r >= 1, alpha > 0, 0 <= dropout < 1 and a non-empty targetModules")
    if cfg.evaluation is not None:
        if not cfg.evaluation.uri:
            raise ConfigError("evaluation.uri: required (a held-out JSONL file)")
        if cfg.evaluation.maxSamples < 1:
            raise ConfigError("evaluation.maxSamples: must be >= 1")
        if d.format == "text":
            raise ConfigError("evaluation needs prompts and answers: dataset.format must be prompt-completion or chat")
    if cfg.output.format == "adapter" and cfg.method != "lora":
        raise ConfigError("output.format: 'adapter' needs method 'lora'; use 'merged' for full fine-tuning")
    if t.precision == "fp16" and p.pipeline > 1:
        raise ConfigError("training.precision: fp16 loss scaling is not supported with pipeline parallelism; use bf16")


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
