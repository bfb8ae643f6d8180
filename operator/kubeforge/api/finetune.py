"""FineTuneJob: elastic distributed fine-tuning of a causal language model.

The spec's training-relevant part is rendered, unchanged in shape, into the config file the
trainer reads (see ``trainer_image/CONTRACT.md``); the rest drives the pods.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from .base import (
    S3_ENV_CEL_RULE, S3_ENV_MESSAGE, Condition, K8sObject, Kind, KFModel, ObjectReference, Phase, PodTemplateOverride,
    ResourcesSpec, StorageSpec, cel, s3_env_conflicts,
)

# No whitespace and no control characters anywhere in a URI (a NUL or a newline would reach
# the pod's config and arguments; the CRD's RE2 \S alone lets them through).
_PATH = r"[^\s\x00-\x1f\x7f]"
MODEL_URI_PATTERN = (r"^(hf://[^/@\s\x00-\x1f\x7f]+/[^/@\s\x00-\x1f\x7f]+(@" + _PATH + r"+)?|pvc://[a-z0-9][-a-z0-9.]*(/"
                     + _PATH + r"*)?|s3://[a-z0-9][-a-z0-9.]*(/" + _PATH + r"*)?|file:///" + _PATH + r"*)$")
DATA_URI_PATTERN = (r"^(pvc://[a-z0-9][-a-z0-9.]*/" + _PATH + r"+|s3://[a-z0-9][-a-z0-9.]*/" + _PATH + r"+|file:///"
                    + _PATH + r"+)$")
OUTPUT_URI_PATTERN = (r"^(pvc://[a-z0-9][-a-z0-9.]*(/" + _PATH + r"*)?|s3://[a-z0-9][-a-z0-9.]*(/" + _PATH
                      + r"*)?|file:///" + _PATH + r"*)$")
URI_MAX_LENGTH = 2048
"""The longest URI a spec may carry: an S3 key is at most 1024 bytes, and every URI is copied
into children (pod arguments, config maps, a pod-template annotation with its own 256 KiB
budget) and into kopf's last-handled annotation; without a bound a 300 KB URI is admitted
and then breaks every apply of the resource's children."""


