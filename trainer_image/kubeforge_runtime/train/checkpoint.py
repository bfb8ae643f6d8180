"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save, find, resume, reshard.

Called by the trainer (every N steps, on SIGTERM, at the end; resume on start) and by
:func:`load_single_process`, which rebuilds one plain model from a checkpoint written by
any layout (the trainer's final output, tests, debugging).

Layout on disk (``checkpoint.uri``, default ``<output>/checkpoints``; it must be a volume
every worker writes to, e.g. a ReadWriteMany PVC)::

    step-00000100/           one DCP checkpoint (every rank writes its shards)
      .metadata  __0_0.distcp ...
      kubeforge-state.json   written by rank 0 after all ranks finished: step, losses, layout

Each state file carries the run's *identity* (:func:`run_identity`: the job, base model,
dataset, method and LoRA shape). Resume refuses a checkpoint whose identity differs
(:func:`check_identity`), before anything is loaded or pruned: a checkpoint directory
shared by mistake would otherwise continue a stranger's run and, at the next save, delete
its checkpoints. The parallel layout is recorded but not compared: resharding onto another
layout is a feature.

An ``s3://`` checkpoint URI (or an ``s3://`` output without ``checkpoint.uri``) is written to a
local staging directory (``storage.staging_path``, node-local: the pod's workspace) and uploaded
after each complete save: every node's local rank 0 uploads the shards its node wrote, then
global rank 0 uploads ``kubeforge-state.json`` last and deletes the remote checkpoints pruned
locally. Resume lists the remote, takes the newest step whose state file exists, and each
node's local rank 0 downloads it (the state file last) before DCP loads it. An upload
failure is a runtime error (the pod is retried; the last complete remote checkpoint stands).

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
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import contract, storage
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "kubeforge-state.json"
PREFIX = "step-"


IDENTITY_KEY = "identity"
# Compared on resume, with what the message calls them. The job's uid (torchrun's rendezvous
# id, which the operator sets to it) is recorded only: a FineTuneJob re-created under the same
# name to continue its run, and every `kubeforge run`, get a new uid.
_COMPARED = {"job": "job (namespace/name)", "model": "model.uri", "dataset": "dataset.uri", "method": "method",
             "lora": "lora (r, alpha, targetModules)", "teacher": "distillation.teacher.uri"}


class CheckpointMismatch(ConfigError):
    """The checkpoint directory holds another run's checkpoints; the message says what differs."""


def uri_for(cfg: TrainConfig) -> str:
    """The run's checkpoint URI: ``checkpoint.uri``, else ``<output>/checkpoints``."""
    return cfg.checkpoint.uri or cfg.output.uri.rstrip("/") + "/checkpoints"


def remote_for(cfg: TrainConfig) -> str | None:
    """The ``s3://`` URI checkpoints are uploaded to, or None for a file/pvc directory."""
    uri = uri_for(cfg)
    return uri if storage.is_s3(uri) else None


def root_for(cfg: TrainConfig) -> Path:
    """The run's local checkpoint directory (the staging directory of an ``s3://`` one)."""
    return storage.output_path(uri_for(cfg))


def _remote_steps(remote: str) -> tuple[set[int], set[int]]:
    """(every step with objects, the complete ones: with a state file) under an ``s3://`` URI."""
    prefix = storage.parse_uri(remote).location.partition("/")[2].strip("/")
    steps: set[int] = set()
    complete: set[int] = set()
    for obj in storage.list_s3(remote):
        rel = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
        parts = rel.split("/")
        if len(parts) < 2 or not parts[0].startswith(PREFIX):
            continue
        try:
            step = int(parts[0][len(PREFIX):])
        except ValueError:
            continue
        steps.add(step)
        if len(parts) == 2 and parts[1] == STATE_FILE:
            complete.add(step)
    return steps, complete


def remote_step_uri(remote: str, step: int) -> str:
    return f"{remote.rstrip('/')}/{PREFIX}{step:08d}"


def remote_complete(remote: str) -> list[tuple[int, str]]:
    """Complete checkpoints under an ``s3://`` URI (a ``step-*/kubeforge-state.json`` object), oldest first."""
    return [(step, remote_step_uri(remote, step)) for step in sorted(_remote_steps(remote)[1])]


def _remote_state(remote_step: str) -> dict[str, Any]:
    raw = storage.read_s3_object(f"{remote_step}/{STATE_FILE}")
    return json.loads(raw) if raw else {}


def fetch_latest(cfg: TrainConfig, leader: bool) -> Path | None:
    """For an ``s3://`` checkpoint URI: make the newest complete remote checkpoint available
    locally (``leader``, each node's local rank 0, downloads it unless it is already there,
    its state file last) and return its local path; None when the remote holds none."""
    remote = remote_for(cfg)
    if remote is None:
        return latest(root_for(cfg))
    found = remote_complete(remote)
    if not found:
        return None
    step, uri = found[-1]
    path = step_dir(root_for(cfg), step)
    if leader and not (path / STATE_FILE).exists():
        if path.exists():
            shutil.rmtree(path)
        storage.download_s3_dir(uri, path, last=(STATE_FILE,))
    return path


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """What makes a checkpoint this run's: written with every checkpoint, compared on resume.
    URIs are normalised (``contract.normalize_uri``) so another spelling of one path matches."""
    identity: dict[str, Any] = {
        "job": f"{cfg.namespace}/{cfg.name}",
        "model": contract.normalize_uri(cfg.model.uri),
        "dataset": contract.normalize_uri(cfg.dataset.uri),
        "method": cfg.method,
    }
    if cfg.method in ("lora", "qlora"):
        identity["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targetModules": sorted(cfg.lora.targetModules)}
    if cfg.distillation is not None:
        identity["teacher"] = contract.normalize_uri(cfg.distillation.teacher.uri)
    uid = os.environ.get("PET_RDZV_ID")
    if uid:
        identity["jobUid"] = uid
    return identity


def check_identity(path: Path, current: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatch` when the checkpoint at ``path`` was written by another
    run. A checkpoint from before identities were recorded is accepted with a warning."""
    _check_saved_identity(read_state(path), str(path), str(path.parent), current)


def _check_saved_identity(state: dict[str, Any], where: str, directory: str, current: dict[str, Any]) -> None:
    saved = state.get(IDENTITY_KEY)
    name = where.rstrip("/").rsplit("/", 1)[-1]
    if saved is None:
        log.warning("%s records no run identity (written by an older runtime): resuming without checking it", where)
        return
    diffs = [f"{label} is {current.get(key)!r} here but {saved.get(key)!r} in the checkpoint"
             for key, label in _COMPARED.items() if saved.get(key) != current.get(key)]
    if diffs:
        raise CheckpointMismatch(
            f"the checkpoint directory {directory} holds another run's checkpoints (newest: {name}): "
            + "; ".join(diffs) + ". Resuming would continue that run and later delete its checkpoints, so nothing "
            "was loaded or deleted. Use a fresh checkpoint directory (set checkpoint.uri, or another output.uri), "
            "or delete the old checkpoints if that run is no longer needed")


def check_resumable(cfg: TrainConfig) -> Path | None:
    """The newest complete checkpoint of this run's directory, if any, after checking that it is
    this run's (:func:`check_identity`). Used by the preflight and by the trainer's resume.
    For an ``s3://`` checkpoint URI only the newest remote state file is read (nothing is
    written locally) and the remote step URI is returned as a path-like marker."""
    remote = remote_for(cfg)
    if remote is not None:
        found = remote_complete(remote)
        if not found:
            return None
        step, uri = found[-1]
        _check_saved_identity(_remote_state(uri), uri, remote, current=run_identity(cfg))
        return step_dir(root_for(cfg), step)
    path = latest(root_for(cfg))
    if path is not None:
        check_identity(path, run_identity(cfg))
    return path


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
    """Periodic/forced saves, resume and pruning for one training run.

    :meth:`save` writes a checkpoint and returns when it is complete (SIGTERM, the end).
    :meth:`save_async` (interval checkpoints) returns once every rank's state is copied to
    CPU memory (``dcp.async_save``'s staging): the files are written by a background thread
    while training goes on, with its collectives on a separate gloo group so they never
    interleave with the training's. The trainer completes it (:meth:`wait`: the state file,
    upload and pruning) at the end of the next step, so the write overlaps one step's compute
    and a checkpoint is never more than one step from complete; until then it has no state
    file and resume ignores it, as it ignores a preempted save.
    """

    def __init__(self, root: Path, keep_last: int, rank: int, remote: str | None = None,
                 local_leader: bool | None = None) -> None:
        self.root = root
        self.keep_last = keep_last
        self.rank = rank
        self.remote = remote  # s3:// URI the checkpoints are uploaded to, if any
        # Each node's local rank 0 uploads the shards its node wrote to its (node-local) staging.
        self.local_leader = (int(os.environ.get("LOCAL_RANK", "0")) == 0) if local_leader is None else local_leader
        self.last_saved_step: int | None = None
        self.pending: tuple[Any, int, Path, dict[str, Any]] | None = None  # (future, step, path, state)
        self._async_group: Any = None

    def _prepare(self, step: int) -> Path:
        import torch.distributed as dist

        path = step_dir(self.root, step)
        # With a remote, the staging directory is node-local: each node's leader prepares its own.
        if self.rank == 0 or (self.remote and self.local_leader):
            if path.exists():  # an incomplete or stale save of the same step
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        if self.remote and self.rank == 0:
            # A stale marker of this step (an earlier attempt) must not vouch for the new shards.
            storage.delete_s3_keys(f"{self.remote.rstrip('/')}/{path.name}/{STATE_FILE}")
        dist.barrier()
        return path

    def save(self, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor],
             state: dict[str, Any]) -> Path:
        """Write one checkpoint: every rank passes its part of the model and optimizer state
        (:func:`model_state` / :func:`optimizer_state`, or their ZeRO versions in zero.py).
        A pending asynchronous save is completed first."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        path = self._prepare(step)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        self._complete(step, path, state)
        return path

    def save_async(self, step: int, model_sd: dict[str, torch.Tensor], optim_sd: dict[str, torch.Tensor],
                   state: dict[str, Any]) -> Path:
        """Start writing one checkpoint in the background (see the class docstring); returns
        its path, which is complete only after :meth:`wait`."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.wait()
        if self._async_group is None:  # every rank gets here at the same save
            self._async_group = dist.new_group(backend="gloo")
        path = self._prepare(step)
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path),
                                process_group=self._async_group)
        # The run state as of this step (the trainer keeps appending to its lists).
        self.pending = (future, step, path, json.loads(json.dumps(state)))
        return path

    def wait(self) -> None:
        """Complete the pending asynchronous save, if any (every rank calls this together)."""
        if self.pending is None:
            return
        future, step, path, state = self.pending
        self.pending = None
        future.result()  # re-raises a failed write here, on the training thread
        self._complete(step, path, state)

    def _complete(self, step: int, path: Path, state: dict[str, Any]) -> None:
        """After every rank's shards are written: upload, mark complete, prune."""
        import torch.distributed as dist

        dist.barrier()  # every rank's shards are on disk before the checkpoint counts as complete
        remote_step = f"{self.remote.rstrip('/')}/{path.name}" if self.remote else None
        if remote_step and self.local_leader:
            storage.upload_dir(path, remote_step)  # this node's shards (and rank 0's .metadata)
        if remote_step:
            dist.barrier()  # every node's shards are up before the state file marks it complete
        if self.rank == 0:
            tmp = path / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps({"step": step, **state}, indent=1))
            tmp.rename(path / STATE_FILE)
            if remote_step:
                storage.upload_file(path / STATE_FILE, f"{remote_step}/{STATE_FILE}")  # complete now
            self._prune()
        dist.barrier()
        self.last_saved_step = step
        log.info("checkpoint saved: %s", path)

    def _prune(self) -> None:
        if self.remote:
            steps, complete = _remote_steps(self.remote)
            done_steps = sorted(complete)
            newest_done = done_steps[-1] if done_steps else -1
            stale = set(done_steps[: -self.keep_last]) | {s for s in steps - complete if s < newest_done}
            for step in sorted(stale):  # old ones, and older uploads a failure left incomplete
                storage.delete_s3_prefix(remote_step_uri(self.remote, step))
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
    LoRA and QLoRA runs (QLoRA's base NF4-quantized as in training), else the causal LM, in eval mode. Works inside or outside a process group.
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
