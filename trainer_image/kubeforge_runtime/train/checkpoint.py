"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save, find, resume, reshard.

Called by the trainer (every N steps, on SIGTERM, at the end; resume on start) and by
:func:`load_single_process`, which rebuilds one plain model from a checkpoint written by
any layout (the trainer's final output, tests, debugging).

Layout on disk (``checkpoint.uri``, default ``<output>/checkpoints``; it must be a volume
every worker writes to, e.g. a ReadWriteMany PVC)::

    step-00000100/           one DCP checkpoint (every rank writes its shards)
      .metadata  __0_0.distcp ...
      kubeforge-state.json   written by rank 0 after all ranks finished: step, losses, layout

A directory without ``kubeforge-state.json`` is incomplete (preempted mid-write) and is
ignored and cleaned up. Keys are the parameter names of the unwrapped model (the peft model
for LoRA), identical in every parallel layout - FSDP2 and tensor parallelism keep names,
pipeline stages keep the original layer indices - so DCP reshards a checkpoint onto any
other (pp, dp, tp) layout. "model" holds all weights for full fine-tuning and only the
adapter weights for LoRA; "optim" holds AdamW's state per parameter name.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_FILE = "kubeforge-state.json"
PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and (d / STATE_FILE).exists():
            try:
                out.append((int(d.name[len(PREFIX):]), d))
            except ValueError:
                continue
    return sorted(out)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def model_state(top: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model entries of a checkpoint (DTensors stay sharded: DCP writes each rank's part)."""
    sd = top.state_dict()
    if trainable_only:
        keep = {n for n, p in top.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


def init_adam_state(optim: torch.optim.Optimizer, p: torch.Tensor) -> None:
    """Create ``p``'s AdamW state (zeros, step 0) as AdamW's first step would, if it has none.
    The fused/capturable kernels keep the step count on the parameter's device, as float32."""
    st = optim.state[p]
    if not st:
        fused = any(g.get("fused") or g.get("capturable") for g in optim.param_groups)
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_state(top: nn.Module, optim: torch.optim.Optimizer, init: bool = False) -> dict[str, torch.Tensor]:
    """AdamW state keyed "<param name>.<exp_avg|exp_avg_sq|step>".

    With ``init`` the state is created first (zeros, as AdamW would on its first step) so
    that DCP can load into it in place; DTensor parameters get DTensor state with the same
    placements, which is what lets DCP reshard it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in top.named_parameters():
        if not p.requires_grad:
            continue
        if init:
            init_adam_state(optim, p)
        for key, value in optim.state[p].items():
            if isinstance(value, torch.Tensor):
                out[f"{name}.{key}"] = value
    return out


class CheckpointManager:
    """Periodic/forced saves, resume and pruning for one training run."""

    def __init__(self, root: Path, keep_last: int, rank: int) -> None:
        self.root = root
        self.keep_last = keep_last
        self.rank = rank
        self.last_saved_step: int | None = None

    def save(self, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor],
             state: dict[str, Any]) -> Path:
        """Write one checkpoint: every rank passes its part of the model and optimizer state
        (:func:`model_state` / :func:`optimizer_state`, or their ZeRO versions in zero.py)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        path = step_dir(self.root, step)
        if self.rank == 0:
            if path.exists():  # an incomplete or stale save of the same step
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        dist.barrier()  # every rank's shards are on disk before the checkpoint counts as complete
        if self.rank == 0:
            tmp = path / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps({"step": step, **state}, indent=1))
            tmp.rename(path / STATE_FILE)
            self._prune()
        dist.barrier()
        self.last_saved_step = step
        log.info("checkpoint saved: %s", path)
        return path

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for _, d in done[: -self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)
        newest = done[-1][0] if done else -1
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith(PREFIX) and not (d / STATE_FILE).exists():
                try:
                    if int(d.name[len(PREFIX):]) < newest:
                        shutil.rmtree(d, ignore_errors=True)  # left behind by a preempted save
                except ValueError:
                    pass

    def load(self, path: Path, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Fill ``model_sd`` and ``optim_sd`` (templates with the keys and shapes to load; DCP
        reshards into them in place) from ``path``; return the run state saved with it."""
        import torch.distributed.checkpoint as dcp

        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        state = read_state(path)
        self.last_saved_step = int(state["step"])
        log.info("resumed from %s (step %d)", path, state["step"])
        return state


def checkpoint_keys(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_single_process(path: str | Path, cfg: Any, model_path: Path | None = None) -> nn.Module:
    """Rebuild one plain (unsharded) model from a checkpoint written by any layout.

    ``cfg`` is the run's TrainConfig (base model, LoRA settings). Returns the peft model for
    LoRA runs, else the causal LM, in eval mode. Works inside or outside a process group.
    """
    import torch.distributed.checkpoint as dcp

    from . import model as model_mod

    top, _ = model_mod.build(cfg, model_path)
    keys = {k.split(".", 1)[1] for k in checkpoint_keys(Path(path)) if k.startswith("model.")}
    sd = {k: v for k, v in top.state_dict().items() if k in keys}
    missing = keys - set(sd)
    if missing:
        raise RuntimeError(f"checkpoint {path} has weights this model lacks: {sorted(missing)[:5]}")
    with warnings.catch_warnings():
        # DCP warns that it "assumes a single process" - which is exactly the intent here.
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    top.load_state_dict(sd, strict=False)
    top.eval()
    return top