class ModelSource(KFModel):
    """Where the base model comes from."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN, max_length=URI_MAX_LENGTH,
        description="hf://org/name@revision, pvc://claim/path, s3://bucket/path or file:///path.",
    )


PiiKind = Literal["email", "phone", "ipAddress", "creditCard", "idNumber"]


class DataChecksSpec(KFModel):
    """Red lines on the training data, measured by the preflight before any worker starts.

    Each is optional: unset means not checked. A crossed line fails the job at once (reason
    DataQualityFailed, exit code 78) with the measured values and thresholds in the message
    and in status.result.dataQuality; the measurements are reported when they pass too.
    """

    max_unparseable_share: float | None = Field(
        default=None, ge=0, le=1,
        description="Most lines (of dataset.uri) that may be invalid JSON or not a record of the format, as a "
        "fraction of all non-blank lines; those lines are then skipped. Unset: any bad line fails the job.",
    )
    max_duplicate_share: float | None = Field(
        default=None, ge=0, le=1,
        description="Most records that may repeat an earlier one, exactly or after normalising (whitespace "
        "collapsed, only the keys trained on compared), as a fraction of the records.",
    )
    max_label_imbalance: float | None = Field(
        default=None, ge=1,
        description="Largest ratio of the most to the least frequent label (classification data): the label is "
        "the completion (prompt-completion) or the last assistant message (chat). Not for format text.",
    )
    min_records: int | None = Field(default=None, ge=1, description="Fewest valid records the training file must have.")
    max_overlong_share: float | None = Field(
        default=None, ge=0, le=1,
        description="Most records whose tokenised length exceeds sequenceLength (they are truncated or split), "
        "as a fraction of the records.",
    )
    max_pii_share: float | None = Field(
        default=None, ge=0, le=1,
        description="Most records holding personal data (email, phone, ipAddress, creditCard, idNumber, as "
        "dataset.redact finds them) in the strings trained on, as a fraction of the records; measured on the "
        "file as written, before redaction.",
    )


LABELS_NEED_ANSWERS = ("dataset.checks.maxLabelImbalance needs labels: set dataset.format to prompt-completion or "
                       "chat, or remove maxLabelImbalance")


class DatasetSpec(KFModel):
    """Training data: JSON Lines in one of three formats."""

    uri: str = Field(pattern=DATA_URI_PATTERN, max_length=URI_MAX_LENGTH, description="JSONL file: pvc://claim/path, s3://bucket/key or file:///path.")
    format: Literal["text", "prompt-completion", "chat"] = Field(
        default="text",
        description="text: {\"text\"}; prompt-completion: {\"prompt\",\"completion\"}, loss on the completion only; "
        "chat: {\"messages\"} rendered with the tokenizer's chat template.",
    )
    validation_uri: str | None = Field(default=None, pattern=DATA_URI_PATTERN, max_length=URI_MAX_LENGTH, description="Separate validation JSONL.")
    validation_split: float = Field(
        default=0.05, ge=0, lt=1, description="Fraction held out for validation when validationUri is not given."
    )
    sequence_length: int = Field(default=512, ge=8, le=131072, description="Tokens per training sequence.")
    packing: bool = Field(default=True, description="Pack several short samples into one sequence (they do not attend to each other).")
    redact: list[PiiKind] = Field(
        default_factory=list, max_length=5, json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Personal data replaced by typed placeholders in what the trainer sees (the source file is not "
        "changed): email <EMAIL>, phone <PHONE>, ipAddress <IP_ADDRESS>, creditCard <CREDIT_CARD> (Luhn-valid), "
        "idNumber <ID_NUMBER> (Chinese resident ids with a valid check character, US SSNs, UK NI numbers). "
        "Counts per kind go to the trainer's log and the output's lineage record.",
    )
    checks: DataChecksSpec | None = Field(
        default=None,
        description="Red lines on the training data (unparseable, duplicate and overlong shares, label imbalance, "
        "record count), checked before training starts; a crossed line fails the job with DataQualityFailed.",
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.checks) || !has(self.checks.maxLabelImbalance) || self.format != 'text'",
            LABELS_NEED_ANSWERS, ".checks.maxLabelImbalance"),
    ]})

    @model_validator(mode="after")
    def _labels_need_answers(self) -> "DatasetSpec":
        if self.checks is not None and self.checks.max_label_imbalance is not None and self.format == "text":
            raise ValueError(LABELS_NEED_ANSWERS)
        return self


TaskMetric = Literal["accuracy", "exactMatch", "f1", "passAtOne"]


class TaskEvaluationSpec(KFModel):
    """A held-out task metric, measured by greedy generation (kubeforge_runtime/evaluate.py)."""

    uri: str = Field(
        pattern=DATA_URI_PATTERN, max_length=URI_MAX_LENGTH,
        description="Held-out JSONL in prompt-completion or chat format (passAtOne records also carry \"tests\"). "
        "For a FineTuneJob its records are removed from the training data.",
    )
    metric: TaskMetric = Field(
        description="accuracy: the answer's first line equals the label (case and trailing punctuation ignored); "
        "exactMatch / f1: SQuAD-normalised answer against the reference; passAtOne: the generated code passes "
        "the record's tests in a sandbox (time, memory, no network, scratch directory only).",
    )
    max_samples: int = Field(default=200, ge=1, le=100000, description="Records evaluated (the first N of the file).")


class LoraSpec(KFModel):
    """LoRA adapter settings (method: lora or qlora)."""

    r: int = Field(default=8, ge=1, le=1024, description="Rank of the low-rank update.")
    alpha: int = Field(default=16, ge=1, le=4096, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear modules that get adapters.",
    )


class TeacherSource(KFModel):
    """The teacher of a distillation: exactly one of uri or fineTuneJobRef."""

    uri: str | None = Field(
        default=None, pattern=MODEL_URI_PATTERN, max_length=URI_MAX_LENGTH,
        description="hf://org/name@revision, pvc://claim/path, s3://bucket/path or file:///path of a full (or merged) "
        "model.",
    )
    fine_tune_job_ref: ObjectReference | None = Field(
        default=None, description="Use the output of this FineTuneJob (output.format merged) once it has succeeded; "
        "the job waits for it (phase Pending, condition InputReady=False).",
    )

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("has(self.uri) != has(self.fineTuneJobRef)",
            "distillation.teacher: give exactly one of uri or fineTuneJobRef", reason="FieldValueInvalid"),
    ]})

    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherSource":
        if (self.uri is None) == (self.fine_tune_job_ref is None):
            raise ValueError("distillation.teacher: give exactly one of uri or fineTuneJobRef")
        return self


class DistillationSpec(KFModel):
    """Knowledge distillation (method: distill): the model (the student) learns from the teacher's
    token distributions as well as from the labels."""

    teacher: TeacherSource = Field(description="The teacher; it must share the model's tokenizer (checked before "
                                   "training starts, exit code 78 naming both).")
    temperature: float = Field(default=2.0, gt=0, le=100, description="Softmax temperature T of both distributions "
                               "in the KL term, which is scaled by T^2.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the ordinary (label) loss: loss = alpha * CE "
                         "+ (1 - alpha) * T^2 * KL(teacher || student), over the tokens the ordinary loss is taken on.")


DISTILL_NEEDS_TEACHER = ("method distill needs spec.distillation (its teacher), and distillation is only used with "
                         "method distill: set both, or neither")

DDP_WITH_TENSOR = ("parallelism.strategy ddp cannot be combined with parallelism.tensor > 1 (ddp replicates whole "
                   "layers, tensor parallelism shards them): use strategy fsdp, or set parallelism.tensor to 1")
GPU_ATTENTION = ("training.attention flex_attention and flash_attention_2 train on CUDA GPUs only (flex attention has "
                 "no CPU backward; flash-attention is CUDA-only): set resources.gpus, or use training.attention auto "
                 "or sdpa")
QLORA_LAYOUT = ("method qlora runs data parallel with FSDP2 only (its NF4 base shards with fully_shard): set "
                "parallelism.strategy fsdp, parallelism.tensor 1 and parallelism.pipeline 1, or use method lora")
ADAPTER_NEEDS_LORA = ("output.format adapter needs method lora or qlora; use output.format merged for full "
                      "fine-tuning")
FP16_WITH_PIPELINE = ("training.precision fp16 is not supported with pipeline parallelism (its loss scaling is not "
                      "implemented across stages): use bf16, or set parallelism.pipeline to 1")


class ParallelismSpec(KFModel):
    """How the model is split. The data-parallel degree is derived: world / (tensor × pipeline)."""

    tensor: int = Field(default=1, ge=1, le=64, description="Tensor-parallel degree (DTensor).")
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline-parallel degree (torch.distributed.pipelining).")
    strategy: Literal["fsdp", "ddp", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3"] = Field(
        default="fsdp", description="Data-parallel strategy."
    )
    pipeline_schedule: Literal["1F1B", "GPipe"] = Field(default="1F1B", description="Pipeline schedule.")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!self.strategy.startsWith('deepspeed') || (self.tensor == 1 && self.pipeline == 1)",
            "DeepSpeed ZeRO strategies run data parallel only: set tensor and pipeline to 1, or use strategy fsdp",
            ".strategy"),
        cel("self.strategy != 'ddp' || self.tensor == 1", DDP_WITH_TENSOR, ".strategy"),
    ]})

    @model_validator(mode="after")
    def _ddp_without_tensor(self) -> "ParallelismSpec":
        # The same rule as the CEL above, and as the trainer's config (so the preflight exits 78
        # on a config that reached a pod without this API).
        if self.strategy == "ddp" and self.tensor > 1:
            raise ValueError(DDP_WITH_TENSOR)
        return self


class NodesSpec(KFModel):
    """Elastic node range: training starts with min nodes and grows up to max."""

    min: int = Field(default=1, ge=1, le=1024, description="Fewest nodes (pods) training runs on.")
    max: int = Field(default=1, ge=1, le=1024, description="Most nodes (pods); also the Job's parallelism.")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.min <= self.max", "nodes.min must be less than or equal to nodes.max", ".min"),
    ]})


class TrainingSpec(KFModel):
    """Optimisation hyper-parameters."""

    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps (caps epochs).")
    global_batch_size: int = Field(default=8, ge=1, description="Sequences per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = Field(default=1, ge=1, description="Sequences per forward pass on one rank.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps, then cosine decay.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Clip the whole gradient to this L2 norm before each step (0 disables).")
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, data order and dropout.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="bf16", description="Training precision.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="torch.compile each decoder block: on, off, or auto (on for CUDA GPUs, off on CPU where "
                    "compilation takes minutes that a short job does not earn back).",
    )
    fused: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Fused, memory-light RMSNorm, RoPE and lm_head + cross-entropy (custom backward, fewer passes "
                    "over memory; same math; fp32, not with compiled blocks, QLoRA or distillation): on, off, or "
                    "auto (off for now: a whole training step was not measured faster with it).",
    )
    merged_projections: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="One matrix multiply for q/k/v and one for gate/up per decoder layer (same parameters, "
                    "names and checkpoints; where weights are whole plain tensors: not under tensor parallelism, "
                    "ZeRO-3, LoRA or compiled blocks): on, off, or auto (off for now: a whole training step "
                    "was not measured faster with it).",
    )
    attention: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = Field(
        default="auto",
        description="Attention kernel. Packed records reach it as boundaries, not a dense mask, where it can: "
                    "flash_attention_2 (varlen; CUDA with flash_attn installed), flex_attention (block mask; CUDA), "
                    "sdpa (causal fast path; a dense mask only for packed batches), eager (reference). "
                    "auto picks the first of these that can train on the device.",
    )
    eval_interval_steps: int = Field(default=0, ge=0, description="Validate every N steps (0: at the end only).")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("self.globalBatchSize % self.microBatchSize == 0",
            "training.globalBatchSize must be a multiple of training.microBatchSize", ".globalBatchSize"),
    ]})


class CheckpointSpec(KFModel):
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    interval_steps: int = Field(
        default=100, ge=0, description="Save every N steps (0: only on SIGTERM and at the end, which always save)."
    )
    keep_last: int = Field(default=2, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")
    uri: str | None = Field(default=None, pattern=OUTPUT_URI_PATTERN, max_length=URI_MAX_LENGTH, description="Where checkpoints go; default <output.uri>/checkpoints.")


class OutputSpec(KFModel):
    """Where the trained model is written."""

    uri: str = Field(pattern=OUTPUT_URI_PATTERN, max_length=URI_MAX_LENGTH, description="pvc://claim/path, s3://bucket/path or file:///path.")
    format: Literal["merged", "adapter"] = Field(
        default="merged", description="merged: full weights (for qlora: the adapter merged into the dequantized "
        "4-bit base, in the base's dtype); adapter: the LoRA adapter only (method lora or qlora).",
    )


class FineTuneJobSpec(KFModel):
    """Desired state of a FineTuneJob."""

    model: ModelSource = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="Training (and validation) data.")
    method: Literal["full", "lora", "qlora", "distill"] = Field(
        default="lora", description="full: all weights; lora: adapters only; qlora: adapters only, on a base whose "
        "decoder-layer linear weights, embedding and lm_head are held in 4-bit NF4 (about a quarter of their bf16 "
        "memory; strategy fsdp, "
        "no tensor or pipeline parallelism); distill: all weights, learning from distillation.teacher as well as "
        "from the labels.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings, used when method is lora or qlora.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Model and data parallelism.")
    nodes: NodesSpec = Field(default_factory=NodesSpec, description="Elastic range of worker nodes (pods).")
    procs_per_node: int | None = Field(
        default=None, ge=1, le=64, description="Processes per node; default resources.gpus, or 1 without GPUs."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources of each worker pod.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation hyper-parameters.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    output: OutputSpec = Field(description="Where the result is written.")
    evaluation: TaskEvaluationSpec | None = Field(
        default=None,
        description="A held-out task metric measured before and after training; reported in status.result.",
    )
    distillation: DistillationSpec | None = Field(
        default=None, description="The teacher and the loss mix of method distill.")
    max_restarts: int = Field(default=3, ge=0, le=100, description="Elastic restarts torchrun attempts inside a pod.")
    backoff_limit: int = Field(default=3, ge=0, le=100, description="Pod failures (not disruptions) before the job fails.")
    suspend: bool = Field(default=False, description="Stop the workers, keep the job; resuming continues from the last checkpoint.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Fail with DeadlineExceeded after this long running.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete the job this long after it finishes.")
    template: PodTemplateOverride = Field(default_factory=PodTemplateOverride, description="Worker pod overrides.")
    storage: StorageSpec | None = Field(
        default=None, description="Remote storage access: storage.s3 for s3:// URIs (credentials by Secret reference).")

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel(
            "(has(self.procsPerNode) ? self.procsPerNode : (self.resources.gpus > 0 ? self.resources.gpus : 1))"
            " % (self.parallelism.tensor * self.parallelism.pipeline) == 0"
            " || (self.nodes.min == self.nodes.max &&"
            " ((has(self.procsPerNode) ? self.procsPerNode : (self.resources.gpus > 0 ? self.resources.gpus : 1))"
            " * self.nodes.min) % (self.parallelism.tensor * self.parallelism.pipeline) == 0)",
            "parallelism.tensor × parallelism.pipeline must divide the world size (procsPerNode × nodes) at every "
            "node count from nodes.min to nodes.max: make procsPerNode a multiple of it, or fix nodes.min == nodes.max",
            ".parallelism",
        ),
        cel("self.output.format != 'adapter' || self.method == 'lora' || self.method == 'qlora'",
            ADAPTER_NEEDS_LORA, ".output.format"),
        cel("self.method != 'qlora' || (self.parallelism.strategy == 'fsdp' && self.parallelism.tensor == 1 && "
            "self.parallelism.pipeline == 1)", QLORA_LAYOUT, ".parallelism"),
        cel("!has(self.evaluation) || self.dataset.format != 'text'",
            "evaluation needs prompts and answers: set dataset.format to prompt-completion or chat, or remove "
            "evaluation", ".evaluation"),
        cel("!self.parallelism.strategy.startsWith('deepspeed') || self.training.precision != 'fp16'",
            "DeepSpeed ZeRO strategies train in bf16 or fp32 here: set training.precision to bf16, or use strategy fsdp",
            ".training.precision"),
        cel("self.training.precision != 'fp16' || self.parallelism.pipeline == 1", FP16_WITH_PIPELINE,
            ".training.precision"),
        cel("(self.method == 'distill') == has(self.distillation)", DISTILL_NEEDS_TEACHER, ".distillation"),
        cel("!(self.training.attention in ['flex_attention', 'flash_attention_2']) || self.resources.gpus > 0",
            GPU_ATTENTION, ".training.attention"),
        cel(S3_ENV_CEL_RULE, S3_ENV_MESSAGE, ".storage"),
    ]})

    @model_validator(mode="after")
    def _cross_field(self) -> "FineTuneJobSpec":
        # The same rules as the CEL above, so `kubeforge run` and the SDK reject what the API
        # server would, before anything starts.
        if self.nodes.min > self.nodes.max:
            raise ValueError("nodes.min must be less than or equal to nodes.max")
        mp = self.parallelism.tensor * self.parallelism.pipeline
        ppn = self.effective_procs_per_node
        if ppn % mp and not (self.nodes.min == self.nodes.max and (ppn * self.nodes.min) % mp == 0):
            raise ValueError(
                f"parallelism.tensor × parallelism.pipeline ({mp}) must divide the world size (procsPerNode {ppn} × "
                f"nodes {self.nodes.min}..{self.nodes.max}): make procsPerNode a multiple of {mp}, or fix nodes.min == nodes.max"
            )
        if self.output.format == "adapter" and self.method not in ("lora", "qlora"):
            raise ValueError(ADAPTER_NEEDS_LORA)
        p = self.parallelism
        if self.method == "qlora" and (p.strategy != "fsdp" or p.tensor != 1 or p.pipeline != 1):
            raise ValueError(QLORA_LAYOUT)
        if self.parallelism.strategy.startswith("deepspeed") and mp != 1:
            raise ValueError("DeepSpeed ZeRO strategies run data parallel only: set tensor and pipeline to 1")
        if self.parallelism.strategy.startswith("deepspeed") and self.training.precision == "fp16":
            raise ValueError("DeepSpeed ZeRO strategies train in bf16 or fp32 here: set training.precision to bf16, "
                             "or use strategy fsdp")
        if self.training.precision == "fp16" and self.parallelism.pipeline > 1:
            raise ValueError(FP16_WITH_PIPELINE)
        if self.training.attention in ("flex_attention", "flash_attention_2") and self.resources.gpus == 0:
            raise ValueError(GPU_ATTENTION)
        if self.evaluation is not None and self.dataset.format == "text":
            raise ValueError("evaluation needs prompts and answers: set dataset.format to prompt-completion or chat, "
                             "or remove evaluation")
        if self.training.global_batch_size % self.training.micro_batch_size:
            raise ValueError("training.globalBatchSize must be a multiple of training.microBatchSize")
        if (self.method == "distill") != (self.distillation is not None):
            raise ValueError(DISTILL_NEEDS_TEACHER)
        s3_env_conflicts(self.storage, self.template)
        return self

    @property
    def effective_procs_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.resources.gpus if self.resources.gpus > 0 else 1


class WorkersStatus(KFModel):
    """Worker pods."""

    ready: int = Field(default=0, description="Worker pods running and ready.")
    total: int = Field(default=0, description="Worker pods that exist.")
    min: int = Field(default=0, description="nodes.min of the spec.")
    max: int = Field(default=0, description="nodes.max of the spec.")


class ProgressStatus(KFModel):
    """Training progress, read from the rank-0 metrics endpoint."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Current epoch (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput over all ranks.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    percent: str | None = Field(default=None, description="step / totalSteps as a percentage, for printer columns.")


