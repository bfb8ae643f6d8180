"""Sharded loading: build the model on the ``meta`` device, lay it out, then read each rank's part.

Called by the trainer (``trainer.py``, every rank) through ``model.build_meta`` and
:func:`materialize`, so that no process ever holds the whole model unless its layout
needs it whole (one process, DDP, ZeRO):

1. :func:`build_meta` - the ``*ForCausalLM`` (and its peft LoRA wrapper) on the ``meta``
   device: shapes and dtypes only, no storage. The pipeline stage is then pruned and the
   tensor-parallel plan applied on meta too (``parallelize.py``), and FSDP2 shards it
   (``strategy.py``): every parameter becomes a DTensor that describes only the rank's slice.
2. :func:`materialize` - ``to_empty`` allocates exactly those slices, then
   ``torch.distributed.checkpoint`` with its ``HuggingFaceStorageReader`` reads them straight
   out of the model's ``*.safetensors`` files (``safe_open(...).get_slice(...)[...]``:
   memory-mapped, only the rows/columns the rank owns, any number of shard files). The
   same planner that reshards checkpoints computes which slice a DTensor needs, so FSDP2,
   tensor parallel, their 2-D combination and pipeline stages all take this one road.

What each parameter becomes (the precision policy, :func:`param_dtype`): trainable
parameters are fp32 master weights (the optimizer steps them; bf16/fp16 is autocast, as
before); frozen ones (a LoRA base) keep the dtype they are stored in when the run computes
in bf16/fp16 (a bf16 base stays bf16: half the memory of fp32) and are fp32 under fp32
training, where a bf16 weight could not meet an fp32 activation. DeepSpeed ZeRO keeps every
weight fp32 (it flattens the model's parameters). ZeRO-3 with more than one rank is read unit
by unit straight into DeepSpeed's partitions (:func:`materialize_zero3`); ZeRO-1/2 ranks read
the whole model (they replicate the weights anyway). QLoRA reads tensor by tensor and
quantizes as it reads (:func:`materialize_qlora`), before FSDP2 shards the NF4 codes.

Tied embeddings: ``lm_head.weight`` is the embedding; files store it once (as
``model.embed_tokens.weight``), so a stage that holds the head but not the embedding (the
last pipeline stage) reads the head from that key.

LoRA adapters do not come from the files: they are initialised here as peft initialises
them (``lora_A`` Kaiming-uniform with a=sqrt(5), ``lora_B`` zeros), each from its own
generator seeded by the run's seed and the parameter's name, whole, then cut to the rank's
slice - so the initial adapters are the same in every layout, including one process.

Non-persistent buffers (the rotary embedding's ``inv_freq``) are not in any file: the
rotary module is rebuilt from the config on the target device.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from .config import TrainConfig

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
TIED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"


def stored_dtype(config: Any) -> torch.dtype:
    """The dtype the base model's weights are stored in (``config.json``'s dtype), fp32 if unsaid."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name), torch.float32) if name else torch.float32


def param_dtype(trainable: bool, precision: str, stored: torch.dtype) -> torch.dtype:
    """Precision policy: fp32 master weights for what is trained; a frozen weight keeps its
    stored dtype under bf16/fp16 autocast (which casts it anyway), else fp32."""
    if trainable or precision == "fp32":
        return torch.float32
    return stored


