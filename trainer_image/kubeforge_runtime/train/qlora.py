"""QLoRA: the frozen base's linear weights in 4-bit NF4 (torchao), LoRA adapters on top.

Called by ``model.build`` for ``method: qlora`` (after peft has wrapped the target modules,
so the adapters stay plain fp32 parameters and only frozen weights are quantized), by
``output.output_model`` (a ``merged`` output dequantizes the base before merging) and by the
tests that measure the base's memory.

What is quantized: every ``nn.Linear`` inside the decoder layers whose weight is frozen - the
adapters' base layers and the linears LoRA does not target. Embeddings, norms and
``lm_head`` keep the base's dtype (as in the QLoRA paper). The format is torchao's
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


def _frozen_linears(lm: nn.Module) -> list[tuple[str, nn.Linear]]:
    from .parallelize import layer_items

    out = []
    for idx, layer in layer_items(lm):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                out.append((f"layers.{idx}.{name}", module))
    return out


@torch.no_grad()
def quantize_base(lm: nn.Module, source: Callable[[nn.Linear], torch.Tensor] | None = None) -> QuantizeReport:
    """Quantize the frozen linear weights of ``lm``'s decoder layers to NF4, in place.

    A weight whose size is not a multiple of BLOCK_SIZE stays as it is (listed in
    ``skipped``); biases, adapters, embeddings, norms and ``lm_head`` are never quantized.
    ``source`` (``loading.materialize_qlora``): where each linear's weight comes from, read
    one at a time while ``lm`` is still on the meta device - so the whole base is never held
    unquantized; without it, the weights ``lm`` holds.
    """
    report = QuantizeReport()
    for name, module in _frozen_linears(lm):
        w = module.weight if source is None else source(module)
        if is_nf4(w):
            continue
        if w.dim() != 2 or w.numel() % BLOCK_SIZE:
            report.skipped.append(name)
            if source is not None:
                module.weight = nn.Parameter(w, requires_grad=False)
            continue
        q = to_nf4(w)
        module.weight = nn.Parameter(q, requires_grad=False)
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
    for module in lm.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and is_nf4(w):
            module.weight = nn.Parameter(w.get_original_weight().to(w.dtype).contiguous(), requires_grad=False)
            n += 1
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