class OutputStatus(KFModel):
    """Where the result is."""

    uri: str | None = Field(default=None, description="URI of the finished output.")


class TaskMetricResult(KFModel):
    """A held-out task metric before and after (values are fractions: 0.9 is 90 %)."""

    metric: str | None = Field(default=None, description="accuracy, exactMatch, f1 or passAtOne.")
    before: float | None = Field(default=None, description="The input model's score.")
    after: float | None = Field(default=None, description="The output model's score.")
    samples: int | None = Field(default=None, description="Records evaluated.")
    before_source: str | None = Field(
        default=None, description="QuantizeJob only: where the input's figure came from: measured, or the lineage "
        "record of the FineTuneJob that measured the same files on the same records.")


class DataMeasurements(KFModel):
    """What the preflight measured on the training file (kubeforge_runtime/datacheck.py)."""

    records: int | None = Field(default=None, description="Valid records.")
    unparseable_records: int | None = Field(default=None, description="Lines that are not valid records.")
    unparseable_share: float | None = Field(default=None, description="Unparseable lines / all non-blank lines.")
    duplicate_records: int | None = Field(default=None, description="Records repeating an earlier one (exact or near).")
    exact_duplicate_records: int | None = Field(default=None, description="Of those, the byte-for-byte repeats.")
    duplicate_share: float | None = Field(default=None, description="Duplicate records / records.")
    label_classes: int | None = Field(default=None, description="Distinct labels.")
    label_imbalance: float | None = Field(default=None, description="Most frequent label count / least frequent.")
    overlong_records: int | None = Field(default=None, description="Records longer than sequenceLength tokens.")
    overlong_share: float | None = Field(default=None, description="Overlong records / records.")
    sequence_length: int | None = Field(default=None, description="The length overlong was measured against.")
    pii_records: int | None = Field(default=None, description="Records with personal data (with maxPiiShare).")
    pii_share: float | None = Field(default=None, description="Records with personal data / records.")


