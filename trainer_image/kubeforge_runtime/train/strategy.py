"""The data-parallel strategy of a training run behind one object: FSDP2, DDP or DeepSpeed ZeRO.

Called by the trainer (``trainer.py``), which builds one with :func:`build` from
``parallelism.strategy`` and calls it wherever the strategies differ, so that its loop has
no strategy branches; and by ``launch.py`` (:func:`check_available`, before torchrun
starts). Tensor and pipeline parallelism are not strategies: ``parallelize.py`` applies them
to the model before :meth:`DataParallelStrategy.wrap` (FSDP and DDP combine with them; ZeRO
runs data parallel only, which config.py enforces).

The protocol, in the order the trainer calls it:

``wrap(top, stage, make_optimizer) -> (module, optimizer)``
    ``Trainer._build_model``, once, after tensor parallelism and pipeline pruning: wrap the
    stage for data parallelism and build the trainer's AdamW with ``make_optimizer``, in the
    order the strategy needs (FSDP/DDP wrap first so that the optimizer holds the sharded
    parameters; DeepSpeed takes the model and the optimizer together). ``module`` is what
    the loop calls (and a pipeline stage runs); the trainer sets the learning rate on
    ``optimizer``'s param groups before every step.
``loss_scale() -> float``
    ``_train_step``: the factor the loss is multiplied by before backward (fp16's GradScaler
    scale, else 1).
``sync_gradients(enabled) -> context manager``
    ``_train_step``, around each micro-batch's forward and backward (without pipelining:
    the pipeline schedule does this itself): gradients are reduced over the data-parallel
    ranks on the step's last micro-batch only.
``backward(loss)``
    ``_train_step``: backward of one micro-batch's loss, already normalised for the global batch.
``optimizer_step() -> float``
    ``_optimizer_step``: clip to ``training.maxGradNorm``, step and zero the gradients;
    returns the whole gradient's norm before clipping (what one process would compute).
``reshard()``
    ``evaluate``, ``save_checkpoint``, ``_dump_final``: after forward-only passes FSDP's root
    stays gathered; checkpoints and optimizer state are keyed by the sharded parameters.
``checkpoint_state(trainable_only) -> (model_sd, optim_sd)``
    ``save_checkpoint``: this rank's part for DCP, in the runtime's one format (keys are the
    unwrapped model's parameter names, see checkpoint.py), whatever the strategy.
``load_targets(trainable_only) -> (model_sd, optim_sd)`` then ``restore(model_sd, optim_sd)``
    ``resume``: templates DCP loads into in place, then their contents into the model and
    the optimizer.
``full_grads()``, ``full_parameters()``, ``dump_extras()``
    ``_dump_grads`` / ``_dump_final`` (``KUBEFORGE_TRAIN_DUMP``, the verification dumps):
    whole tensors by parameter name on rank 0 (collectives: every rank calls them), and
    what else the strategy reports (ZeRO: what this rank's partitions hold).

The implementations: :class:`FSDPStrategy`, :class:`DDPStrategy` (sharing the trainer's own
clipping in :mod:`gradients` and the fp16 GradScaler) and :class:`ZeROStrategy` (DeepSpeed's
engine, through the helpers in ``zero.py``). DeepSpeed and the FSDP/DDP modules are imported
inside the methods, so only a ZeRO run imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import gradients, zero
from .config import ConfigError, TrainConfig
from .parallel_dims import ParallelDims
from .parallelize import CausalLMStage, decoder, layer_items
from .qlora import is_nf4

log = logging.getLogger(__name__)

StateDicts = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
OptimizerFactory = Callable[[], torch.optim.Optimizer]


class DataParallelStrategy(Protocol):
    """What the trainer needs from a data-parallel strategy (see the module docstring)."""

    name: str
    shards_on_meta: bool
    """Whether ``wrap`` takes the model still on the meta device (the weights are read inside
    ``make_optimizer``, after sharding) or already loaded."""

    def wrap(self, top: nn.Module, stage: CausalLMStage,
             make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``stage`` and build the optimizer; returns (module to call, the trainer's optimizer)."""

    def loss_scale(self) -> float:
        """The factor for the loss before backward (1 without fp16 loss scaling)."""

    def sync_gradients(self, enabled: bool) -> AbstractContextManager[Any]:
        """Around one micro-batch: reduce its gradients over dp only when ``enabled``."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (globally normalised) loss."""

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""

    def reshard(self) -> None:
        """Put parameters gathered by a forward-only pass back into their sharded form."""

    def checkpoint_state(self, trainable_only: bool) -> StateDicts:
        """(model, optimizer) state of this rank for a DCP save."""

    def load_targets(self, trainable_only: bool) -> StateDicts:
        """(model, optimizer) templates DCP loads a checkpoint into."""

    def restore(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor]) -> None:
        """Put loaded (``load_targets``) state into the model and optimizer."""

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        """Whole gradients of the trainable parameters (rank 0; a collective)."""

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        """Whole copies of every parameter (rank 0; a collective)."""

    def dump_extras(self) -> dict[str, Any]:
        """More entries for the verification dump."""


