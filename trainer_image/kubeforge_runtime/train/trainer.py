"""The training loop: one worker of a FineTuneJob, under torchrun (or alone for local runs).

Called by ``python -m kubeforge_runtime.train --config PATH`` (``__main__.py``), which torchrun
starts once per process. Every rank:

1. joins the process group (gloo on CPU, NCCL on GPU) and builds the ("pp", "dp", "tp") mesh
   from a validated :class:`ParallelDims`;
2. tokenizes the data (deterministically, so every rank has the same samples) and builds the
   model (plus LoRA) on the meta device, then tensor-parallelises it and cuts out its
   pipeline stage (``parallelize.py``) and wraps it for data parallelism (``strategy.py``:
   FSDP2, DDP or DeepSpeed ZeRO, one object the loop calls wherever they differ); each rank
   then reads only its own part of the weights from the safetensors files (``loading.py``);
3. resumes from the newest complete checkpoint, if any (any layout: DCP reshards);
4. runs optimizer steps: each data-parallel rank takes its slice of the step's global batch,
   splits it into micro-batches (gradient accumulation, or pipeline micro-batches) and sums
   token losses normalised by the number of target tokens in the whole global batch, so the
   gradient is the same as one process on the whole batch, whatever the layout;
5. checkpoints every N steps, on SIGTERM (all ranks agree to stop at the same step) and at
   the end; then every rank writes its part of the output (``shard_output.py``), or, where
   that is not supported, rank 0 rebuilds the model in one process from the last
   checkpoint and writes it (``output.py``).

Rank 0 reports progress (``metrics.py``). Exit codes: 0 done, 78 configuration error,
143 stopped by SIGTERM after checkpointing, anything else a crash (torchrun restarts the
workers when restarts are left; they resume from the last checkpoint).

Verification hooks (used by the tests, harmless in production and documented in
CONTRACT.md): ``KUBEFORGE_TRAIN_DUMP=FILE`` makes rank 0 write what it computed (losses,
first-step gradients, final parameters, probe logits) with ``torch.save``;
``KUBEFORGE_FAULT_KILL_AT_STEP`` / ``KUBEFORGE_FAULT_SIGTERM_AT_STEP`` (with
``KUBEFORGE_FAULT_RANK``, default the last rank) make one worker SIGKILL itself or receive
SIGTERM after that step, on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` = 0).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import signal
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import contract, data as data_mod, models, storage
from .. import lineage as lineage_mod
from . import attention as attention_mod
from . import compiled as compiled_mod
from . import checkpoint as ckpt
from . import distill as distill_mod
from . import fused as fused_mod
from . import merged as merged_mod
from . import metrics as metrics_mod
from . import model as model_mod
from . import output as output_mod
from . import precision as precision_mod
from . import shard_output
from . import strategy as strategy_mod
from . import zero as zero_mod
from .config import ADAPTER_METHODS, TrainConfig
from .parallel_dims import ModelShape, ParallelDims
from .parallelize import CausalLMStage, apply_tensor_parallel, prune_to_stage, target_positions

log = logging.getLogger(__name__)

EXIT_SIGTERM = 143
ENV_DUMP = "KUBEFORGE_TRAIN_DUMP"
ENV_KILL_AT = "KUBEFORGE_FAULT_KILL_AT_STEP"
ENV_SIGTERM_AT = "KUBEFORGE_FAULT_SIGTERM_AT_STEP"
ENV_FAULT_RANK = "KUBEFORGE_FAULT_RANK"
MIN_LR_RATIO = 0.1


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf (a diverged loss) become null, which the API server accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group; without torchrun, become a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the small CPU-side object collectives
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            # After an elastic restart torchrun hands the workers the same agent TCPStore,
            # still holding the previous attempt's keys: a fast rank can read a dead peer's
            # gloo address from it and fail with "connection refused" (seen with torch 2.13).
            # A per-attempt key prefix gives every attempt a clean namespace.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"kubeforge/attempt-{restart}", store),
                                    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak``, then cosine decay to MIN_LR_RATIO * peak at ``total``.
    A function of the step alone, so resuming needs no scheduler state."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


class TokenLoss:
    """Cross-entropy summed over target tokens, times ``scale`` (dp / target tokens of the
    global batch). Records the unscaled sums for reporting. Used as the pipeline loss_fn.
    Takes logits at every position with their labels, ``(batch, sequence, vocab)`` and
    ``(batch, sequence)``, or at the target positions only (``CausalLMStage``'s
    ``targets_at``), ``(targets, vocab)`` and ``(targets,)``."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.sums: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=data_mod.IGNORE_INDEX, reduction="sum")
        return self.add_sum(ce)

    def add_sum(self, ce: torch.Tensor) -> torch.Tensor:
        """Record a micro-batch's summed token cross-entropy ``ce`` (computed elsewhere: the
        fused head, ``fused.head_loss``) and return it scaled, as :meth:`__call__` does."""
        self.sums.append(ce.detach())
        return ce * self.scale