class DataQualityResult(KFModel):
    """The data red lines (spec.dataset.checks): measurements, thresholds, what was crossed."""

    passed: bool | None = Field(default=None, description="True when no red line was crossed.")
    measurements: DataMeasurements | None = Field(default=None, description="The measured values.")
    thresholds: DataChecksSpec | None = Field(default=None, description="The thresholds applied.")
    violations: list[str] = Field(default_factory=list, description="Each crossed line, with value and threshold.")


class TrainResult(KFModel):
    """What training achieved, as the trainer reported it when it finished."""

    steps: int | None = Field(default=None, description="Optimizer steps run.")
    final_loss: float | None = Field(default=None, description="Training loss of the last step.")
    initial_validation_loss: float | None = Field(default=None, description="Validation loss before training.")
    final_validation_loss: float | None = Field(default=None, description="Validation loss after training.")
    evaluation: TaskMetricResult | None = Field(default=None, description="The held-out task metric (spec.evaluation).")
    dataset_digest: str | None = Field(default=None, description="sha256 of the training data files.")
    data_quality: DataQualityResult | None = Field(
        default=None, description="The data red lines (spec.dataset.checks): measured values, thresholds, violations.")
    lineage_digest: str | None = Field(
        default=None, description="sha256 of the output's lineage record (kubeforge.json; `kubeforge audit` shows it).")


