"""DeepSpeed ZeRO (stages 1, 2, 3) as the data-parallel strategy ``deepspeed-zero<N>``.

The DeepSpeed-specific helpers (config, wrapping, state gather/scatter) of
:class:`strategy.ZeROStrategy`, which the trainer calls when ``parallelism.strategy`` is
``deepspeed-zero1|2|3`` (data parallel only: the API and the config check refuse
tensor/pipeline degrees > 1 with it); ``launch.py`` checks DeepSpeed is importable through
``strategy.check_available``. DeepSpeed is imported inside the functions only.

What ZeRO gets and what stays the trainer's, so that every strategy computes the same thing:

* The trainer keeps its own loss normalisation (token losses summed, scaled by
  dp / target tokens of the global batch) and the strategy calls ``engine.backward(loss,
  scale_wrt_gas=False)``: DeepSpeed's own 1/GAS scaling would double-normalise. ZeRO
  averages gradients over the data-parallel ranks, as FSDP and DDP do, which the dp factor
  undoes - the gradient equals one process's on the whole batch.
* The optimizer is the trainer's fused ``torch.optim.AdamW`` (DeepSpeed's FusedAdam needs
  CUDA and its CPUAdam a compiled extension); ZeRO partitions its state. The learning rate
  is set on its param groups before each boundary step, as for the other strategies.
* Master weights stay fp32 and bf16 is the same ``torch.autocast`` the other strategies use
  (DeepSpeed's ``bf16`` section would instead cast the model's weights to bf16 and change
  the numerics). fp16 is refused: DeepSpeed's fp16 mode has its own loss scaler and casts
  weights, which this runtime does not test; use bf16.
* Checkpoints are the runtime's own DCP format (checkpoint.py), not DeepSpeed's
  ``save_checkpoint`` layout: full tensors per parameter name, gathered with DeepSpeed's
  public ``safe_get_full_*`` API. So a ZeRO checkpoint resumes under any other strategy or
  data-parallel degree (elastic restarts), loads in one process for the output, and
  vice versa. The price: a save or resume holds a full copy of the weights and of AdamW's
  two moments on every rank for a moment (3x the fp32 model size) - fine for the models
  one fine-tunes with data parallelism alone, too much for a model that only fits because
  ZeRO-3 partitions it; use ``fsdp`` there, whose checkpoints stay sharded.

Where it does not work (said plainly, also in CONTRACT.md): tensor or pipeline parallelism
combined with ZeRO, fp16, and DeepSpeed's own optimizers/offload. CPU runs use gloo
(DeepSpeed's CPU accelerator picks it when oneCCL is absent); ZeRO-3 on CPU is covered by
the same equivalence tests as stages 1 and 2.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .parallel_dims import ParallelDims

log = logging.getLogger(__name__)

PREFIX = "deepspeed-zero"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def stage_of(strategy: str) -> int | None:
    """The ZeRO stage of a strategy name, None for the non-DeepSpeed strategies."""
    return int(strategy.removeprefix(PREFIX)) if strategy.startswith(PREFIX) else None


def require_deepspeed(strategy: str) -> None:
    """Fail as a configuration error (exit 78) when DeepSpeed cannot be imported."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"parallelism.strategy {strategy!r} needs the deepspeed package, which this image lacks "
            f"({exc}); install kubeforge[deepspeed] (the bundled trainer image has it) or use 'fsdp'"
        ) from exc


def ds_config(cfg: TrainConfig, dims: ParallelDims) -> dict[str, Any]:
    """The DeepSpeed config for this run (batch sizes as the trainer slices them)."""
    stage = stage_of(cfg.parallelism.strategy)
    zero: dict[str, Any] = {"stage": stage}
    if not torch.cuda.is_available():
        zero["overlap_comm"] = False  # no CUDA streams to overlap with: reduce in the backward pass itself
    if stage == 3:
        # Partition every parameter. DeepSpeed's default keeps tensors under 100k elements
        # whole on every rank (norms; for a small model, everything - ZeRO-3 would then
        # partition nothing); the extra gathers for norms are small next to the layers'.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": cfg.training.globalBatchSize,
        "train_micro_batch_size_per_gpu": cfg.training.microBatchSize,
        "gradient_accumulation_steps": dims.grad_accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the trainer's torch AdamW (see the module docstring)
        "gradient_clipping": cfg.training.maxGradNorm,  # 0 disables, as in the trainer
        "steps_per_print": 2**31 - 1,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
    }


def wrap(stage_module: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, dims: ParallelDims) -> Any:
    """``deepspeed.initialize`` over the existing process group; returns the engine."""
    require_deepspeed(cfg.parallelism.strategy)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=stage_module, optimizer=optimizer,
                                           config=ds_config(cfg, dims), dist_init_required=False)
    _create_adam_state(_inner_optimizer(engine))
    log.info("DeepSpeed ZeRO stage %d over %d data-parallel ranks", stage_of(cfg.parallelism.strategy), dims.dp)
    return engine


