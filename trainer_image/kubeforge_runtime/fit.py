"""The fit check: peak memory per GPU (or per process on CPU) of a training or serving layout.

Pure arithmetic on the model's architecture (``config.json`` numbers) and the spec, with no
torch import, so both sides use it: the operator's admission webhook and ``kubeforge
validate`` / ``kubeforge plan`` (:mod:`kubeforge.fit`), and the runtime's preflight once the
model's ``config.json`` is local. ``benchmarks/bench_fit.py`` compares it with measured peaks.

What a training rank holds, as this runtime trains (``train/trainer.py``, ``strategy.py``):

* **weights** - the weights of its pipeline stage (embedding on the first stage, final norm
  and ``lm_head`` on the last), the decoder layers' linear weights split over the
  tensor-parallel ranks (embedding, norms and ``lm_head`` stay replicated, ``parallelize.py``),
  sharded over the data-parallel ranks by ``fsdp`` and ZeRO-3; fp32 master weights for what
  is trained, and a frozen (LoRA) base in its stored dtype under bf16/fp16 autocast
  (``train/loading.py``'s precision policy, :func:`frozen_bytes`);
* **gradients** (fp32, trainable parameters only) - sharded by ``fsdp``, ZeRO-2 and ZeRO-3;
  DDP keeps a second copy in its reduction buckets; ZeRO-2 flattens them into a bucket;
* **optimizer** - AdamW's two fp32 moments of the trainable parameters (8 bytes each),
  sharded by ``fsdp`` and every ZeRO stage; ZeRO-1/2 add an fp32 copy of their partition;
* **gathered** - what a sharded strategy unshards while computing: FSDP/ZeRO-3 one unit
  being used and one prefetched (a decoder layer, the embedding, or the norm with
  ``lm_head``: FSDP wraps each as a unit of its own, pipeline stages included);
* **autocast copies** - under bf16/fp16 autocast the low-precision copy of every linear
  weight is saved for backward (2 bytes per linear parameter);
* **activations** - what autograd saves per token of one micro-batch for each decoder layer
  (:func:`layer_activation_bytes`), times the micro-batches a pipeline stage holds in flight;
  with gradient checkpointing only each layer's input plus one layer recomputed;
* **logits** - the last stage's vocabulary-sized tensors of one micro-batch (logits, their
  log-softmax saved by the loss, and both gradients in backward), plus the logits and
  log-softmax of every other micro-batch in flight (GPipe: all of them).

``method: qlora`` (``train/qlora.py``) holds the decoder layers' frozen linear weights, the
embedding and ``lm_head`` in NF4, :data:`NF4_BYTES_PER_PARAM` bytes each instead of 4 (norms
and the adapters stay fp32; an embedding whose rows are not whole NF4 blocks too); those
weights have no autocast copy (each linear dequantizes its weight on the fly, one at a time:
the **dequantized weight** term, ``lm_head`` the widest of them), and FSDP gathers the 4-bit codes.

Without gradient accumulation the gradients are freed by each optimizer step and grow back
as backward frees the activations, so only their excess over the activations counts. On CPU
(``device="cpu"``, the per-process figure) under ZeRO-1/2 the whole model as loaded stays
resident as well (:func:`cpu_terms`). Loading (``train/loading.py``): the model is built on
the meta device and laid out first, then each rank reads only its part from the safetensors
files - with ``fsdp`` its shard of its stage's tensor-parallel slice, with ``ddp`` its
stage's slice whole, with ZeRO-3 its partition plus one unit whole (read unit by unit and
partitioned at once), with ZeRO-1/2 the whole model - so the
**load** phase is that part (:func:`load_terms`) and the peak is the larger of it and the
**train** phase.

Other terms (the teacher of a distillation, say) plug in as :data:`ExtraTerm` functions
passed to :func:`estimate_training`; :func:`frozen_model_terms` is the building block for a
model held in inference mode next to the trained one.

A serving replica holds the weights in the engine's dtype, the paged KV cache the engine
preallocates (``maxConcurrentRequests`` sequences of ``maxModelLength`` tokens, in blocks of
``kvBlockSize``: ``serve/continuous.py``) and one batch of ``maxBatchTokens`` in flight.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

Device = Literal["cuda", "cpu"]

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "auto": None}
ZERO_PREFIX = "deepspeed-zero"
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per weight of torchao's NF4 (``train/qlora.py``): a 4-bit code, an int8 scale per
block of 64, an fp32 factor per 256 block scales - 0.516, 0.258x of bf16's 2 bytes."""
NF4_BLOCK = 64
"""Weights per NF4 block (``train/qlora.py``'s ``BLOCK_SIZE``)."""
ZERO_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (elements), which the runtime's ds_config keeps."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer's ``config.json`` the estimate needs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool = False
    head_dim: int | None = None
    dtype_bytes: int = 4
    """Bytes per weight as stored (``torch_dtype``/``dtype`` of the config); serving's "auto"."""

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Architecture":
        """From a transformers ``config.json`` (Llama, Mistral, Qwen2 and similar key names)."""
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            arch = cls(
                hidden_size=hidden, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
                dtype_bytes=DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), 4) or 4,
            )
        except KeyError as exc:
            raise ValueError(f"the model's config.json lacks {exc.args[0]!r}: the fit check needs hidden_size, "
                             "num_hidden_layers, num_attention_heads, intermediate_size and vocab_size") from None
        return arch

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one decoder layer, by its usual name."""
        h, q, kv, i = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden_size  # two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.head_params + self.num_layers * self.layer_params + self.hidden_size

    def lora_params_per_layer(self, r: int, targets: Iterable[str]) -> int:
        """Adapter parameters of one layer: r x (in + out) for each targeted linear."""
        shapes = self.linear_shapes()
        return sum(r * sum(shapes[t]) for t in set(targets) if t in shapes)


@dataclass(frozen=True)
class TrainPlan:
    """The layout and batch of a FineTuneJob, as the trainer will run it."""

    world: int = 1
    tensor: int = 1
    pipeline: int = 1
    strategy: str = "fsdp"
    method: str = "lora"
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    precision: str = "bf16"
    micro_batch: int = 1
    global_batch: int = 8
    sequence_length: int = 512
    gradient_checkpointing: bool = False
    pipeline_schedule: str = "1F1B"

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], world: int) -> "TrainPlan":
        """From a FineTuneJob spec (camelCase, as the API or the trainer's config has it)."""
        par, tr, lora = spec.get("parallelism") or {}, spec.get("training") or {}, spec.get("lora") or {}
        return cls(
            world=world, tensor=int(par.get("tensor", 1)), pipeline=int(par.get("pipeline", 1)),
            strategy=par.get("strategy", "fsdp"), method=spec.get("method", "lora"),
            lora_r=int(lora.get("r", 8)),
            lora_targets=tuple(lora.get("targetModules") or ("q_proj", "k_proj", "v_proj", "o_proj")),
            precision=tr.get("precision", "bf16"), micro_batch=int(tr.get("microBatchSize", 1)),
            global_batch=int(tr.get("globalBatchSize", 8)),
            sequence_length=int((spec.get("dataset") or {}).get("sequenceLength", 512)),
            gradient_checkpointing=bool(tr.get("gradientCheckpointing", False)),
            pipeline_schedule=par.get("pipelineSchedule", "1F1B"),
        )

    @property
    def dp(self) -> int:
        return max(1, self.world // (self.tensor * self.pipeline))

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on one data-parallel rank (gradient accumulation)."""
        return max(1, self.global_batch // (self.dp * self.micro_batch))

    @property
    def zero_stage(self) -> int | None:
        return int(self.strategy[len(ZERO_PREFIX):]) if self.strategy.startswith(ZERO_PREFIX) else None

    def replace(self, **changes: Any) -> "TrainPlan":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU (or per process on CPU): the peak and the terms of the phase that makes it."""

    peak: int
    phase: str
    terms: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.terms.items() if v)
        return f"{gib(self.peak)} ({self.phase}: {parts})"


ExtraTerm = Callable[[Architecture, "TrainPlan", int], Mapping[str, int]]
"""More train-phase bytes for pipeline stage ``stage`` (e.g. a distillation teacher)."""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- the terms ------------------------------------------------------------------------------

def layer_activation_bytes(arch: Architecture, precision: str, tp: int = 1) -> int:
    """Bytes autograd saves per token for one decoder layer (Llama-style, SDPA attention),
    weights excluded (they are the autocast copies' term).

    fp32: each RMSNorm saves its input, the normalised value and its output (3 x 4h); the
    attention its rotated q and k, v, and its output (4 bytes each), and the rotary cos/sin
    (2 x 4 x head_dim); the MLP gate, SiLU(gate), up and their product (4 x 4i). Under
    bf16/fp16 autocast the norms and the residual stream stay fp32 but a norm's output is
    not saved (2 x 4h each); every linear saves its own 2-byte cast of its input (q, k, v,
    gate, up: 5 x 2h) and the attention and MLP tensors halve. Head and FFN widths split over
    the tensor-parallel ranks; hidden-sized tensors are replicated. Checked against the
    tensors autograd actually saves (tests/unit/runtime/test_fit_estimator.py).
    """
    h, q, kv, i = arch.hidden_size, arch.q_width / tp, arch.kv_width / tp, arch.intermediate_size / tp
    d = arch.dim
    if precision == "fp32":
        return int(24 * h + 8 * q + 8 * kv + 8 * d + 16 * i)
    return int(16 * h + 10 * h + 4 * q + 4 * kv + 8 * d + 8 * i)


def logits_bytes_per_token(arch: Architecture, precision: str) -> int:
    """Logits, the loss's fp32 log-softmax, and their two gradients in backward."""
    return (16 if precision == "fp32" else 14) * arch.vocab_size


def saved_logits_bytes_per_token(arch: Architecture, precision: str) -> int:
    """What a micro-batch waiting for its backward keeps of the loss: its logits (the pipeline
    stage's output) and the fp32 log-softmax the loss saved; the gradients come one at a time."""
    return (8 if precision == "fp32" else 6) * arch.vocab_size


def stage_layers(arch: Architecture, pp: int, stage: int) -> int:
    """Decoder layers of ``stage`` (the trainer's split: earlier stages take the remainder)."""
    base, extra = divmod(arch.num_layers, pp)
    return base + (1 if stage < extra else 0)


def stage_params(arch: Architecture, plan: TrainPlan, stage: int) -> tuple[int, int, int]:
    """(parameters, of which trainable, of which in decoder-layer linears) on one rank of ``stage``."""
    n = stage_layers(arch, plan.pipeline, stage)
    first, last = stage == 0, stage == plan.pipeline - 1
    linear = n * arch.layer_linear_params // plan.tensor
    other = n * 2 * arch.hidden_size + (arch.embedding_params if first else 0)
    if last:
        other += arch.hidden_size + (arch.head_params or (arch.embedding_params if not first else 0))
    head_linear = arch.vocab_size * arch.hidden_size if last else 0  # lm_head is a linear (autocast copy)
    if plan.method in ("lora", "qlora"):
        trainable = n * arch.lora_params_per_layer(plan.lora_r, plan.lora_targets) // plan.tensor
        return linear + other + trainable, trainable, linear + head_linear
    return linear + other, linear + other, linear + head_linear


def in_flight(plan: TrainPlan, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once (GPipe: all; 1F1B: pp - stage)."""
    if plan.pipeline == 1:
        return 1
    if plan.pipeline_schedule == "GPipe":
        return plan.micro_batches
    return min(plan.pipeline - stage, plan.micro_batches)


def frozen_bytes(arch: Architecture, plan: TrainPlan) -> int:
    """Bytes per frozen weight (``train/loading.py``'s policy): the stored dtype under bf16/fp16
    autocast (a bf16 LoRA base stays bf16), fp32 under fp32 training and with ZeRO."""
    if plan.precision == "fp32" or plan.zero_stage:
        return 4
    return arch.dtype_bytes


def qlora_nf4_params(arch: Architecture, plan: TrainPlan, stage: int) -> int:
    """Frozen parameters QLoRA holds in NF4 on one rank of ``stage`` (before FSDP sharding):
    the decoder-layer linears, and the embedding (first stage) and an untied ``lm_head``
    (last stage) when a row is a whole number of NF4 blocks (``qlora.nf4_rows``)."""
    n = stage_layers(arch, plan.pipeline, stage) * arch.layer_linear_params // plan.tensor
    if arch.hidden_size % NF4_BLOCK == 0:
        n += (arch.embedding_params if stage == 0 else 0) + (arch.head_params if stage == plan.pipeline - 1 else 0)
    return n


def weight_bytes(arch: Architecture, plan: TrainPlan, stage: int) -> int:
    """Bytes of one rank's whole (unsharded) stage: trained weights as fp32 master weights,
    frozen ones per :func:`frozen_bytes`; QLoRA's frozen linears and embedding in NF4
    (:func:`qlora_nf4_params`; the rest of its base fp32, as loaded)."""
    params, trainable, _ = stage_params(arch, plan, stage)
    if plan.method == "qlora":
        nf4 = qlora_nf4_params(arch, plan, stage)
        return int(4 * (params - nf4) + NF4_BYTES_PER_PARAM * nf4)
    return 4 * trainable + frozen_bytes(arch, plan) * (params - trainable)


def _end_unit_bytes(arch: Architecture, plan: TrainPlan, stage: int) -> int:
    """Bytes of the largest non-layer unit ``stage`` gathers whole: its embedding or its
    ``lm_head`` (frozen under LoRA/QLoRA, trained in a full fine-tune)."""
    per: float = 4 if plan.method == "full" else frozen_bytes(arch, plan)
    if plan.method == "qlora" and arch.hidden_size % NF4_BLOCK == 0:
        per = NF4_BYTES_PER_PARAM
    first, last = stage == 0, stage == plan.pipeline - 1
    sizes = [arch.vocab_size * arch.hidden_size if first else 0,
             (arch.head_params or (arch.embedding_params if not first else 0)) if last else 0]
    return int(per * max(sizes))


def _widest_nf4(arch: Architecture, plan: TrainPlan, stage: int) -> int:
    """Elements of the widest weight a QLoRA rank dequantizes whole: a decoder linear, or
    ``lm_head`` on the last stage when it is NF4 (the embedding dequantizes looked-up rows only)."""
    widest = max(a * b for a, b in arch.linear_shapes().values()) // plan.tensor
    if stage == plan.pipeline - 1 and arch.hidden_size % NF4_BLOCK == 0:
        widest = max(widest, arch.vocab_size * arch.hidden_size)
    return widest


def train_terms(arch: Architecture, plan: TrainPlan, stage: int) -> dict[str, int]:
    """Bytes of the train phase on one rank of pipeline stage ``stage`` (module docstring)."""
    _, trainable, linear = stage_params(arch, plan, stage)
    dp, zero = plan.dp, plan.zero_stage
    sharded = dp > 1
    fsdp = sharded and plan.strategy == "fsdp"
    t: dict[str, int] = {}
    t["weights"] = weight_bytes(arch, plan, stage) // (dp if fsdp or zero == 3 else 1)
    grads = 4 * trainable
    if fsdp:
        t["gradients"] = grads // dp
    elif zero == 3 and sharded:
        # This rank's preallocated gradient partition, plus the flat reduction bucket
        # (DeepSpeed's reduce_bucket_size, 5e8 elements by default, caps it).
        t["gradients"] = grads // dp + 4 * min(trainable, ZERO_REDUCE_BUCKET)
    elif zero == 2:
        t["gradients"] = grads + grads // dp  # the flat reduction bucket, then this rank's partition
    elif zero == 1:
        t["gradients"] = grads
    elif plan.strategy == "ddp" and sharded:
        t["gradients"] = 2 * grads  # DDP's reduction buckets hold a second copy
    else:
        t["gradients"] = grads
    t["optimizer"] = 8 * trainable // (dp if (fsdp or zero) and sharded else 1)
    if zero and sharded:
        t["optimizer"] += 4 * trainable // dp  # ZeRO's fp32 copy of its partition
    n_layers = stage_layers(arch, plan.pipeline, stage)
    per_weight = frozen_bytes(arch, plan) if plan.method == "lora" else 4  # the bulk of the weights
    layer_full = per_weight * arch.layer_params // plan.tensor
    if plan.method == "qlora":  # FSDP gathers the NF4 codes (and the layer's adapters)
        layer_full = int(NF4_BYTES_PER_PARAM * arch.layer_linear_params + 8 * arch.hidden_size
                         + 4 * arch.lora_params_per_layer(plan.lora_r, plan.lora_targets))
    if fsdp or (zero == 3 and sharded):
        # One unit computing and one prefetched (a decoder layer, or the embedding / the norm
        # and lm_head, which are units of their own), plus one layer's unsharded gradients in
        # backward; pipeline stages reshard after each forward too.
        unit_full = max(layer_full, _end_unit_bytes(arch, plan, stage))
        t["gathered"] = layer_full + unit_full + (layer_full if plan.method == "full" else 0)
    if plan.precision in ("bf16", "fp16"):
        copies = 2 * linear
        if plan.method == "lora" and frozen_bytes(arch, plan) == 2:
            copies = 0  # the frozen base is stored in 16 bits already: autocast makes no copies
        elif plan.method == "lora" and plan.gradient_checkpointing:
            copies = 2 * arch.layer_linear_params // plan.tensor  # frozen weights: not cached, one layer recomputed
        if plan.method == "qlora":  # lm_head only, when it is not NF4
            copies = 0 if arch.hidden_size % NF4_BLOCK == 0 else 2 * (linear - n_layers * arch.layer_linear_params // plan.tensor)
        t["autocast copies"] = copies
    if plan.method == "qlora":
        # The one linear being computed: its weight dequantized to fp32 (and cast under autocast).
        widest = _widest_nf4(arch, plan, stage)
        t["dequantized weight"] = (4 + (2 if plan.precision in ("bf16", "fp16") else 0)) * widest
    tokens = plan.micro_batch * plan.sequence_length
    per_layer = layer_activation_bytes(arch, plan.precision, plan.tensor)
    if plan.gradient_checkpointing:
        act = tokens * (n_layers * 4 * arch.hidden_size) * in_flight(plan, stage) + tokens * per_layer
    else:
        act = tokens * n_layers * per_layer * in_flight(plan, stage)
    act += tokens * 4 * arch.hidden_size * in_flight(plan, stage)  # the stage's input or embedding output
    t["activations"] = act
    if stage == plan.pipeline - 1:
        t["logits"] = tokens * (logits_bytes_per_token(arch, plan.precision) + 12 * arch.hidden_size)
        # GPipe's last stage runs every micro-batch's forward (and loss) before any backward.
        t["logits"] += tokens * saved_logits_bytes_per_token(arch, plan.precision) * (in_flight(plan, stage) - 1)
    if plan.micro_batches == 1 and plan.pipeline == 1 and not (zero in (2, 3) and sharded):
        # The optimizer step frees the gradients (set_to_none); without accumulation they are
        # created again as backward frees the activations, so only their excess adds up.
        t["gradients"] = max(0, t["gradients"] - t["activations"] - t.get("logits", 0))
    return t


def frozen_model_terms(arch: Architecture, plan: TrainPlan, stage: int, name: str = "frozen model") -> dict[str, int]:
    """A second model held in inference mode next to the trained one (for a distillation
    teacher): its weights as the stage holds them (split like the student's, sharded where
    the strategy shards) and its logits for one micro-batch; no gradients, no optimizer."""
    params, _, _ = stage_params(arch, plan.replace(method="full"), stage)
    shard = plan.dp if plan.dp > 1 and (plan.strategy == "fsdp" or plan.zero_stage == 3) else 1
    tokens = plan.micro_batch * plan.sequence_length
    return {f"{name} weights": 4 * params // shard, f"{name} logits": tokens * 4 * arch.vocab_size}


def teacher_terms(teacher: Architecture, plan: TrainPlan, stage: int) -> dict[str, int]:
    """A distillation teacher (``method: distill``) where the trainer puts it
    (``kubeforge_runtime/train/distill.py``): split over tensor-parallel ranks like the
    student, sharded over the data-parallel ranks only by ``fsdp`` (DDP and every ZeRO stage
    keep a whole copy per rank), and whole on the last pipeline stage (the loss computes the
    teacher's logits there), with its fp32 logits for one micro-batch. Nothing on other stages."""
    if stage != plan.pipeline - 1:
        return {}
    params, _, _ = stage_params(teacher, plan.replace(method="full", pipeline=1), 0)
    shard = plan.dp if plan.dp > 1 and plan.strategy == "fsdp" else 1
    tokens = plan.micro_batch * plan.sequence_length
    return {"teacher weights": 4 * params // shard, "teacher logits": tokens * 4 * teacher.vocab_size}


def teacher_term(teacher: Architecture) -> ExtraTerm:
    """:func:`teacher_terms` as an :data:`ExtraTerm` of :func:`estimate_training`."""
    return lambda _student, plan, stage: teacher_terms(teacher, plan, stage)


def cpu_terms(arch: Architecture, plan: TrainPlan) -> dict[str, int]:
    """What a CPU process holds besides the training state: under ZeRO, the whole model as it
    was loaded (the allocator keeps what DeepSpeed's partitioning frees). With ``fsdp`` and
    ``ddp`` a rank only ever allocated its own part (``train/loading.py``), already counted
    in the weights."""
    if plan.zero_stage and not (plan.zero_stage == 3 and plan.dp > 1):
        return {"loaded model (cpu)": 4 * arch.total_params}
    return {}


def load_terms(arch: Architecture, plan: TrainPlan, stage: int, device: Device) -> dict[str, int]:
    """The load phase (``train/loading.py``): what a rank reads from the files. ZeRO: the whole
    model in fp32, then partitioned; ``fsdp``: the rank's shard of its stage (tensor-parallel
    slice and pipeline stage cut out on the meta device first); ``ddp``: its stage whole."""
    if plan.zero_stage == 3 and plan.dp > 1:  # read unit by unit into partitions (loading.materialize_zero3)
        unit = 4 * max(arch.layer_params, arch.vocab_size * arch.hidden_size)
        return {"this rank's partition (load)": weight_bytes(arch, plan, stage) // plan.dp, "one unit whole (load)": unit}
    if plan.zero_stage:
        return {"whole model (load)": 4 * arch.total_params}
    if plan.method == "qlora":  # read tensor by tensor, each decoder linear quantized as read, before FSDP shards it
        widest = max(max(a * b for a, b in arch.linear_shapes().values()), arch.vocab_size * arch.hidden_size)
        return {"quantized stage (load)": weight_bytes(arch, plan, stage), "one fp32 tensor (load)": 4 * widest}
    shard = plan.dp if plan.dp > 1 and plan.strategy == "fsdp" else 1
    return {"this rank's part (load)": weight_bytes(arch, plan, stage) // shard}


def estimate_training(arch: Architecture, plan: TrainPlan, device: Device = "cuda",
                      extra: Iterable[ExtraTerm] = ()) -> Estimate:
    """Peak bytes per GPU (per process on CPU) of the busiest rank of ``plan``."""
    extra = tuple(extra)
    best: Estimate | None = None
    for stage in range(plan.pipeline):
        terms = train_terms(arch, plan, stage)
        for term in extra:
            terms.update(term(arch, plan, stage))
        if device == "cpu":
            terms.update(cpu_terms(arch, plan))
        load = load_terms(arch, plan, stage, device)
        train_total, load_total = sum(terms.values()), sum(load.values())
        phases = {"train": train_total, "load": load_total}
        est = (Estimate(train_total, "train", terms, phases) if train_total >= load_total
               else Estimate(load_total, "load", load, phases))
        if best is None or est.peak > best.peak:
            best = est
    assert best is not None
    return best


# --- serving --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServePlan:
    """The engine settings of an InferenceService that decide its memory."""

    dtype: str = "auto"
    max_batch_tokens: int = 4096
    max_concurrent_requests: int = 16
    kv_block_size: int = 16
    max_model_length: int | None = None
    max_position_embeddings: int = 2048

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], max_position_embeddings: int = 2048) -> "ServePlan":
        eng = spec.get("engine") or {}
        return cls(dtype=eng.get("dtype", "auto"), max_batch_tokens=int(eng.get("maxBatchTokens", 4096)),
                   max_concurrent_requests=int(eng.get("maxConcurrentRequests", 16)),
                   kv_block_size=int(eng.get("kvBlockSize", 16)), max_model_length=eng.get("maxModelLength"),
                   max_position_embeddings=max_position_embeddings)

    def replace(self, **changes: Any) -> "ServePlan":
        return dataclasses.replace(self, **changes)


def estimate_serving(arch: Architecture, serve: ServePlan) -> Estimate:
    """Weights + the preallocated paged KV cache + one batch of ``maxBatchTokens`` in flight."""
    wbytes = DTYPE_BYTES.get(serve.dtype) or arch.dtype_bytes
    length = serve.max_model_length or serve.max_position_embeddings
    blocks = max(4, math.ceil(serve.max_concurrent_requests * length / serve.kv_block_size))
    kv = blocks * serve.kv_block_size * 2 * arch.num_layers * arch.kv_width * wbytes
    batch = serve.max_batch_tokens * (4 * arch.vocab_size // 8 + 8 * arch.hidden_size + 4 * arch.intermediate_size)
    terms = {"weights": wbytes * arch.total_params, "kv cache": kv, "batch": batch}
    return Estimate(sum(terms.values()), "serve", terms, {"serve": sum(terms.values())})


# --- alternatives -----------------------------------------------------------------------------

def _divides(n: int, *values: int) -> bool:
    return all(v % n == 0 for v in values)


def valid_plan(arch: Architecture, plan: TrainPlan) -> bool:
    """The API's and the trainer's layout rules (so a suggestion is admissible as it is)."""
    mp = plan.tensor * plan.pipeline
    if plan.world % mp or plan.pipeline > arch.num_layers:
        return False
    if plan.tensor > 1 and not _divides(plan.tensor, arch.num_heads, arch.num_kv_heads, arch.intermediate_size,
                                        arch.hidden_size):
        return False
    if plan.strategy.startswith(ZERO_PREFIX) and mp != 1:
        return False
    if plan.strategy == "ddp" and plan.tensor > 1:
        return False
    if plan.method == "qlora" and (plan.strategy != "fsdp" or mp != 1):
        return False  # the API's rule: QLoRA runs FSDP data parallel only
    return plan.global_batch % (plan.micro_batch * plan.dp) == 0


def _single_changes(arch: Architecture, plan: TrainPlan) -> list[tuple[str, TrainPlan]]:
    """Each one-step move towards less memory per GPU, described as the field to change."""
    out: list[tuple[str, TrainPlan]] = []
    if not plan.gradient_checkpointing:
        out.append(("training.gradientCheckpointing: true", plan.replace(gradient_checkpointing=True)))
    for mbs in range(plan.micro_batch - 1, 0, -1):
        if plan.micro_batch % mbs == 0:
            out.append((f"training.microBatchSize: {mbs}", plan.replace(micro_batch=mbs)))
    if plan.dp > 1:
        for strategy in ("fsdp", "deepspeed-zero3"):
            if plan.strategy != strategy:
                out.append((f"parallelism.strategy: {strategy}", plan.replace(strategy=strategy)))
    for tp in (2, 4, 8):
        if tp > plan.tensor:
            out.append((f"parallelism.tensor: {tp}",
                        plan.replace(tensor=tp, strategy="fsdp" if plan.strategy != "fsdp" else plan.strategy)))
    for pp in (2, 4, 8):
        if pp > plan.pipeline:
            out.append((f"parallelism.pipeline: {pp}",
                        plan.replace(pipeline=pp, strategy="fsdp" if plan.zero_stage else plan.strategy)))
    if plan.method == "full":
        out.append(("method: lora", plan.replace(method="lora")))
    return [(what, p) for what, p in out if valid_plan(arch, p)]


@dataclass(frozen=True)
class Alternative:
    """A layout that differs from the spec by ``changes`` (spec fields), with its estimate."""

    changes: tuple[str, ...]
    plan: TrainPlan
    estimate: Estimate


def alternatives(arch: Architecture, plan: TrainPlan, limit: int, device: Device = "cuda",
                 extra: Iterable[ExtraTerm] = (), max_changes: int = 3) -> list[Alternative]:
    """Layouts within ``max_changes`` one-step moves of ``plan``, fewest changes first, then
    least memory; those that fit ``limit`` come before those that do not."""
    extra = tuple(extra)
    seen = {plan}
    frontier: list[tuple[tuple[str, ...], TrainPlan]] = [((), plan)]
    found: list[Alternative] = []
    for _ in range(max_changes):
        nxt: list[tuple[tuple[str, ...], TrainPlan]] = []
        for changes, p in frontier:
            for what, q in _single_changes(arch, p):
                if q in seen:
                    continue
                seen.add(q)
                # A field changed twice (microBatchSize 4 then 2) is one change: keep its last value.
                field_name = what.split(":")[0]
                merged = tuple(c for c in changes if c.split(":")[0] != field_name) + (what,)
                nxt.append((merged, q))
                found.append(Alternative(merged, q, estimate_training(arch, q, device, extra)))
        frontier = nxt
    found.sort(key=lambda a: (a.estimate.peak > limit, len(a.changes), a.estimate.peak))
    return found


def nearest_fit(arch: Architecture, plan: TrainPlan, limit: int, device: Device = "cuda",
                extra: Iterable[ExtraTerm] = ()) -> Alternative | None:
    """The layout with the fewest changes whose estimate fits ``limit`` (least memory among
    equals); None when nothing within three changes fits."""
    for alt in alternatives(arch, plan, limit, device, extra):
        if alt.estimate.peak <= limit:
            return alt
    return None


def misfit_message(what: str, estimate: Estimate, limit: int, limit_source: str, nearest: Alternative | None) -> str:
    """The refusal: the estimate, the limit and the nearest layout that fits (or that none does)."""
    msg = (f"{what} does not fit: estimated peak {estimate.describe()} per GPU exceeds {gib(limit)} "
           f"({limit_source})")
    if nearest is None:
        return msg + "; no layout within three changes fits: use GPUs with more memory or a smaller model"
    return (msg + f"; the nearest layout that fits ({gib(nearest.estimate.peak)}): set "
            + ", ".join(nearest.changes))