class FineTuneJobStatus(KFModel):
    """Observed state of a FineTuneJob. Written by the operator only."""

    phase: Phase | None = Field(default=None, description="Pending, Running, Restarting, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions by the Kubernetes API conventions.")
    observed_generation: int | None = Field(default=None, description="The spec generation last reconciled.")
    workers: WorkersStatus | None = Field(default=None, description="Worker pods.")
    restarts: int | None = Field(default=None, description="Worker restarts so far.")
    progress: ProgressStatus | None = Field(default=None, description="Training progress.")
    last_checkpoint: str | None = Field(default=None, description="Step or path of the latest checkpoint.")
    output: OutputStatus | None = Field(default=None, description="The result, once succeeded.")
    result: TrainResult | None = Field(default=None, description="What training achieved (losses, task metric).")
    start_time: str | None = Field(default=None, description="When workers first ran (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")


class FineTuneJob(Kind):
    kind = "FineTuneJob"
    plural = "finetunejobs"
    short_names = ["ftj", "ft"]
    spec_model = FineTuneJobSpec
    status_model = FineTuneJobStatus
    description = "FineTuneJob fine-tunes a causal language model with elastic torchrun workers."
    printer_columns: ClassVar[list[dict[str, Any]]] = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Workers", "type": "integer", "jsonPath": ".status.workers.ready"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
        {"name": "Metric", "type": "number", "jsonPath": ".status.result.evaluation.after", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


__all__ = ["FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "ObjectReference", "K8sObject"]