def _full_shape(p: nn.Parameter) -> torch.Size:
    """The whole shape of a parameter (ZeRO-3 leaves an empty tensor in ``p`` and keeps it in ``ds_shape``)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _trainable(top: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in top.named_parameters() if p.requires_grad)


def _gathered(top: nn.Module, modifier_rank: int | None = None):
    """All of ``top``'s parameters whole for the duration (ZeRO-3); a no-op for stages 1/2."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(top.parameters()), modifier_rank=modifier_rank)


# --- what the trainer reads -------------------------------------------------------------

def full_grads(top: nn.Module) -> dict[str, torch.Tensor]:
    """Whole gradients of the trainable parameters (after the boundary backward, before the step)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in _trainable(top):
        g = safe_get_full_grad(p)
        if g is not None:
            out[name] = g.detach().to("cpu", copy=True).reshape(_full_shape(p))
    return out


def full_parameters(top: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of every parameter (every rank gets them)."""
    with _gathered(top):
        return {n: p.detach().to("cpu", copy=True) for n, p in top.named_parameters()}


def partition_sizes(top: nn.Module, engine: Any) -> dict[str, int]:
    """What this rank holds, in elements, next to the whole: AdamW state (one moment) and
    parameters. With dp ranks, ZeRO keeps ~1/dp of the state (all stages) and, for ZeRO-3,
    ~1/dp of the parameters; the tests check exactly that."""
    state = sum(st["exp_avg"].numel() for st in _inner_optimizer(engine).state.values() if "exp_avg" in st)
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in top.parameters())
    return {
        "stage": int(engine.zero_optimization_stage()),
        "localOptimizerStateElements": int(state),
        "trainableElements": sum(_full_shape(p).numel() for _, p in _trainable(top)),
        "localParameterElements": int(params),
        "parameterElements": sum(_full_shape(p).numel() for p in top.parameters()),
    }


# --- checkpoints (the runtime's DCP format, see checkpoint.py) ----------------------------

def model_state(top: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """checkpoint.model_state with ZeRO-3's partitioned parameters gathered (copies: the
    gathered storage goes away when the context ends)."""
    with _gathered(top):
        return {k: v.detach().to("cpu", copy=True) for k, v in ckpt.model_state(top, trainable_only).items()}


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The trainer's AdamW as ZeRO drives it (its params are ZeRO's flat fp32 partitions)."""
    return engine.optimizer.optimizer


def _create_adam_state(inner: torch.optim.Optimizer) -> None:
    """Create AdamW's state for ZeRO's flat partitions now, as AdamW's first step would.

    ZeRO-1/2 link each parameter to its slice of the optimizer state right after the first
    param group's first step; with two groups (decayed matrices, undecayed vectors) the
    second group's state does not exist yet then, and its parameters stay unlinked
    (``safe_get_full_optimizer_state`` fails with "exp_avg not found"). Creating the state
    up front avoids that, and gives a resume something to load into.
    """
    for group in inner.param_groups:
        for flat in group["params"]:
            ckpt.init_adam_state(inner, flat)


def _step_count(engine: Any) -> torch.Tensor:
    """AdamW's step count (one for all of ZeRO's partitions: they step together; wrap() created it)."""
    st = next(iter(_inner_optimizer(engine).state.values()))
    return st["step"].detach().to("cpu", dtype=torch.float32, copy=True)


def optimizer_state(top: nn.Module, engine: Any) -> dict[str, torch.Tensor]:
    """AdamW state keyed "<param name>.<exp_avg|exp_avg_sq|step>", whole, as checkpoint.optimizer_state."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = _step_count(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in _trainable(top):
        for key in ADAM_MOMENTS:
            out[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().to("cpu", copy=True)
        out[f"{name}.step"] = step.clone()
    return out


def empty_optimizer_state(top: nn.Module) -> dict[str, torch.Tensor]:
    """Whole zero tensors with the keys and shapes of :func:`optimizer_state`, for DCP to load into."""
    out: dict[str, torch.Tensor] = {}
    for name, p in _trainable(top):
        shape = _full_shape(p)
        for key in ADAM_MOMENTS:
            out[f"{name}.{key}"] = torch.zeros(shape, dtype=torch.float32)
        out[f"{name}.step"] = torch.zeros((), dtype=torch.float32)
    return out


def restore(top: nn.Module, engine: Any, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor]) -> None:
    """Put loaded whole tensors into the engine: weights (then ZeRO's fp32 master copy from
    them) and AdamW's moments and step count."""
    from deepspeed.utils import safe_set_full_optimizer_state

    with _gathered(top, modifier_rank=0):
        top.load_state_dict(model_sd, strict=False)
    zero_opt = engine.optimizer
    zero_opt.refresh_fp32_params()  # master weights := the loaded (fp32) weights
    if not optim_sd:
        return
    step = next(v for k, v in optim_sd.items() if k.endswith(".step"))
    inner = _inner_optimizer(engine)
    for st in inner.state.values():
        st["step"].copy_(step)
    link = getattr(zero_opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # stages 1/2 connect each parameter to its slice of the state lazily
        link()
    for name, p in _trainable(top):
        for key in ADAM_MOMENTS:
            safe_set_full_optimizer_state(p, optim_sd[f"{name}.{key}"].to(p.device), key)
