"""ParallelDims: the (pp, dp, tp) layout of one training job, validated when built.

Called by the trainer (to build the device mesh) and by ``launch.py`` (to reject a bad
layout before torchrun starts any worker). Modelled on torchtitan's ``ParallelDims``: the
object checks on construction that the degrees multiply to the world size and that the
model's sizes divide by the tensor-parallel degree, and every error message says what to
change. The mesh is ``("pp", "dp", "tp")`` with tp innermost, so tensor-parallel groups are
consecutive ranks (on one node when ranks are placed node by node).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The model sizes that constrain the layout (read from a transformers config)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelShape":
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
            vocab_size=int(config.vocab_size),
        )


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of pipeline, data and tensor parallelism for ``world_size`` processes."""

    world_size: int
    tp: int = 1
    pp: int = 1
    global_batch_size: int = 1
    micro_batch_size: int = 1
    pipeline_schedule: str = "1F1B"
    model: ModelShape | None = None

    def __post_init__(self) -> None:
        ws, tp, pp = self.world_size, self.tp, self.pp
        if ws < 1 or tp < 1 or pp < 1:
            raise ConfigError(f"world size {ws}, tensor {tp} and pipeline {pp} must all be >= 1")
        if ws % (tp * pp):
            raise ConfigError(
                f"parallelism: tensor ({tp}) x pipeline ({pp}) = {tp * pp} does not divide the world "
                f"size {ws} (nodes x processes per node); choose degrees whose product divides {ws}, "
                f"or run {self._nearest_world()} processes"
            )
        dp = self.dp
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.globalBatchSize ({self.global_batch_size}) must be a multiple of "
                f"microBatchSize ({self.micro_batch_size}) x data-parallel degree ({dp}) = {per_step}; "
                f"set globalBatchSize to a multiple of {per_step} or change microBatchSize"
            )
        if pp > 1 and self.pipeline_schedule == "1F1B" and self.grad_accum < pp:
            raise ConfigError(
                f"parallelism.pipelineSchedule 1F1B needs at least pipeline ({pp}) micro-batches per "
                f"data-parallel rank and step, but globalBatchSize / (microBatchSize x dp) = "
                f"{self.grad_accum}; raise globalBatchSize to {pp * per_step}, lower microBatchSize, "
                "or use GPipe"
            )
        if self.model is not None:
            self._check_model(self.model)

    def _nearest_world(self) -> int:
        unit = self.tp * self.pp
        return max(unit, (self.world_size // unit) * unit)

    def _check_model(self, m: ModelShape) -> None:
        tp, pp = self.tp, self.pp
        if tp > 1:
            bad = [
                (name, size)
                for name, size in (
                    ("num_attention_heads", m.num_heads),
                    ("num_key_value_heads", m.num_kv_heads),
                    ("hidden_size", m.hidden_size),
                    ("intermediate_size", m.intermediate_size),
                )
                if size % tp
            ]
            if bad:
                fits = [d for d in range(1, tp * 2 + 1) if all(s % d == 0 for s in
                        (m.num_heads, m.num_kv_heads, m.hidden_size, m.intermediate_size))]
                raise ConfigError(
                    "parallelism.tensor: the model's "
                    + ", ".join(f"{n} ({s})" for n, s in bad)
                    + f" not divisible by {tp}; use a tensor degree that divides them, e.g. {fits[-1]}"
                )
        if pp > m.num_layers:
            raise ConfigError(
                f"parallelism.pipeline ({pp}) exceeds the model's {m.num_layers} decoder layers; "
                f"use at most {m.num_layers} stages"
            )

    # --- derived sizes -----------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Data-parallel degree = world_size / (tp * pp)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per data-parallel rank and optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def local_batch_size(self) -> int:
        """Samples one data-parallel rank processes per optimizer step."""
        return self.global_batch_size // self.dp

    def describe(self) -> dict[str, int | str]:
        """The layout as a JSON-able dict (logs, lineage)."""
        return {
            "worldSize": self.world_size, "pipeline": self.pp, "data": self.dp, "tensor": self.tp,
            "gradientAccumulation": self.grad_accum, "pipelineSchedule": self.pipeline_schedule if self.pp > 1 else "",
        }

    def stage_layers(self, stage: int) -> range:
        """Decoder layers of pipeline stage ``stage``: contiguous, as even as possible, the
        earlier stages taking the remainder (the last stage also holds norm and lm_head)."""
        assert self.model is not None, "stage_layers needs the model shape"
        n, pp = self.model.num_layers, self.pp
        base, extra = divmod(n, pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def build_mesh(self, device_type: str):
        """Create the ("pp", "dp", "tp") DeviceMesh (needs an initialised process group)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        log.info("device mesh %s", self.describe())
        return mesh
