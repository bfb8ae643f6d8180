"""bf16 on a CPU without native bf16: compute in fp32 from the bf16 weights as stored.

Called by the trainer (``trainer.py``, ``_build_model`` and ``_autocast``) when
``training.precision`` is ``bf16`` and the device is a CPU.

Why: a frozen LoRA base keeps the dtype it is stored in (``loading.param_dtype``: a bf16 base
stays bf16, half the memory of fp32), and ``bf16`` has meant ``torch.autocast(bfloat16)``.
On a CPU whose oneDNN has no bf16 kernels (AVX2 only: no AVX512-BF16, no AMX;
``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False) torch falls back to its own bf16
GEMM, and one layout of it is pathological: the gradient of a linear's input,
``grad_output @ weight`` with the weight ``[out, in]`` row-major, ran at 0.08-0.14 GFLOP/s
against 28-35 GFLOP/s in fp32 (measured here, torch 2.13, one thread). Profiled on one decoder
layer of the 1 B bench model (sequence 16): forward and backward under bf16 autocast 18.3 s,
99.7 % of it in ``aten::mm`` from ``MmBackward0``; the same layer computing in fp32 from its
bf16 weights 1.3 s. That is why one step of ``benchmarks/bench_load.py`` took 22-38 minutes,
and it hit every user training LoRA on a bf16 base on such a CPU.

The policy here: on such a CPU, ``bf16`` keeps the bf16 storage (memory unchanged) but
computes in fp32 - no autocast; each frozen low-precision ``nn.Linear`` upcasts its weight
for its matmul and again in backward (:class:`UpcastLinear`, which saves the bf16 weight,
not an fp32 copy: one fp32 weight in flight at a time, as QLoRA's NF4 linears dequantize),
and a frozen low-precision embedding returns fp32 rows. Trainable weights are fp32 master
weights either way. Numerically this is fp32 training on bf16-rounded base weights: at least
as precise as autocast. CPUs with native bf16 and GPUs keep autocast. Setting
``KUBEFORGE_CPU_BF16=autocast`` in the trainer's environment keeps autocast on any CPU (the
tests that check bf16 autocast's equivalence across layouts use it).
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOW = (torch.bfloat16, torch.float16)
ENV_CPU_BF16 = "KUBEFORGE_CPU_BF16"
"""``autocast``: keep bf16 autocast on a CPU without native bf16 (module docstring)."""


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls have native kernels on ``device`` (always assumed on accelerators)."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def computes_fp32(precision: str, device: torch.device) -> bool:
    """True when ``precision`` bf16 runs as fp32 compute from bf16 storage (module docstring)."""
    if precision != "bf16" or native_bf16(device):
        return False
    return os.environ.get(ENV_CPU_BF16, "").strip().lower() != "autocast"


class UpcastLinear(torch.autograd.Function):
    """``x @ weight.T (+ bias)`` with a low-precision frozen weight upcast to ``x``'s dtype for
    the matmul, in forward and again in backward; only the stored weight is saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ weight.to(grad.dtype), None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.dtype == x.dtype:
        return F.linear(x, self.weight, self.bias)
    return UpcastLinear.apply(x, self.weight, self.bias)


def _embedding_to_fp32(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def upcast_frozen(module: nn.Module) -> int:
    """Route every frozen low-precision ``nn.Linear`` of ``module`` through :class:`UpcastLinear`
    and make frozen low-precision embeddings return fp32; the number of modules changed.
    Works on the ``meta`` model (before tensor parallelism, pipeline cut and FSDP2): the
    patched forward reads ``self.weight`` at call time, whatever it has become by then."""
    changed = 0
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.requires_grad or weight.dtype not in LOW:
            continue
        if isinstance(m, nn.Linear):
            m.forward = types.MethodType(_linear_forward, m)  # type: ignore[method-assign]
            changed += 1
        elif isinstance(m, nn.Embedding):
            m.register_forward_hook(_embedding_to_fp32)
            changed += 1
    return changed