def build_meta(path: Path, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(top, lm) as ``model.build`` returns them, on the ``meta`` device, in the policy's dtypes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise models.ModelLoadError(f"could not read the base model's config from {path}: {exc}") from exc
    # Read before from_config, which records the dtype it builds in into the config.
    stored = stored_dtype(config)
    if cfg.parallelism.strategy.startswith("deepspeed-"):
        stored = torch.float32  # DeepSpeed partitions and flattens the whole model: one dtype, fp32
    if cfg.method == "qlora":
        stored = torch.float32  # what is not quantized stays fp32, as model.build loads it
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    from . import model as model_mod

    top, lm = model_mod.prepare(lm, cfg)
    for p in top.parameters():
        want = param_dtype(p.requires_grad, cfg.training.precision, stored)
        if p.dtype != want:
            p.data = p.data.to(want)
    return top, lm


def file_key(name: str) -> str:
    """The safetensors key of a parameter of the (possibly peft-wrapped) model."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def _adapter_init(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """The whole initial value of an adapter weight (peft's default init, per-name generator)."""
    if ".lora_B." in name:
        return torch.zeros(shape, dtype=torch.float32)
    if ".lora_A." not in name:
        raise ValueError(f"{name}: unknown adapter parameter (expected lora_A or lora_B)")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    out = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=gen)
    return out


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to the slice ``like`` (a DTensor, or a plain tensor) holds on this rank."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full.to(like.device)


def load_targets(top: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """The tensors to fill from the files, by safetensors key (adapters excluded)."""
    sd = {file_key(k): v for k, v in top.state_dict().items() if not is_adapter(k)}
    if tied and HEAD_KEY in sd:
        head = sd.pop(HEAD_KEY)
        sd.setdefault(TIED_KEY, head)  # the same tensor when the rank holds both
    return sd


def _rebuild_rotary(lm: nn.Module, device: torch.device) -> None:
    dec = lm.model
    rotary = getattr(dec, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            dec.rotary_emb = type(rotary)(config=lm.config)


def materialize(top: nn.Module, lm: nn.Module, path: Path, device: torch.device, seed: int) -> None:
    """Allocate this rank's slices (after tensor/pipeline/FSDP layout) and fill them from
    ``path``'s safetensors files and the adapters' initialisation. A collective: every rank
    calls it (DCP plans the reads together)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shared = _shared_names(top)
    top.to_empty(device=device)  # allocates new tensors per module: ties are restored below
    _retie(top, shared)
    _rebuild_rotary(lm, device)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    targets = load_targets(top, tied)
    _require_stored(path, targets)
    dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized())
    with torch.no_grad():
        for name, p in top.named_parameters():
            if is_adapter(name):
                full = _adapter_init(name, _full_shape(p), seed)
                _local_of(p).copy_(_local_part(full, p))
    log.info("loaded this rank's part of %s: %d tensors, %.1f MiB", path, len(targets),
             sum(_local_of(t).numel() * t.element_size() for t in targets.values()) / 2**20)


def _shared_names(module: nn.Module) -> list[list[str]]:
    """Names of parameters shared between modules (tied embeddings), grouped."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, shared: list[list[str]]) -> None:
    """Point every name of a shared group at the first name's parameter again."""
    for first, *others in shared:
        param = module.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, param)


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.shape  # a DTensor's shape is the global one


def _local_of(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _stored_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise models.ModelLoadError(f"{path} holds no *.safetensors files; save the model with safe_serialization")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys.update(h.keys())
    return keys



def _require_stored(path: Path, wanted: Iterable[str]) -> None:
    """Refuse (``ModelLoadError``) a model directory whose files lack any of ``wanted``."""
    missing = sorted(set(wanted) - _stored_keys(path))
    if missing:
        raise models.ModelLoadError(f"{path}: the safetensors files lack {missing[:5]} ({len(missing)} tensors); "
                                    "point model.uri at the directory save_pretrained wrote for this model")


def _open_shards(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """An open ``safe_open`` handle per safetensors file, and each stored key's file."""
    from safetensors import safe_open

    handles = {str(f): safe_open(str(f), framework="pt") for f in sorted(Path(path).glob("*.safetensors"))}
    return handles, {k: name for name, h in handles.items() for k in h.keys()}

# --- ZeRO-3: partition unit by unit ------------------------------------------------------

def zero3_units(lm: nn.Module) -> list[nn.Module]:
    """The pieces :func:`materialize_zero3` reads and partitions one at a time: the embedding,
    each decoder layer, the final norm and ``lm_head`` (skipped when it is the tied embedding)."""
    from .parallelize import decoder, layer_items

    dec = decoder(lm)
    units: list[nn.Module] = [dec.embed_tokens, *(layer for _, layer in layer_items(lm)), dec.norm]
    head = getattr(lm, "lm_head", None)
    if head is not None and head.weight is not dec.embed_tokens.weight:
        units.append(head)
    return units


def _read_unit(unit: nn.Module, names: dict[int, str], handles: dict[str, Any], index: dict[str, str],
               tied: bool, seed: int) -> None:
    """Fill ``unit``'s (already allocated, whole) parameters: base weights from the files, one
    tensor at a time, adapters from their initialisation."""
    with torch.no_grad():
        for p in unit.parameters():
            name = names[id(p)]
            if is_adapter(name):
                p.copy_(_adapter_init(name, p.shape, seed))
                continue
            key = file_key(name)
            if tied and key == HEAD_KEY:
                key = TIED_KEY
            p.copy_(handles[index[key]].get_tensor(key))


def materialize_zero3(top: nn.Module, lm: nn.Module, path: Path, device: torch.device, seed: int,
                      ds_config: dict[str, Any]) -> None:
    """DeepSpeed ZeRO-3's counterpart of :func:`materialize`: no rank ever holds the whole model.

    For each unit (:func:`zero3_units`), in order: allocate it whole, rank 0 reads its tensors
    from the safetensors files (the other ranks receive them), and ``deepspeed.zero.Init(module=
    unit)`` - DeepSpeed's public way to partition an existing module as if it had been built
    inside ``zero.Init`` - broadcasts each parameter from rank 0 and keeps this rank's
    partition only. At most one unit (a decoder layer, or the embedding) is whole at a time.
    ``deepspeed.initialize`` then finds the parameters partitioned already and leaves them so.
    """
    import deepspeed
    import torch.distributed as dist

    names = {id(p): n for n, p in top.named_parameters(remove_duplicate=False)}
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    wanted = {file_key(n) for n in names.values() if not is_adapter(n)}
    if tied:
        wanted = {TIED_KEY if k == HEAD_KEY else k for k in wanted}
    _require_stored(path, wanted)
    # DeepSpeed's own communication layer over the run's process group (deepspeed.initialize
    # would do the same later; zero.Init needs it now to know the world size).
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False,
                               verbose=False)
    reader = dist.get_rank() == 0
    handles, index = _open_shards(path) if reader else ({}, {})
    _rebuild_rotary(lm, device)
    dec = lm.model
    for unit in zero3_units(lm):
        unit.to_empty(device=device)
        if unit is dec.embed_tokens and tied and getattr(lm, "lm_head", None) is not None:
            lm.lm_head.weight = dec.embed_tokens.weight  # to_empty broke the tie: restore it
        if reader:
            _read_unit(unit, names_of(unit, names, top), handles, index, tied, seed)
        deepspeed.zero.Init(module=unit, config_dict_or_path=ds_config, dtype=torch.float32)
    leftover = [n for n, p in top.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"ZeRO-3 loading left parameters unallocated: {leftover[:5]}")
    log.info("loaded %s partitioned for ZeRO-3 over %d ranks, one unit at a time", path, dist.get_world_size())


def names_of(unit: nn.Module, names: dict[int, str], top: nn.Module) -> dict[int, str]:
    """Parameter id -> name in ``top`` for ``unit``'s parameters (to_empty made new ones)."""
    by_param = {id(p): n for n, p in top.named_parameters(remove_duplicate=False)}
    return {id(p): by_param[id(p)] for p in unit.parameters()}


# --- QLoRA: quantize as it reads -----------------------------------------------------------

def materialize_qlora(top: nn.Module, lm: nn.Module, path: Path, device: torch.device, seed: int) -> None:
    """QLoRA's counterpart of :func:`materialize`, before FSDP2 shards the model (the NF4
    codes are what it shards): each frozen decoder-layer linear is read from the files in
    fp32, quantized to NF4 and put in place one at a time (``qlora.quantize_base`` with a
    source), so the whole base is never held unquantized; then the rest (embedding, norms,
    ``lm_head``: fp32) is allocated and read, and the adapters initialised as in every
    layout. Numerically the same weights as ``from_pretrained(dtype=float32)`` followed by
    ``quantize_base``."""
    from . import qlora

    shared = _shared_names(top)
    names = {id(p): n for n, p in top.named_parameters(remove_duplicate=False)}
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    # Every name, a tied parameter's both (``names`` keeps one name per tensor; the loop below
    # meets a tied embedding under its first name).
    all_names = [n for n, _ in top.named_parameters(remove_duplicate=False)]
    keys = {n: (TIED_KEY if tied and file_key(n) == HEAD_KEY else file_key(n)) for n in all_names if not is_adapter(n)}
    _require_stored(path, keys.values())
    handles, index = _open_shards(path)

    def read(name: str) -> torch.Tensor:
        key = keys[name]
        return handles[index[key]].get_tensor(key).to(device=device, dtype=torch.float32)

    report = qlora.quantize_base(lm, source=lambda module: read(names[id(module.weight)]))
    with torch.no_grad():
        for name, p in list(top.named_parameters()):
            if not p.is_meta:
                continue
            owner, _, attr = name.rpartition(".")
            value = _adapter_init(name, p.shape, seed) if is_adapter(name) else read(name)
            new = nn.Parameter(value.to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
            setattr(top.get_submodule(owner) if owner else top, attr, new)
    _retie(top, shared)
    _rebuild_rotary(lm, device)
    leftover = [n for n, t in [*top.named_parameters(), *top.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"QLoRA loading left tensors unallocated: {leftover[:5]}")
    log.info("loaded %s for QLoRA tensor by tensor: %d linears quantized to NF4 as read", path, len(report.quantized))
