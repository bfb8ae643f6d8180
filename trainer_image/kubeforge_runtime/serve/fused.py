"""Merged projections for the serving engine: one matmul for q/k/v and one for gate/up per layer.

A Llama-style decoder layer runs seven linears: ``q_proj``, ``k_proj``, ``v_proj`` on the same
input, ``o_proj``, then ``gate_proj`` and ``up_proj`` on the same input, ``down_proj``. vLLM
builds ``QKVParallelLinear`` and ``MergedColumnParallelLinear`` for the two groups: one wider
matmul instead of three (two), fewer dispatches per step. :func:`install` does the same on a
loaded transformers model, without touching its modules' code:

* the group's weights are copied once into one ``[sum of outputs, in]`` tensor and each
  module's weight becomes a view of its rows (``param.data`` is re-pointed, so the memory is
  the same as before, and a tree that shares the base's parameters - an adapter built by
  :mod:`.adapters` - sees the same values);
* the group's first projection (``q_proj``, ``gate_proj``) computes the merged matmul and keeps
  the other outputs; the next ones (``k_proj``, ``v_proj``; ``up_proj``), called on the *same*
  input tensor, return their slice. Called on any other input, each computes its own matmul
  as before - so the model's forward code is unchanged and stays correct whatever order it
  calls them in; the saving only needs the stock order (first projection first).

Covered: plain ``nn.Linear`` projections whose weights are ordinary floating-point tensors of
one dtype and device (biases merged as well). Left alone (their own forward is kept): a
projection wrapped by peft (LoRA: the adapter's ``B A x`` term is per module), a quantized
weight (a tensor subclass with its own kernels), groups whose members differ in dtype or device.
On an adapter's tree, groups without a LoRA layer are merged and reuse the base's merged storage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Projections that read the same input, in the order the stock forward calls them."""


def _plain(linear: Any) -> bool:
    if type(linear) is not torch.nn.Linear:
        return False
    w = linear.weight
    return type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point() and w.dim() == 2


def _adjacent(weights: list[torch.Tensor]) -> bool:
    """Whether the weights already lie one after the other in one storage (merged earlier)."""
    first = weights[0]
    offset = first.storage_offset()
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if w.storage_offset() != offset:
            return False
        offset += w.numel()
    return True


def _merged_weight(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """One ``[sum of outputs, in]`` tensor whose row blocks are the linears' weights."""
    weights = [m.weight.data for m in linears]
    rows = sum(w.shape[0] for w in weights)
    if _adjacent(weights):  # merged already (the base's, shared by an adapter tree): reuse it
        first = weights[0]
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, first.shape[1]))
    merged = torch.cat(weights, dim=0)
    start = 0
    for m, w in zip(linears, weights):
        m.weight.data = merged[start : start + w.shape[0]]  # a view: the old copy is freed
        start += w.shape[0]
    return merged


class _Group:
    """The merged matmul of one group, computed by its first member and handed to the others."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        self.sizes = [m.out_features for m in linears]
        self.weight = _merged_weight(linears)
        biases = [m.bias for m in linears]
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        self.linears = linears
        self.input: torch.Tensor | None = None  # the input of the last merged call
        self.parts: list[torch.Tensor | None] = []

    def first(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        parts = list(out.split(self.sizes, dim=-1))
        self.input, self.parts = x, [None, *parts[1:]]
        return parts[0]

    def member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        part = self.parts[i] if x is self.input else None
        if part is None:  # another input, or asked twice: the member's own matmul
            m = self.linears[i]
            return F.linear(x, m.weight, m.bias)
        self.parts[i] = None
        if not any(p is not None for p in self.parts):
            self.input = None  # every part handed out: hold no activations between calls
        return part


def _install_group(parent: torch.nn.Module, names: tuple[str, ...]) -> bool:
    linears = [getattr(parent, n, None) for n in names]
    if not all(_plain(m) for m in linears):
        return False
    w0 = linears[0].weight
    if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.in_features != linears[0].in_features
           for m in linears):
        return False
    if len({m.bias is None for m in linears}) != 1:
        return False
    if any(getattr(m, "_kf_merged", False) for m in linears):
        return False
    group = _Group(linears)
    linears[0].forward = group.first
    for i, m in enumerate(linears[1:], start=1):
        m.forward = lambda x, i=i: group.member(i, x)
    for m in linears:
        m._kf_merged = True
    return True


def install(model: torch.nn.Module) -> dict[str, int]:
    """Merge every q/k/v and gate/up group of ``model`` that qualifies; returns how many of each.

    For a serving model whose weights stay put: a module given a new weight tensor afterwards
    (rather than updated in place) would not be seen by the merged matmul. Idempotent.
    """
    counts = {"qkv": 0, "gate_up": 0}
    with torch.no_grad():
        for module in model.modules():
            for key, names in zip(counts, GROUPS):
                if all(hasattr(module, n) for n in names) and _install_group(module, names):
                    counts[key] += 1
    return counts


RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""Norm classes whose forward is Llama's ``weight * (x * rsqrt(mean(x^2) + eps))`` in fp32
(Gemma's ``1 + weight`` and others are not in the list and are left alone)."""


def _rms_norm_forward(norm: torch.nn.Module) -> Any:
    stock = norm.forward
    shape = (norm.weight.shape[-1],)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != torch.float32 or norm.weight.dtype != torch.float32:
            return stock(hidden_states)  # the stock casts between dtypes; keep them exactly
        return torch.rms_norm(hidden_states, shape, norm.weight, norm.variance_epsilon)

    return forward


def install_rms_norm(model: torch.nn.Module) -> int:
    """Run each listed fp32 RMSNorm as ``torch.rms_norm``: one call where the stock forward makes
    seven from Python (to, pow, mean, add, rsqrt, mul, to, mul). Returns how many it replaced."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and not getattr(module, "_kf_fused", False):
            if hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.forward = _rms_norm_forward(module)
                module._kf_fused = True
                count += 1
    return count