class Trainer:
    """One rank's share of a training run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        t = cfg.training
        torch.manual_seed(t.seed)
        self.base_dir = model_mod.model_dir(cfg)
        self.tokenizer = models.load_tokenizer(str(self.base_dir))
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(str(self.base_dir))
        self.dims = ParallelDims(
            world_size=self.world, tp=cfg.parallelism.tensor, pp=cfg.parallelism.pipeline,
            global_batch_size=t.globalBatchSize, micro_batch_size=t.microBatchSize,
            pipeline_schedule=cfg.parallelism.pipelineSchedule, model=ModelShape.from_hf_config(hf_cfg),
        )
        self.mesh = self.dims.build_mesh(self.device.type)
        self.strategy = strategy_mod.build(cfg, self.dims, self.mesh)
        self.layout = {**self.dims.describe(), "strategy": cfg.parallelism.strategy}
        self.pp_rank = self.mesh["pp"].get_local_rank()
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.tp_rank = self.mesh["tp"].get_local_rank()
        self.is_first = self.pp_rank == 0
        self.is_last = self.pp_rank == self.dims.pp - 1

        d = cfg.dataset
        val_path = storage.resolve(d.validationUri) if d.validationUri else None
        # The task-evaluation set is held out: none of its records may be trained on.
        held_out = [storage.resolve(cfg.evaluation.uri)] if cfg.evaluation else []
        self.data = data_mod.prepare(
            self.tokenizer, storage.resolve(d.uri), d.format, d.sequenceLength, d.packing,
            validation_path=val_path, validation_split=d.validationSplit, seed=t.seed, exclude_paths=held_out,
            redact=d.redact,
            skip_bad=d.skip_unparseable,
        )
        self.sampler = data_mod.GlobalBatchSampler(len(self.data.train_inputs), t.globalBatchSize, t.seed)
        self.total_steps = t.maxSteps or t.epochs * self.sampler.steps_per_epoch

        self.dump: dict[str, Any] = {}
        self._build_model()
        self.checkpoints = ckpt.CheckpointManager(ckpt.root_for(cfg), cfg.checkpoint.keepLast, self.rank,
                                                  remote=ckpt.remote_for(cfg))
        self.identity = ckpt.run_identity(cfg)
        # LoRA and QLoRA checkpoints hold the adapter weights only
        self.trainable_only = cfg.method in ADAPTER_METHODS
        self.reporter = metrics_mod.Reporter(enabled=self.rank == 0)
        self.peak_flops = metrics_mod.peak_flops_per_device(t.precision)
        self.flops_per_token = metrics_mod.flops_per_token(
            self.num_params["total"], hf_cfg.num_hidden_layers, hf_cfg.hidden_size, d.sequenceLength)
        self.stop_requested = False
        self.stop_agreed = False
        self.checkpoint_stall = 0.0  # seconds the last asynchronous checkpoint held training up
        self.losses: list[float] = []
        self.grad_norms: list[float] = []  # this attempt's steps only (for the verification dump)
        self.val_losses: dict[int, float] = {}
        self.initial_val_loss: float | None = None
        self.task_before: dict[str, Any] | None = None  # the base model's task metric (spec.evaluation)
        if t.precision == "fp16" and self.device.type != "cuda":
            from .config import ConfigError

            raise ConfigError("training.precision fp16 needs GPUs; use fp32 or bf16 on CPU")

    # --- setup ---------------------------------------------------------------------------
    def _build_model(self) -> None:
        cfg, dims = self.cfg, self.dims
        # Built on the meta device; no rank holds more than its own part (loading.py). QLoRA
        # reads tensor by tensor, quantizing as it reads, before FSDP shards the NF4 codes.
        self.top, self.lm = model_mod.build_meta(cfg, self.base_dir)
        # bf16 on a CPU without native bf16 kernels computes in fp32 from the bf16 weights
        # (precision.py says why: torch's fallback bf16 GEMM made backward ~100x slower).
        self.fp32_compute = precision_mod.computes_fp32(cfg.training.precision, self.device)
        if self.fp32_compute:
            n = precision_mod.upcast_frozen(self.top)
            log.info("bf16 without native bf16 kernels on this CPU: computing in fp32 from the stored "
                     "weights (%d frozen low-precision modules upcast on the fly)", n)
        self.attention = attention_mod.resolve(cfg.training.attention, self.device.type)
        attention_mod.apply(self.lm, self.attention)
        self.num_params = model_mod.num_parameters(self.top)
        if dims.tp > 1:
            apply_tensor_parallel(self.lm, self.mesh["tp"])
        if dims.pp > 1:
            prune_to_stage(self.lm, dims.stage_layers(self.pp_rank), self.is_first, self.is_last)
        self.compiled = compiled_mod.resolve(cfg.training.compile, self.device.type)
        if self.compiled:
            compiled_mod.compile_blocks(self.lm)  # lazy: traced at the first step, after loading
        fp32 = cfg.training.precision == "fp32" or self.fp32_compute
        self.fused = fused_mod.resolve(cfg.training.fused, self.device.type, compiled=self.compiled, fp32=fp32,
                                       qlora=cfg.method == "qlora", distillation=cfg.distillation is not None)
        if self.fused:
            fused_mod.apply(self.lm)
        # After the fused pieces (both swap the attention forward: the merged one keeps their RoPE).
        self.merged = merged_mod.resolve(cfg.training.mergedProjections, compiled=self.compiled)
        if self.merged:
            merged_mod.apply(self.lm, rotary=fused_mod.apply_rotary if self.fused else None)
        stage = CausalLMStage(self.lm, self.is_first, self.is_last)
        # FSDP2 shards the meta model first, then each rank reads its shard (QLoRA: reads, then shards)
        late = self.strategy.shards_on_meta and cfg.method != "qlora"

        def make_optimizer() -> torch.optim.Optimizer:
            if late:
                self._materialize()
            return self._build_optimizer()

        if not late:
            self._materialize()
        # The strategy builds the optimizer when its wrapping allows (DeepSpeed needs it to wrap).
        self.module, self.optimizer = self.strategy.wrap(self.top, stage, make_optimizer)
        self.loss_fn: TokenLoss | distill_mod.DistillLoss = TokenLoss()
        if cfg.distillation is not None:
            self.loss_fn = self._build_distillation()
        self.fused_head = self._fused_head()
        self.schedule = None
        if dims.pp > 1:
            from . import pipeline

            # FSDP units resharded after every micro-batch's backward (pipeline.py says why).
            self.schedule = pipeline.build_schedule(self.module, self.pp_rank, dims.pp, self.device,
                                                    self.mesh["pp"].get_group(), cfg.parallelism.pipelineSchedule,
                                                    dims.grad_accum, self.loss_fn)
        self.module.train()

    def _fused_head(self) -> bool:
        """Whether the last stage computes the loss with the head fused into it
        (``fused.head_loss``): with the fused pieces on, where the head's weight is a plain
        whole tensor in the forward - one data-parallel rank (the stage unwrapped) or DDP - and
        the loss is the plain token loss (not distillation) outside pipeline schedules."""
        if not self.fused or not self.is_last or self.dims.pp > 1 or not isinstance(self.loss_fn, TokenLoss):
            return False
        plain = not getattr(self.strategy, "wrapped", True) or self.strategy.name == "ddp"
        return plain and getattr(self.lm, "lm_head", None) is not None

    def _materialize(self) -> None:
        """Allocate and read this rank's part of the base model (``loading.materialize``)."""
        from . import loading

        zero3 = zero_mod.stage_of(self.cfg.parallelism.strategy) == 3 and self.dims.dp > 1
        if zero3:  # partitioned unit by unit: no rank holds the whole model
            loading.materialize_zero3(self.top, self.lm, self.base_dir, self.device, self.cfg.training.seed,
                                      zero_mod.ds_config(self.cfg, self.dims))
        elif self.cfg.method == "qlora":
            loading.materialize_qlora(self.top, self.lm, self.base_dir, self.device, self.cfg.training.seed)
        else:
            loading.materialize(self.top, self.lm, self.base_dir, self.device, self.cfg.training.seed)
        if os.environ.get(ENV_DUMP):
            if zero3:
                full = zero_mod.full_parameters(self.top)
                self.dump["initial_params"] = full if self.rank == 0 else None
            else:
                self.dump["initial_params"] = strategy_mod.gather_named(list(self.top.named_parameters()), self.mesh)

    def _build_distillation(self) -> distill_mod.DistillLoss:
        """The teacher (on the ranks that compute the loss: the last pipeline stage) and the
        distillation loss (``distill.py`` says where the teacher runs in each layout)."""
        d = self.cfg.distillation
        assert d is not None
        teacher = None
        if self.is_last:
            lm = distill_mod.load_teacher(distill_mod.teacher_dir(self.cfg))
            stage = distill_mod.place_teacher(lm, strategy=self.cfg.parallelism.strategy, mesh=self.mesh,
                                              tp=self.dims.tp, device=self.device)
            teacher = distill_mod.teacher_forward(stage)
            self.teacher_module = stage
        return distill_mod.DistillLoss(teacher, d.temperature, d.alpha, self._autocast)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        from torch.distributed.tensor import DTensor

        # Groups by (weight decay, DTensor or not): a fused/foreach kernel runs per group and
        # DTensor refuses lists that mix sharded and plain tensors (tensor parallelism leaves
        # norms and embeddings plain when there is no FSDP).
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for _, p in self.top.named_parameters():
            if p.requires_grad:
                buckets.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
        groups = [{"params": ps, "weight_decay": self.cfg.training.weightDecay if decay else 0.0}
                  for (decay, _), ps in sorted(buckets.items())]
        # The fused kernel makes one pass over parameters and state; the default multi-tensor
        # (foreach) path was 5x slower on CPU for a 26 M-parameter model (2.4 s vs 0.46 s per
        # step, measured here), which is what made a plain HF Trainer (fused by default) faster.
        return torch.optim.AdamW(groups, lr=self.cfg.training.learningRate, fused=True)

    # --- helpers -------------------------------------------------------------------------
    def _autocast(self):
        p = self.cfg.training.precision
        if p == "fp32" or self.fp32_compute:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _world_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # --- one step ------------------------------------------------------------------------
    def _train_step(self, step: int) -> float:
        t = self.cfg.training
        global_idx = self.sampler.global_batch(step)
        n_tokens = int((self.data.train_labels[global_idx] != data_mod.IGNORE_INDEX).sum())
        self.loss_fn.scale = self.dims.dp / max(1, n_tokens) * self.strategy.loss_scale()
        self.loss_fn.sums = []
        idx = self.sampler.rank_batch(step, self.dp_rank, self.dims.dp)
        x = self.data.train_inputs[idx].to(self.device)
        y_cpu = self.data.train_labels[idx]
        y = y_cpu.to(self.device)
        pos = self.data.train_positions[idx].to(self.device)
        if isinstance(self.loss_fn, distill_mod.DistillLoss):
            # The loss computes the teacher's logits for the rows the target names (distill.py).
            self.loss_fn.inputs, self.loss_fn.positions = x, pos
            y = distill_mod.with_rows(y)
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            with self._autocast():
                # Keyword arguments reach every stage (split into micro-batches like x).
                self.schedule.step(*((x,) if self.is_first else ()), target=y if self.is_last else None,
                                   losses=losses if self.is_last else None, position_ids=pos, return_outputs=False)
            # The schedule may call loss_fn outside the micro-batches (shape inference on the
            # first step): report from its per-micro-batch losses instead.
            self.loss_fn.sums = [loss.detach() / self.loss_fn.scale for loss in losses]
        else:
            mbs = t.microBatchSize
            n = x.shape[0] // mbs
            for m in range(n):
                rows = slice(m * mbs, (m + 1) * mbs)
                with self.strategy.sync_gradients(m == n - 1):
                    self.strategy.backward(self._micro_batch_loss(x[rows], y[rows], pos[rows], y_cpu[rows]))
        local = float(sum(s.item() for s in self.loss_fn.sums))
        stop = 1.0 if self.stop_requested else 0.0
        total, stops = self._world_sum([local if self.is_last else 0.0, stop])
        # Decide on the agreed flag only: a signal may land on one rank after this point.
        self.stop_agreed = stops > 0
        # The last stage's tp ranks all computed the same (replicated) loss.
        return total / (self.dims.tp * max(1, n_tokens))

    def _micro_batch_loss(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                          y_cpu: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch (rows of the step's inputs ``x``, labels ``y`` and their
        CPU copy ``y_cpu``, positions ``pos``), as the training and the validation loops both
        compute it: trimmed (:meth:`_trim`), logits at the target positions only
        (:meth:`_targets_at`), the loss function on the matching labels (:meth:`_labels_at`).
        The logits are not kept past the loss: freed before the next micro-batch's forward."""
        xb, yb, pb, yb_cpu = self._trim(x, y, pos, y_cpu)
        at = self._targets_at(yb_cpu)
        if self.fused_head:
            assert isinstance(self.loss_fn, TokenLoss)
            with self._autocast():
                return self.loss_fn.add_sum(self.module(xb, pb, at, self._labels_at(yb, at)))
        with self._autocast():
            logits = self.module(xb, pb, at)
        return self.loss_fn(logits, self._labels_at(yb, at))

    def _trim(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
              y_cpu: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One micro-batch without its columns after the last target (:func:`data.target_span`
        of its CPU labels ``y_cpu``): right padding of short records costs no compute, and no
        loss or gradient changes (causal attention). Kept at full width where shapes must not
        vary: pipeline schedules (fixed shapes between stages; they do not call this), tensor
        parallelism (sharded sequence), compiled blocks (a new shape would recompile) and
        distillation (its loss reads the whole rows)."""
        if self.dims.tp > 1 or self.compiled or isinstance(self.loss_fn, distill_mod.DistillLoss):
            return x, y, pos, y_cpu
        width = data_mod.target_span(y_cpu)
        if width == y_cpu.shape[1]:
            return x, y, pos, y_cpu
        return x[:, :width], y[:, :width], pos[:, :width], y_cpu[:, :width]

    def _targets_at(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The positions of a micro-batch (its CPU ``labels``) that need logits
        (``parallelize.target_positions``), or None for logits everywhere: distillation
        compares whole rows of student and teacher logits. Pipeline schedules keep every
        position too (their stages exchange fixed shapes); they do not call this."""
        if isinstance(self.loss_fn, distill_mod.DistillLoss):
            return None
        return target_positions(labels, self.device)

    @staticmethod
    def _labels_at(labels: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        """The labels that go with the stage's logits for ``targets_at`` = ``at``."""
        return labels if at is None else labels.flatten().index_select(0, at)

    def _optimizer_step(self, lr: float) -> float:
        """Clip (``training.maxGradNorm``), step and zero the gradients; returns the whole
        gradient's norm before clipping."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return self.strategy.optimizer_step()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss on the validation set (None without one)."""
        vx, vy, vpos = self.data.val_inputs, self.data.val_labels, self.data.val_positions
        n = len(vx)
        if n == 0:
            return None
        self.module.eval()
        gb, local_bs, mbs = self.cfg.training.globalBatchSize, self.dims.local_batch_size, self.cfg.training.microBatchSize
        ce_sum, count = 0.0, 0.0
        # Every rank runs the same number of batches (collectives must match): the last
        # global batch is padded with samples that have no targets.
        for start in range(0, n, gb):
            idx = list(range(start, min(n, start + gb)))
            mine = idx[self.dp_rank * local_bs:(self.dp_rank + 1) * local_bs]
            x = torch.full((local_bs, vx.shape[1]), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            y = torch.full((local_bs, vy.shape[1]), data_mod.IGNORE_INDEX, dtype=torch.long)
            pos = torch.arange(vx.shape[1], dtype=torch.long).repeat(local_bs, 1)
            if mine:
                x[: len(mine)], y[: len(mine)], pos[: len(mine)] = vx[mine], vy[mine], vpos[mine]
            y_cpu = y
            x, y, pos = x.to(self.device), y.to(self.device), pos.to(self.device)
            self.loss_fn.scale, self.loss_fn.sums = 1.0, []
            with self._autocast():
                if self.schedule is not None:
                    losses: list[torch.Tensor] = []
                    self.schedule.eval(*((x,) if self.is_first else ()), target=y if self.is_last else None,
                                       losses=losses if self.is_last else None, position_ids=pos,
                                       return_outputs=False)
                    self.loss_fn.sums = [loss.detach() for loss in losses]
                else:
                    for m in range(0, local_bs, mbs):
                        rows = slice(m, m + mbs)
                        self._micro_batch_loss(x[rows], y[rows], pos[rows], y_cpu[rows])
            if self.is_last:
                ce_sum += float(sum(s.item() for s in self.loss_fn.sums))
                count += float((y != data_mod.IGNORE_INDEX).sum())
        self.module.train()
        self.strategy.reshard()
        total, tokens = self._world_sum([ce_sum, count])
        return total / tokens if tokens else None

    # --- checkpoints ---------------------------------------------------------------------
    def _state(self, step: int) -> dict[str, Any]:
        return {"losses": self.losses, "validationLosses": {str(k): v for k, v in self.val_losses.items()},
                "initialValidationLoss": self.initial_val_loss, "taskBefore": self.task_before, "parallel": self.layout,
                ckpt.IDENTITY_KEY: self.identity,
                "sampler": {**self.sampler.state_dict(), "step": step}}

    def save_checkpoint(self, step: int, asynchronous: bool = False) -> None:
        """Checkpoint ``step``: synchronously (SIGTERM, the end), or started in the background
        (interval checkpoints: ``CheckpointManager.save_async``), completed by
        :meth:`_finish_checkpoint` after the next step. A pending one completes first."""
        self._finish_checkpoint()
        self.strategy.reshard()
        model_sd, optim_sd = self.strategy.checkpoint_state(self.trainable_only)
        if asynchronous:
            began = time.perf_counter()
            self.checkpoints.save_async(step, model_sd, optim_sd, self._state(step))
            self.checkpoint_stall = time.perf_counter() - began  # what training waited for: the CPU copy
            return
        path = self.checkpoints.save(step, model_sd, optim_sd, self._state(step))
        self._report_checkpoint(step, path)

    def _finish_checkpoint(self) -> None:
        """Complete the pending asynchronous checkpoint, if any (every rank, at the same step)."""
        pending = self.checkpoints.pending
        if pending is None:
            return
        began = time.perf_counter()
        self.checkpoints.wait()
        stall = self.checkpoint_stall + time.perf_counter() - began
        self._report_checkpoint(pending[1], pending[2], stallSeconds=round(stall, 4), asynchronous=True)

    def _report_checkpoint(self, step: int, path: Any, **extra: Any) -> None:
        self.reporter.update(last_checkpoint=step)
        if self.rank == 0:
            metrics_mod.emit_event("checkpoint", step=step, path=str(path), **extra)

    def resume(self) -> int:
        # Another run's checkpoint is refused (CheckpointMismatch, exit 78) before anything is
        # loaded, and before any save of this run could prune that run's checkpoints.
        path = ckpt.check_resumable(self.cfg)
        if path is None:
            return 0
        if self.checkpoints.remote:  # s3://: each node's leader downloads the newest complete one
            path = ckpt.fetch_latest(self.cfg, self.checkpoints.local_leader)
            dist.barrier()
            assert path is not None
        model_sd, optim_sd = self.strategy.load_targets(self.trainable_only)
        state = self.checkpoints.load(path, model_sd, optim_sd)
        self.strategy.restore(model_sd, optim_sd)
        self.losses = list(state.get("losses", []))
        self.val_losses = {int(k): v for k, v in state.get("validationLosses", {}).items()}
        self.initial_val_loss = state.get("initialValidationLoss")
        self.task_before = state.get("taskBefore")
        step = int(state["step"])
        self.sampler.load_state_dict(state.get("sampler", {"step": step}))
        if self.rank == 0:
            metrics_mod.emit_event("resume", step=step, path=str(path), fromLayout=state.get("parallel"),
                                   layout=self.layout)
        return step

    # --- verification dumps --------------------------------------------------------------
    def _dump_grads(self) -> None:
        self.dump["grads"] = self.strategy.full_grads()

    def _dump_final(self, path: str) -> None:
        self.strategy.reshard()
        params = self.strategy.full_parameters()
        self.dump.update(self.strategy.dump_extras())
        probe = None
        if self.dims.pp == 1:
            with torch.no_grad():
                self.module.eval()
                probe = self.module(self.data.train_inputs[:2].to(self.device),
                                    self.data.train_positions[:2].to(self.device)).detach().cpu()
                self.module.train()
            self.strategy.reshard()
        if self.rank == 0:
            self.dump.update(params=params, probe_input=self.data.train_inputs[:2].clone(),
                             probe_positions=self.data.train_positions[:2].clone(), probe_logits=probe,
                             losses=list(self.losses), grad_norms=list(self.grad_norms), val_losses=dict(self.val_losses),
                             initial_val_loss=self.initial_val_loss, layout=self.layout)
            torch.save(self.dump, path)

    def _maybe_inject_fault(self, step: int) -> None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        target_rank = int(os.environ.get(ENV_FAULT_RANK, str(self.world - 1)))
        if self.rank != target_rank:
            return
        if os.environ.get(ENV_KILL_AT) == str(step):
            log.warning("fault injection: SIGKILL after step %d", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get(ENV_SIGTERM_AT) == str(step):
            log.warning("fault injection: SIGTERM after step %d", step)
            os.kill(os.getpid(), signal.SIGTERM)

    # --- the run -------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, _frame: Any) -> None:
        # Only note it: the step in flight finishes, then all ranks agree to stop together.
        log.warning("SIGTERM: checkpointing after the current step, then exiting")
        self.stop_requested = True

    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        signal.signal(signal.SIGTERM, self._on_sigterm)
        dump_path = os.environ.get(ENV_DUMP)
        start = self.resume()
        tokens_per_step = t.globalBatchSize * cfg.dataset.sequenceLength
        if self.rank == 0:
            metrics_mod.emit_event("start", totalSteps=self.total_steps, startStep=start, layout=self.layout,
                                   attention=self.attention, compiled=self.compiled,
                                   parameters=self.num_params, trainSamples=len(self.data.train_inputs),
                                   validationSamples=len(self.data.val_inputs),
                                   **({"redactions": self.data.redactions} if cfg.dataset.redact else {}))
        self.reporter.update(total_steps=self.total_steps, step=start)
        if start == 0:
            self.initial_val_loss = self.evaluate()
            if self.initial_val_loss is not None and self.rank == 0:
                metrics_mod.emit_event("eval", step=0, validationLoss=self.initial_val_loss)
            if cfg.evaluation is not None:
                if self.rank == 0:
                    base = models.load_causal_lm(str(self.base_dir), device=self.device)
                    self.task_before = self._task_metric("before", base)
                    del base
                dist.barrier()
        step = start
        while step < self.total_steps:
            began = time.perf_counter()
            lr = lr_at(step, self.total_steps, t.learningRate, t.warmupSteps)
            torch.manual_seed(t.seed + step)  # dropout masks depend on the step only: exact resume
            loss = self._train_step(step)
            if dump_path and step == 0:
                self._dump_grads()
            grad_norm = self._optimizer_step(lr)
            step += 1
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            elapsed = time.perf_counter() - began
            tps = tokens_per_step / elapsed if elapsed > 0 else 0.0
            mfu = (tps * self.flops_per_token / (self.world * self.peak_flops)) if self.peak_flops else None
            epoch = self.sampler.epoch_of(step - 1)
            self.reporter.update(step=step, epoch=epoch, loss=loss, tokens_per_second=tps, learning_rate=lr, mfu=mfu,
                                 grad_norm=grad_norm)
            if self.rank == 0:
                metrics_mod.emit_event("step", step=step, totalSteps=self.total_steps, epoch=epoch, loss=loss,
                                       tokensPerSecond=round(tps, 2), learningRate=lr, gradNorm=grad_norm,
                                       **({"mfu": mfu} if mfu is not None else {}))
            # The previous step's interval checkpoint was written while this step computed.
            self._finish_checkpoint()
            if t.evalIntervalSteps and step % t.evalIntervalSteps == 0 and step < self.total_steps:
                val = self.evaluate()
                if val is not None:
                    self.val_losses[step] = val
                    if self.rank == 0:
                        metrics_mod.emit_event("eval", step=step, validationLoss=val)
            interval = cfg.checkpoint.intervalSteps
            if self.stop_agreed:  # the step in flight, synchronously (after a pending one)
                self.save_checkpoint(step)
            elif interval and step % interval == 0 and step < self.total_steps:
                self.save_checkpoint(step, asynchronous=True)
            if self.stop_agreed:
                if self.rank == 0:
                    metrics_mod.emit_event("stopped", step=step, reason="SIGTERM")
                return EXIT_SIGTERM
            self._maybe_inject_fault(step)
        final_val = self.evaluate()
        if final_val is not None:
            self.val_losses[step] = final_val
            if self.rank == 0:
                metrics_mod.emit_event("eval", step=step, validationLoss=final_val)
        self._finish_checkpoint()
        if self.checkpoints.last_saved_step != step:
            self.save_checkpoint(step)
        if dump_path:
            self._dump_final(dump_path)
        summary = {
            "steps": step, "finalLoss": self.losses[-1] if self.losses else None,
            "initialValidationLoss": self.initial_val_loss, "finalValidationLoss": final_val,
            "datasetDigest": self.data.digest, "datasetRedactedDigest": self.data.redacted_digest, "trainRecords": self.data.num_train_records,
            "validationRecords": self.data.num_val_records, "heldOutRecordsRemoved": self.data.dropped_overlap,
            "parallel": self.layout,
            **({"redactions": self.data.redactions} if cfg.dataset.redact else {}),
        }
        quality = contract.data_quality_from_env()  # measured by the preflight (launch.py)
        if quality is not None:
            summary["dataQuality"] = quality
        why_not = shard_output.supported(cfg)
        if why_not is None:  # every rank writes its part of the output (shard_output.py)
            self.strategy.reshard()
            shard_output.write(self.top, self.lm, cfg, self.base_dir)
            if self.rank == 0:
                output_mod.save_output(None, self.tokenizer, cfg, self.base_dir, summary)
        elif self.rank == 0:
            log.info("output written from one process (%s)", why_not)
            self._write_output(summary)
        if self.rank == 0:
            self._write_result(summary)
        dist.barrier()
        if self.rank == 0:
            output = cfg.output.uri if storage.is_s3(cfg.output.uri) else str(storage.local_path(cfg.output.uri))
            metrics_mod.emit_event("done", **summary, output=output)
        return contract.EXIT_OK

    def _write_output(self, summary: dict[str, Any]) -> None:
        """Rank 0: rebuild the model from the last checkpoint, measure the task metric on it
        (the model as it is written), then write it with its lineage record."""
        last = ckpt.latest(self.checkpoints.root)
        assert last is not None
        if self.checkpoints.remote:  # other nodes' shards are only in the bucket
            storage.download_s3_dir(ckpt.remote_step_uri(self.checkpoints.remote, int(last.name[len(ckpt.PREFIX):])),
                                    last, skip_existing=True)
        model = output_mod.output_model(ckpt.load_single_process(last, self.cfg, self.base_dir), self.cfg)
        if self.cfg.evaluation is not None:
            after = self._task_metric("after", model.to(self.device))
            before = self.task_before or {}
            summary["evaluation"] = {"metric": after["metric"], "before": before.get("value"), "after": after["value"],
                                     "samples": after["samples"]}
            # For the lineage record only: with it a QuantizeJob of this output can reuse "after"
            # as its input's figure instead of measuring the same model on the same records again.
            summary["evaluationDataDigest"] = lineage_mod.file_digest(storage.resolve(self.cfg.evaluation.uri))
        output_mod.save_output(model, self.tokenizer, self.cfg, self.base_dir, summary)

    def _task_metric(self, stage: str, model: nn.Module) -> dict[str, Any]:
        """The held-out task metric of ``model`` by greedy generation (rank 0 only: other ranks
        wait at the next collective)."""
        from .. import evaluate

        ev = self.cfg.evaluation
        assert ev is not None
        log.info("task evaluation (%s): %s on up to %d records of %s", stage, ev.metric, ev.maxSamples, ev.uri)
        model.eval()
        result = evaluate.evaluate(model, self.tokenizer, storage.resolve(ev.uri), self.cfg.dataset.format,
                                   ev.metric, ev.maxSamples)
        metrics_mod.emit_event("taskEval", stage=stage, **result)
        self.reporter.task(stage, result["value"])
        return result

    def _write_result(self, summary: dict[str, Any]) -> None:
        """Rank 0: the compact result into the termination log, which the operator copies into
        the FineTuneJob's status.result (the pod has no API access)."""
        path = contract.termination_log_path()
        if path is None:
            return
        keys = ("steps", "finalLoss", "initialValidationLoss", "finalValidationLoss", "evaluation", "datasetDigest", "dataQuality",
                "lineageDigest")
        result = {"kind": contract.RESULT_KIND, **{k: summary.get(k) for k in keys if summary.get(k) is not None}}
        try:
            path.write_text(json.dumps(_finite(result), separators=(",", ":"))[:4000])
        except OSError as exc:
            log.warning("could not write the result to %s: %s", path, exc)

    def close(self) -> None:
        self.reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()