def gather_named(named: list[tuple[str, torch.Tensor | None]], mesh: Any) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) copies of named tensors from all ranks, merged on rank 0 (a collective;
    plain tensors are taken as they are, DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    local = {}
    for name, tensor in named:
        if tensor is None:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_nf4(full):  # a QLoRA base weight: its dequantized value
            full = full.get_original_weight()
        local[name] = full.detach().to("cpu", copy=True)
    rank = dist.get_rank()
    gathered: list[Any] = [None] * dist.get_world_size() if rank == 0 else None  # type: ignore[assignment]
    # One copy per pipeline stage: the stage's dp 0 / tp 0 rank holds all of it whole.
    first = mesh["dp"].get_local_rank() == 0 and mesh["tp"].get_local_rank() == 0
    dist.gather_object(local if first else {}, gathered, dst=0)
    if rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


class _TorchStrategy:
    """What FSDP2 and DDP share: autograd backward, the trainer's own clipping
    (:mod:`gradients`, correct in any (pp, dp, tp) layout), fp16 loss scaling with a
    GradScaler, and checkpoint state straight from the parameters and AdamW (DTensors stay
    sharded; DCP writes each rank's part)."""

    name = ""
    shards_on_meta = False
    """True: ``wrap`` shards a meta-device model and the weights are read after it (FSDP2);
    False: the trainer reads the weights before ``wrap`` (DDP broadcasts them, DeepSpeed
    partitions real tensors)."""

    def __init__(self, cfg: TrainConfig, dims: ParallelDims, mesh: Any) -> None:
        self.cfg, self.dims, self.mesh = cfg, dims, mesh
        self.scaler = torch.amp.GradScaler("cuda") if cfg.training.precision == "fp16" else None
        self.top: nn.Module
        self.module: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.wrapped = False  # False with one data-parallel rank: the stage runs as it is

    @classmethod
    def check_available(cls, name: str) -> None:
        """Raise ConfigError when this strategy cannot run in this image (torch alone suffices)."""

    def wrap(self, top: nn.Module, stage: CausalLMStage,
             make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.top = top
        dp_mesh = self.mesh["dp"]
        self.wrapped = dp_mesh.size() > 1
        self.module = self._wrap(stage, dp_mesh) if self.wrapped else stage
        self.optimizer = make_optimizer()  # after wrapping: FSDP replaces the parameters with sharded ones
        return self.module, self.optimizer

    def _wrap(self, stage: CausalLMStage, dp_mesh: Any) -> nn.Module:
        raise NotImplementedError

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def sync_gradients(self, enabled: bool) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grads = [p.grad for p in self.top.parameters() if p.grad is not None]
        norm = gradients.total_norm(grads, self.mesh["pp"].get_group() if self.dims.pp > 1 else None)
        if self.cfg.training.maxGradNorm > 0:
            gradients.clip_(grads, self.cfg.training.maxGradNorm, norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reshard(self) -> None:
        pass

    def checkpoint_state(self, trainable_only: bool) -> StateDicts:
        return ckpt.model_state(self.top, trainable_only), ckpt.optimizer_state(self.top, self.optimizer)

    def load_targets(self, trainable_only: bool) -> StateDicts:
        return ckpt.model_state(self.top, trainable_only), ckpt.optimizer_state(self.top, self.optimizer, init=True)

    def restore(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor]) -> None:
        # DCP fills DTensor shards and plain tensors in place (the optimizer's too); this makes
        # the (possibly non-parameter) entries and any wrapper bookkeeping consistent.
        self.top.load_state_dict(model_sd, strict=False)

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        return self._gather_named([(n, p.grad) for n, p in self.top.named_parameters() if p.requires_grad])

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        return self._gather_named(list(self.top.named_parameters()))

    def dump_extras(self) -> dict[str, Any]:
        return {}

    def _gather_named(self, named: list[tuple[str, torch.Tensor | None]]) -> dict[str, torch.Tensor] | None:
        return gather_named(named, self.mesh)


def fsdp_units(stage: CausalLMStage) -> list[nn.Module | list[nn.Module]]:
    """The modules FSDP2 gathers one at a time, before the stage's root (torchtitan's units):
    each decoder layer, the embedding, and the final norm with ``lm_head`` - so that no rank
    holds a whole embedding or head longer than its own forward and backward. A tied head
    (``lm_head.weight`` is the embedding) stays in the root unit with the embedding: one
    parameter cannot belong to two units."""
    lm = stage.lm
    units: list[nn.Module | list[nn.Module]] = [layer for _, layer in layer_items(lm)]
    dec = decoder(lm)
    embed, norm, head = dec.embed_tokens, dec.norm, getattr(lm, "lm_head", None)
    if embed is not None and head is not None and head.weight is embed.weight:
        return units
    if embed is not None:
        units.append(embed)
    if head is not None:
        units.append([norm, head] if norm is not None else head)
    return units


class FSDPStrategy(_TorchStrategy):
    """FSDP2 ``fully_shard`` per unit (:func:`fsdp_units`) plus the stage root over the mesh's
    "dp" dimension: parameters, gradients and optimizer state sharded (the ZeRO-3
    equivalent). Every unit is resharded after its forward and after its backward, pipeline
    stages included (``pipeline.ReshardingStage``: torch's own stage would keep every unit
    gathered from the first micro-batch's backward to the step's end): a stage re-gathers a
    layer for each micro-batch's forward and backward instead of holding its whole stage
    gathered (memory first: this is what lets a model larger than one process train)."""

    name = "fsdp"
    shards_on_meta = True

    def _wrap(self, stage: CausalLMStage, dp_mesh: Any) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for unit in fsdp_units(stage):
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=True)
        fully_shard(stage, mesh=dp_mesh, reshard_after_forward=True)
        return stage

    def sync_gradients(self, enabled: bool) -> AbstractContextManager[Any]:
        if self.wrapped:
            self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        return contextlib.nullcontext()

    def reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


class DDPStrategy(_TorchStrategy):
    """``DistributedDataParallel`` over the mesh's "dp" dimension: everything replicated."""

    name = "ddp"

    def _wrap(self, stage: CausalLMStage, dp_mesh: Any) -> nn.Module:
        if self.dims.tp > 1:
            raise ConfigError("parallelism.strategy ddp cannot be combined with tensor parallelism; use fsdp")
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in stage.parameters()):
            raise ConfigError("nothing to train on this pipeline stage (no trainable parameters); check lora.targetModules")
        return DDP(stage, process_group=dp_mesh.get_group(), find_unused_parameters=False)

    def sync_gradients(self, enabled: bool) -> AbstractContextManager[Any]:
        if self.wrapped and not enabled:
            return self.module.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()


