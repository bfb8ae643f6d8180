"""Merged projections: one GEMM for q/k/v and one for gate/up per Llama-style decoder layer.

Called by the trainer (``trainer.py``, :func:`apply`, right after the model is built and
before any parallel wrapping) when ``training.mergedProjections`` resolves to on
(:func:`resolve`). vLLM's ``QKVParallelLinear``/``MergedColumnParallelLinear`` and
torchtitan-style fused layers hold the merged weight as one parameter; here the parameters
stay the model's own (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``: the
same names, state dicts, checkpoints and output format as a stock run) and each forward
concatenates their weights (a copy of the weights, a few MiB, against a GEMM over every
token) and multiplies once. Autograd splits the merged gradients back: one GEMM for the
input gradient instead of two or three plus their sums, and one for the weight gradient.

Where it applies (:func:`mergeable` per group of linears, decided at each call): every
linear a plain ``nn.Linear`` (peft's LoRA layers, QLoRA's NF4 linears and other wrappers
take the stock forward) whose weight is a plain fp32 or bf16 tensor of the linear's whole
shape, all on the same dtype and device, with biases on all or none. Not merged: DTensor
weights (tensor parallelism shards q/k/v by heads; a merged weight would need the shards
re-laid out, which this module does not do) and DeepSpeed ZeRO-3 partitions (gathered by
hooks on each linear's own call, which the merged GEMM skips). FSDP2 hands the forward its
unsharded plain weights, so full fine-tuning merges under FSDP2, DDP and one process alike.
Anything else runs the stock module code. Not with compiled blocks (:func:`resolve`; not
measured).

``tests/unit/runtime/train/test_train_merged.py`` checks the loss and every gradient against
the unmerged model.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

log = logging.getLogger(__name__)


def resolve(requested: str, *, compiled: bool) -> bool:
    """Whether to merge for ``training.mergedProjections``: ``on`` merges, ``off`` does not,
    ``auto`` is off for now (the trainer benchmark's whole CPU step was level with it, README
    "Training throughput"). Never with compiled blocks (not measured there; Inductor plans
    its own GEMMs)."""
    return not compiled and requested == "on"


def mergeable(linears: tuple[nn.Module, ...]) -> bool:
    """Whether ``linears`` (all fed the same input) can run as one GEMM (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    first = linears[0].weight
    for lin in linears:
        if type(lin) is not nn.Linear:
            return False
        w = lin.weight
        if isinstance(w, DTensor) or type(w.detach()) is not torch.Tensor or hasattr(w, "ds_id"):
            return False  # sharded (tensor parallel), a tensor subclass, or a ZeRO-3 partition
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            return False  # a flattened or emptied shard (its owner gathers it in the module's hooks)
        if w.dtype != first.dtype or w.device != first.device or w.dtype not in (torch.float32, torch.bfloat16):
            return False
        if (lin.bias is None) != (linears[0].bias is None):
            return False
    return True


def merged_output(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """``torch.cat([lin(x) for lin in linears], -1)`` with one GEMM."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return F.linear(x, weight, bias)


def merged_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``tuple(lin(x) for lin in linears)`` with one GEMM (the outputs are views of one tensor)."""
    return merged_output(x, linears).split([lin.out_features for lin in linears], dim=-1)


def _project(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    if mergeable(linears):
        return merged_linear(x, linears)  # type: ignore[arg-type]
    return tuple(lin(x) for lin in linears)


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` from the merged ``[gate | up]`` GEMM output ``y`` (last dimension
    split in halves). Its backward writes both halves' gradients into one contiguous tensor:
    the merged linear's backward then multiplies it as it is, where a split of ``y`` would
    have autograd concatenate the two gradients first (a copy of the widest activation)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)
        ctx.save_for_backward(y)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        gate, up = y.chunk(2, dim=-1)
        out = torch.empty_like(y)
        g_gate, g_up = out.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        torch.mul(grad, silu, out=g_up)
        # d silu(g)/dg = sig * (1 + g * (1 - sig)) = sig + silu * (1 - sig)
        torch.mul(grad * up, sig.add_(silu.mul_(1 - sig)), out=g_gate)
        return out


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP.forward``: ``down(act(gate(x)) * up(x))`` with gate and up from one GEMM
    (and :class:`SwiGLUFunction` for SiLU, the Llama activation)."""
    linears = (self.gate_proj, self.up_proj)
    if not mergeable(linears):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    if _is_silu(self.act_fn) and self.gate_proj.out_features == self.up_proj.out_features:
        return self.down_proj(SwiGLUFunction.apply(merged_output(x, linears)))
    gate, up = merged_linear(x, linears)
    return self.down_proj(self.act_fn(gate) * up)


def _is_silu(act: Any) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(act, (nn.SiLU, SiLUActivation))


def apply(lm: nn.Module, rotary: Any = None) -> dict[str, int]:
    """Swap the merged forwards into every ``LlamaAttention`` and ``LlamaMLP`` of ``lm`` in
    place (per instance; other families are left alone); ``rotary`` replaces transformers'
    ``apply_rotary_pos_emb`` (the fused pieces' one, ``fused.apply_rotary``). Returns how
    many modules of each kind were swapped."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    counts = {"attention": 0, "mlp": 0}
    for module in lm.modules():
        name = type(module).__name__
        if name == "LlamaAttention" and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim")):
            # The fused pieces' attention forward with q/k/v from one GEMM; RoPE stock unless given.
            module.forward = functools.partial(fused.attention_forward, module, project=_project,
                                               rotary=rotary or apply_rotary_pos_emb)
            counts["attention"] += 1
        elif name == "LlamaMLP" and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
    log.info("merged projections: %d attention (q/k/v), %d MLP (gate/up)", counts["attention"], counts["mlp"])
    return counts
