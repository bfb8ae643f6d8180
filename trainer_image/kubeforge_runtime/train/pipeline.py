"""Pipeline stages and schedules for the trainer, memory first.

Called by the trainer (``trainer.py``, ``_build_model``) when ``parallelism.pipeline`` > 1:
:func:`build_schedule` wraps this rank's stage module (already cut by
``parallelize.prune_to_stage`` and wrapped for data parallelism by ``strategy.py``) in a
torch ``PipelineStage`` and the configured schedule (GPipe or 1F1B).

Why a stage class of our own (:class:`ReshardingStage`): torch's ``PipelineStage`` runs each
micro-batch's backward of an FSDP2 stage with ``set_reshard_after_backward(False)`` and
reshards only once, after the last micro-batch (``perform_reduce_grad``). From the first
micro-batch's backward on, every unit of the stage - each decoder layer, and the final norm
with ``lm_head`` on the last stage - therefore stays gathered whole until the step ends:
the whole stage unsharded, on every data-parallel rank, which is what FSDP was there to
avoid. Measured on the 1 B bench model (``benchmarks/bench_load.py``, PP=2 x DP=2, GPipe,
2026-12-01): first-stage ranks peaked at 2.10-2.12 GiB, last-stage ranks (which also keep
the gathered ``lm_head``, 0.25 GiB in bf16; the first stage's embedding is never gathered in
backward) at 2.43 GiB. :class:`ReshardingStage` keeps the schedule's no-sync accumulation
(gradients are reduced once, after the last micro-batch) but reshards each unit after its
backward, as FSDP2 does outside pipelining: a unit is re-gathered once per micro-batch's
backward (one more all-gather per unit and micro-batch) instead of being held.

The trainer steps the schedule with ``return_outputs=False`` (training and validation): it
reads the per-micro-batch losses, never the merged logits, which the last stage would
otherwise keep for every micro-batch until the step ends (under 1F1B, after their backward too).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining._backward import stage_backward

log = logging.getLogger(__name__)

SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}


class ReshardingStage(PipelineStage):
    """A ``PipelineStage`` whose FSDP2 units are resharded after every micro-batch's backward
    (see the module docstring); any other module (DDP, no data parallelism) runs as torch runs it."""

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict[str, Any],
                                   last_backward: bool = False) -> tuple[tuple[torch.Tensor | None, ...], Any]:
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward=last_backward)
        # As torch does for FSDP, except reshard_after_backward: no gradient reduction per
        # micro-batch (perform_reduce_grad reduces once after the last), but no unit held whole.
        self.submod.set_is_last_backward(False)
        self.submod.set_reshard_after_backward(True)
        self.submod.set_requires_gradient_sync(False)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None


def build_schedule(module: nn.Module, pp_rank: int, pp: int, device: torch.device, group: Any, schedule: str,
                   n_microbatches: int, loss_fn: Callable[..., torch.Tensor]) -> Any:
    """This rank's stage and its schedule (``schedule``: "GPipe" or "1F1B"). ``scale_grads``
    is off: the trainer's loss already normalises by the global batch's target tokens."""
    stage = ReshardingStage(module, pp_rank, pp, device, group=group)
    return SCHEDULES[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)

