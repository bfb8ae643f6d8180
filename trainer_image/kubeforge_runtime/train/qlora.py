"""QLoRA: the frozen base's linear weights in 4-bit NF4 (torchao), LoRA adapters on top.

Called by ``model.build`` for ``method: qlora`` (after peft has wrapped the target modules,
so the adapters stay plain fp32 parameters and only frozen weights are quantized), by
``output.output_model`` (a ``merged`` output dequantizes the base before merging) and by the
tests that measure the base's memory.

What is quantized: every ``nn.Linear`` inside the decoder layers whose weight is frozen - the
adapters' base layers and the linears LoRA does not target - and the frozen input embedding
and ``lm_head`` (one tensor when tied). The QLoRA paper kept embeddings in 16 bits; here they
are quantized too because on a small model they are a large share of the base (SmolLM2-135M's
tied embedding is 21 % of its weights: left in bf16 it held the whole base at 0.415x of bf16,
quantized 0.26x). The embedding lookup (:func:`nf4_rows`) dequantizes only the rows it looks
up: a row of a ``[vocab, hidden]`` table is ``hidden / 64`` whole NF4 blocks when the hidden
size is a multiple of 64 (an embedding whose rows are not stays as loaded); ``lm_head``
multiplies as the decoder linears do. Norms keep the base's dtype. The format is torchao's
``NF4Tensor``: 4-bit NormalFloat codes (two per byte) in blocks of :data:`BLOCK_SIZE`
weights, each block's absmax scale quantized to int8 in groups of up to
:data:`MAX_SCALER_BLOCK` blocks with one fp32 factor per group (double quantization):
``0.5 + 1/64 + 4/(64 * group)`` bytes per weight, 0.258x of bf16 with the standard group of 256.

A linear is multiplied by dequantizing its weight on the fly (``LinearNF4``: forward and
backward), so the training step computes with ``dequantize(NF4(W)) + B A``: equivalence
tests compare QLoRA runs with one QLoRA process, not with LoRA. ``NF4Tensor`` implements
FSDP2's ``fsdp_pre_all_gather``/``fsdp_post_all_gather``, so ``fully_shard`` shards and
gathers the 4-bit codes themselves (config.py allows qlora with strategy fsdp only).

The group size is the largest power of two up to 256 that leaves at least
:data:`MIN_SCALER_GROUPS` whole groups (so FSDP can split a weight's groups over up to eight
ranks); it depends on the weight's shape only, so every rank and layout quantizes alike.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

BLOCK_SIZE = 64
"""Weights per NF4 block (one absmax scale each), as in the QLoRA paper."""
MAX_SCALER_BLOCK = 256
"""Block scales per double-quantization group (one fp32 factor each), at most."""
MIN_SCALER_GROUPS = 8
"""Fewest double-quantization groups per weight (FSDP splits a weight's groups over ranks)."""


def is_nf4(t: Any) -> bool:
    """Whether ``t`` is a torchao NF4Tensor (or a DTensor whose local shard is one)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return type(t).__name__ == "NF4Tensor" and hasattr(t, "quantized_data")


def scaler_block_size(n_blocks: int) -> int:
    """The double-quantization group for a weight of ``n_blocks`` blocks (module docstring)."""
    size = MAX_SCALER_BLOCK
    while size > 1 and n_blocks % (size * MIN_SCALER_GROUPS):
        size //= 2
    return size


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (2-D, a multiple of BLOCK_SIZE elements) as an NF4Tensor of its dtype."""
    from torchao.quantization import to_nf4 as ao_to_nf4

    w = weight.detach().contiguous()
    return ao_to_nf4(w, BLOCK_SIZE, scaler_block_size(w.numel() // BLOCK_SIZE))


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor actually stores: an NF4Tensor's codes, scales, factors and lookup table."""
    if is_nf4(t):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
    return t.numel() * t.element_size()


def nf4_storage(numel: int, itemsize: int = 4) -> int:
    """Bytes :func:`to_nf4` stores for a weight of ``numel`` elements of ``itemsize`` bytes,
    from its size alone: the 4-bit codes, an int8 scale per block, an fp32 factor per group,
    and the scale mean and 16-entry NF4 table in the weight's dtype."""
    blocks = numel // BLOCK_SIZE
    return numel // 2 + blocks + 4 * (blocks // scaler_block_size(blocks)) + 17 * itemsize


@dataclass
class QuantizeReport:
    """What :func:`quantize_base` did: weights quantized and left alone, and their storage."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    params: int = 0
    nf4_bytes: int = 0

    @property
    def bf16_bytes(self) -> int:
        """What the quantized weights would take in bf16."""
        return 2 * self.params

    def describe(self) -> dict[str, Any]:
        return {"quantizedLinears": len(self.quantized), "quantizedParameters": self.params,
                "nf4Bytes": self.nf4_bytes, "bf16Bytes": self.bf16_bytes,
                "ratioToBf16": round(self.nf4_bytes / self.bf16_bytes, 4) if self.params else None,
                "skipped": self.skipped}


def _frozen_weights(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose frozen weight is quantized: decoder-layer linears, then the input
    embedding and ``lm_head`` (the same tensor when tied: quantized once)."""
    from .parallelize import layer_items

    out: list[tuple[str, nn.Module]] = []
    for idx, layer in layer_items(lm):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                out.append((f"layers.{idx}.{name}", module))
    ends = [("embed_tokens", lm.get_input_embeddings(), nn.Embedding), ("lm_head", lm.get_output_embeddings(), nn.Linear)]
    for name, module, kind in ends:
        if isinstance(module, kind) and not module.weight.requires_grad:
            out.append((name, module))
    return out


def nf4_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` for an NF4 ``[vocab, hidden]`` table (``hidden`` a multiple of the block
    size), dequantizing only those rows: the same arithmetic as ``get_original_weight`` (the
    block scale from its int8 code and its group's factor, times the NF4 value of each code),
    so bit for bit the rows of the dequantized table."""
    rows_n, cols = weight.shape
    block = weight.block_size
    per_row = cols // block
    flat = ids.reshape(-1)
    blocks = (flat[:, None] * per_row + torch.arange(per_row, device=flat.device)).reshape(-1)
    scalers = (weight.quantized_scalers[blocks] / weight.quantization_factor[blocks // weight.scaler_block_size]
               ).to(weight.dtype) + weight.scaler_mean
    half = cols // 2  # two 4-bit codes per byte: the even element high, the odd one low
    data = weight.quantized_data[flat[:, None] * half + torch.arange(half, device=flat.device)]
    values = torch.stack([weight.nf4[(data >> 4).long()], weight.nf4[(data & 0b1111).long()]], dim=-1)
    values = values.reshape(flat.numel(), per_row, block) * scalers.reshape(flat.numel(), per_row, 1)
    return values.reshape(*ids.shape, cols)


def _nf4_embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return nf4_rows(self.weight, ids)


def _quantizable(module: nn.Module, w: torch.Tensor) -> bool:
    if w.dim() != 2 or w.numel() % BLOCK_SIZE:
        return False
    # an embedding's rows must be whole blocks (nf4_rows); a linear's weight only a whole number of them
    return not isinstance(module, nn.Embedding) or w.shape[1] % BLOCK_SIZE == 0


@torch.no_grad()
def quantize_base(lm: nn.Module, source: Callable[[nn.Linear], torch.Tensor] | None = None) -> QuantizeReport:
    """Quantize the frozen linear weights of ``lm``'s decoder layers to NF4, in place.

    Also the input embedding and ``lm_head`` (module docstring). A weight whose size is not
    a multiple of BLOCK_SIZE (an embedding: whose rows are not) stays as it is (listed in
    ``skipped``); biases, adapters and norms are never quantized. ``source``
    (``loading.materialize_qlora``): where each module's weight comes from, read one at a
    time while ``lm`` is still on the meta device - so the whole base is never held
    unquantized; without it, the weights ``lm`` holds. A tied weight is read and quantized
    once and stays one parameter.
    """
    report = QuantizeReport()
    done: dict[int, nn.Parameter] = {}  # id of the weight before -> after (tied embeddings)
    for name, module in _frozen_weights(lm):
        before = module.weight
        if id(before) in done:
            module.weight = done[id(before)]
            continue
        w = before if source is None else source(module)
        if is_nf4(w):
            continue
        if not _quantizable(module, w):
            report.skipped.append(name)
            if source is not None:
                module.weight = done[id(before)] = nn.Parameter(w, requires_grad=False)
            continue
        q = to_nf4(w)
        module.weight = done[id(before)] = nn.Parameter(q, requires_grad=False)
        if isinstance(module, nn.Embedding):
            module.forward = types.MethodType(_nf4_embedding_forward, module)  # type: ignore[method-assign]
        report.quantized.append(name)
        report.params += w.numel()
        report.nf4_bytes += storage_bytes(q)
    if report.skipped:
        log.warning("qlora: %d linear weights are not a multiple of %d elements and stay unquantized: %s",
                    len(report.skipped), BLOCK_SIZE, report.skipped[:5])
    log.info("qlora: %s", report.describe())
    return report


@torch.no_grad()
def dequantize_base(lm: nn.Module) -> int:
    """Replace every NF4 weight in ``lm`` by its dequantized value (a plain frozen parameter
    of the NF4Tensor's dtype), in place; returns how many. Merging the adapters into the
    result gives exactly the function QLoRA trained."""
    n = 0
    done: dict[int, nn.Parameter] = {}  # a tied weight stays one parameter
    for module in lm.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Embedding)) and w is not None and is_nf4(w):
            if id(w) not in done:
                done[id(w)] = nn.Parameter(w.get_original_weight().to(w.dtype).contiguous(), requires_grad=False)
                n += 1
            module.weight = done[id(w)]
            module.__dict__.pop("forward", None)  # an embedding's NF4 lookup: back to nn.Embedding's
    return n


def frozen_storage(lm: nn.Module) -> dict[str, int]:
    """Bytes of the frozen parameters as stored, and what they would take in bf16."""
    stored = as_bf16 = 0
    for p in lm.parameters():
        if p.requires_grad:
            continue
        stored += storage_bytes(p)
        as_bf16 += 2 * p.numel()
    return {"stored": stored, "bf16": as_bf16}