class ZeROStrategy:
    """DeepSpeed ZeRO stage 1, 2 or 3 (``deepspeed-zero<N>``): the engine partitions the
    optimizer state (plus gradients, plus parameters), reduces, clips and steps; checkpoints
    stay in the runtime's DCP format (see ``zero.py`` for what ZeRO gets and what stays the
    trainer's)."""

    shards_on_meta = False  # read before wrapping: ZeRO-3 into partitions, unit by unit (loading.materialize_zero3)

    def __init__(self, cfg: TrainConfig, dims: ParallelDims, mesh: Any) -> None:
        self.cfg, self.dims, self.mesh = cfg, dims, mesh
        self.name = cfg.parallelism.strategy
        self.top: nn.Module
        self.engine: Any
        self.optimizer: torch.optim.Optimizer

    @classmethod
    def check_available(cls, name: str) -> None:
        zero.require_deepspeed(name)

    def wrap(self, top: nn.Module, stage: CausalLMStage,
             make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.top = top
        # The engine takes the model and the optimizer together (it partitions the optimizer's state).
        self.optimizer = make_optimizer()
        self.engine = zero.wrap(stage, self.optimizer, self.cfg, self.dims)
        return self.engine, self.optimizer

    def loss_scale(self) -> float:
        return 1.0  # fp16 (DeepSpeed's own loss scaler) is refused by config.py

    def sync_gradients(self, enabled: bool) -> AbstractContextManager[Any]:
        self.engine.set_gradient_accumulation_boundary(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised for the whole global batch: no 1/GAS scaling.
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self) -> float:
        # The accumulation boundary: reduce, clip (DeepSpeed's gradient_clipping), step, zero.
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def reshard(self) -> None:
        pass  # ZeRO-3 re-partitions parameters after every forward itself

    def checkpoint_state(self, trainable_only: bool) -> StateDicts:
        return zero.model_state(self.top, trainable_only), zero.optimizer_state(self.top, self.engine)

    def load_targets(self, trainable_only: bool) -> StateDicts:
        return zero.model_state(self.top, trainable_only), zero.empty_optimizer_state(self.top)

    def restore(self, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor]) -> None:
        zero.restore(self.top, self.engine, model_sd, optim_sd)

    def full_grads(self) -> dict[str, torch.Tensor] | None:
        return zero.full_grads(self.top)  # a collective for ZeRO-3: every rank calls it

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        return zero.full_parameters(self.top)

    def dump_extras(self) -> dict[str, Any]:
        return {"zero": zero.partition_sizes(self.top, self.engine)}


StrategyClass = type[_TorchStrategy] | type[ZeROStrategy]

STRATEGIES: dict[str, StrategyClass] = {
    "fsdp": FSDPStrategy,
    "ddp": DDPStrategy,
    **{f"{zero.PREFIX}{n}": ZeROStrategy for n in (1, 2, 3)},
}
"""``parallelism.strategy`` -> implementation. Importing this table imports no DeepSpeed
(zero.py imports it inside its functions)."""


def strategy_class(name: str) -> StrategyClass:
    """The implementation of ``name``; ConfigError (exit 78) naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"parallelism.strategy {name!r} is not supported by this runtime; "
                          f"choose one of {', '.join(STRATEGIES)}") from None


def check_available(name: str) -> None:
    """ConfigError when ``name`` is unknown or cannot run in this image (ZeRO without DeepSpeed)."""
    strategy_class(name).check_available(name)


def build(cfg: TrainConfig, dims: ParallelDims, mesh: Any) -> DataParallelStrategy:
    """The strategy of ``cfg.parallelism.strategy`` for this run (``mesh``: the ("pp", "dp", "tp") mesh)."""
    return strategy_class(cfg.parallelism.strategy)(cfg, dims, mesh)
