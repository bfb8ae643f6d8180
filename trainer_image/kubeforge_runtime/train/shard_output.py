"""The final model written shard by shard: no process ever holds the whole model.

Called by the trainer at the end of a run (every rank: a collective) instead of rebuilding
the model in one process from the last checkpoint (``checkpoint.load_single_process``),
when :func:`supported` says so. Each rank passes the tensors it holds, in the names of the
base model's safetensors files, to ``torch.distributed.checkpoint`` with its
``HuggingFaceStorageWriter``: every rank writes its own slices (DTensor shards, tensor-
parallel slices, its pipeline stage's layers; a replicated tensor is written by one rank),
then the coordinating rank consolidates them into ``model-0000N-of-0000M.safetensors`` plus
``model.safetensors.index.json``, copying tensor data from the memory-mapped parts into the
output files piece by piece. ``from_pretrained`` reads the result like any model directory.

What is written, by ``output.format``:

* ``merged``: every weight in fp32 (what the one-process path writes); LoRA adapters are
  merged per layer on the rank that holds the layer's slice (``W + scaling * B @ A``, the
  small ``A`` and ``B`` gathered whole for the product, then cut to ``W``'s slice);
* ``adapter``: the adapter weights, gathered to rank 0 (they are small) and written with
  peft's key names next to ``adapter_config.json``.

Not supported (the one-process path is kept, and says why in the log): a task evaluation
(``spec.evaluation`` generates with the whole model in one process anyway), an ``s3://``
output (each node stages its parts locally; consolidation needs them in one place), and
DeepSpeed ZeRO (its partitions are not DTensors).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
import torch
import torch.distributed as dist
from torch import nn

from .. import storage
from .config import TrainConfig
from .loading import HEAD_KEY, TIED_KEY, file_key, is_adapter

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
"""Largest output file (bytes): tensors are packed into files of at most this size."""


def supported(cfg: TrainConfig) -> str | None:
    """None when the output can be written shard by shard, else why not."""
    if cfg.evaluation is not None:
        return "spec.evaluation generates with the whole model in one process"
    if storage.is_s3(cfg.output.uri):
        return "an s3:// output is staged per node"
    if cfg.parallelism.strategy.startswith("deepspeed-"):
        return "DeepSpeed ZeRO partitions are not DTensors"
    if cfg.method == "qlora":
        return "a QLoRA base is NF4: its output is rebuilt from the checkpoint in one process"
    return None


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's slice) as a tensor laid out like ``ref`` (DTensor or plain)."""
    from torch.distributed.tensor import DTensor

    if isinstance(ref, DTensor):
        return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                                  shape=ref.shape, stride=ref.stride())
    return local


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def merged_state(top: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """This rank's part of the merged model, fp32, by safetensors key (adapters folded in)."""
    from .loading import _local_part

    out: dict[str, torch.Tensor] = {}
    lora_layers = {name: m for name, m in top.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, t in top.state_dict().items():
            if is_adapter(name):
                continue
            out[file_key(name)] = _like(_local(t).detach().to(torch.float32, copy=True), t)
        for name, m in lora_layers.items():
            weight = m.base_layer.weight
            for adapter in m.lora_A:
                delta = m.scaling[adapter] * (_full(m.lora_B[adapter].weight).float() @ _full(m.lora_A[adapter].weight).float())
                key = file_key(f"{name}.base_layer.weight")
                _local(out[key]).add_(_local_part(delta, weight))
    if tied and HEAD_KEY in out:
        head = out.pop(HEAD_KEY)
        out.setdefault(TIED_KEY, head)
    return out


def _file_index(sizes: dict[str, int], limit: int = SHARD_BYTES) -> dict[str, int]:
    """Key -> output file number (1..N), in key order, at most ``limit`` bytes a file."""
    index, used, mapping = 1, 0, {}
    for key in sorted(sizes):
        if used and used + sizes[key] > limit:
            index, used = index + 1, 0
        mapping[key] = index
        used += sizes[key]
    return mapping


def write_weights(top: nn.Module, lm: nn.Module, out: Path) -> None:
    """Every rank: write the merged weights of ``top`` into ``out`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    state = merged_state(top, bool(getattr(lm.config, "tie_word_embeddings", False)))
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}  # global shapes (DTensors)
    every: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, sizes)  # pipeline stages hold different keys
    merged: dict[str, int] = {}
    for part in every:
        merged.update(part)
    writer = HuggingFaceStorageWriter(str(out), fqn_to_index_mapping=_file_index(merged), save_distributed=True,
                                      enable_consolidation=True)
    dcp.save(state, storage_writer=writer)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out / "sharded", ignore_errors=True)  # the per-rank parts, consolidated now
    log.info("merged weights written shard by shard to %s (%d tensors)", out, len(merged))


def write_adapter(top: nn.Module, out: Path) -> None:
    """Every rank: gather the adapter weights (small) and write them on rank 0 with peft's names."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    full = {k: _full(v).detach().cpu().contiguous() for k, v in top.state_dict().items() if is_adapter(k)}
    if dist.get_rank() == 0:
        sd = get_peft_model_state_dict(top, state_dict=full)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        top.peft_config["default"].save_pretrained(str(out))
    dist.barrier()


def write_config(base_dir: Path, out: Path) -> None:
    """Rank 0: the merged model's config (fp32 weights, KV cache on for inference) and generation config."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(base_dir))
    config.use_cache = True
    config.dtype = "float32"
    config.save_pretrained(str(out))
    try:
        GenerationConfig.from_pretrained(str(base_dir)).save_pretrained(str(out))
    except OSError:
        pass  # the base has none


def write(top: nn.Module, lm: nn.Module, cfg: TrainConfig, base_dir: Path) -> Path:
    """Every rank: the output's weights (and config) into ``output.uri``; returns the directory.
    Rank 0 then writes the tokenizer and lineage (``output.save_output(None, ...)``)."""
    out = storage.output_path(cfg.output.uri)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if cfg.output.format == "adapter":
        write_adapter(top, out)
    else:
        write_weights(top, lm, out)
        if dist.get_rank() == 0:
            write_config(base_dir, out)
    return out

