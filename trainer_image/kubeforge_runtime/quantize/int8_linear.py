"""int8 weight-only ``linear`` on CPU without a full-precision copy of the weight.

Called through torchao's extension table: :func:`kubeforge_runtime.quantize.embeddings.register_ops`
registers :func:`linear` for ``Int8Tensor`` (``F.linear`` and ``aten.linear``), so every
int8 weight-only layer of a loaded or freshly quantized model runs it — the server's engine,
the QuantizeJob's perplexity, accuracy and latency, and the benchmarks alike. Other cases
(int8-dynamic, CUDA, 3-D weights, a backward pass, and a weight with one scale per row
small enough to fit one block, like a decoder's linears, where torchao's own path allocates
little and measured faster) go to torchao's own implementation.

Why: torchao 0.18's weight-only linear builds a new full-precision weight on every call —
``dequantize()`` for a weight with one scale per group of a row (several passes plus a fresh
allocation), ``qdata.t().to(dtype)`` for one scale per row. For SmolLM2-135M's tied
``lm_head`` (49152 x 576 int8, one scale per 32 values) that is a 113 MB fp32 tensor,
page-faulted afresh for each decode step; most of the time goes there, not into the multiply.

How: the weight is walked in blocks of rows (:data:`BLOCK_VALUES` values, a few MB of fp32
that stay in cache); each block is widened from int8 into one reused scratch buffer, its
zero points subtracted (where not all zero) and scaled per group in place, and multiplied
into its columns of the output (``torch.mm(..., out=...)``). The numbers are those of
torchao's dequantize-then-multiply (same int8 -> fp32 widening, same fp32 scale products),
only the order of the sums inside the matrix multiply differs. Memory: one block of scratch
per thread, never a copy of the weight.
"""

from __future__ import annotations

import threading
from typing import Any

BLOCK_VALUES = 1 << 19
"""Weight values widened per block (2 MiB of fp32): large enough that the per-block call
overhead is small against a 576-wide row's work, small enough to stay in a core's cache."""

_local = threading.local()


def _scratch(values: int, device: Any) -> Any:
    """A reused fp32 buffer of at least ``values`` elements for this thread and ``device``."""
    import torch

    buffers: dict[str, Any] = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    key = str(device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < values:
        # A normal tensor even when first needed under inference_mode: an inference tensor
        # could not be written in place later, outside it (e.g. under no_grad).
        with torch.inference_mode(False):
            buf = torch.empty(values, dtype=torch.float32, device=device)
        buffers[key] = buf
    return buf[:values]


def handles(activation: Any, weight: Any) -> bool:
    """Whether :func:`linear` computes ``F.linear(activation, weight)`` (else torchao does)."""
    import torch

    if weight.act_quant_kwargs is not None or weight.qdata.dim() != 2 or activation.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and activation.requires_grad:  # out= matmuls have no autograd
        return False
    block_rows, group = weight.block_size
    rows, width = weight.qdata.shape
    if block_rows != 1 or width % group:
        return False
    # One scale per row and a weight that fits one block (a decoder's linears): torchao's
    # widen-then-multiply allocates little and scales only the output; measured faster there.
    return group < width or rows * width > BLOCK_VALUES


def linear(activation: Any, weight: Any, bias: Any = None) -> Any:
    """``activation @ dequantize(weight).T + bias``, one block of weight rows at a time.

    ``weight``: torchao ``Int8Tensor`` (N, K), one scale (and zero point) per row or per group
    of a row; ``activation``: (..., K) on CPU in any float dtype. Returns (..., N) in the
    activation's dtype.
    """
    import torch

    rows, width = weight.qdata.shape
    group = weight.block_size[-1]
    groups = width // group
    dtype = activation.dtype
    x = activation.reshape(-1, width)
    if weight.act_pre_scale is not None:  # as torchao does (AWQ/SmoothQuant pre-scale)
        x = x * weight.act_pre_scale
    x = x.to(dtype)
    scale = weight.scale.reshape(rows, groups, 1)
    zero = weight.zero_point
    zero = zero.reshape(rows, groups, 1) if zero is not None and bool(zero.any()) else None
    qdata = weight.qdata.view(rows, groups, group)
    block_rows = max(1, min(rows, BLOCK_VALUES // width))
    scratch = _scratch(block_rows * width, x.device)
    out = torch.empty(x.shape[0], rows, dtype=dtype, device=x.device)
    for start in range(0, rows, block_rows):
        stop = min(rows, start + block_rows)
        block = scratch[: (stop - start) * width].view(stop - start, groups, group)
        block.copy_(qdata[start:stop])
        if zero is not None:
            block.sub_(zero[start:stop])
        block.mul_(scale[start:stop])
        dense = block.view(stop - start, width)
        if dtype != torch.float32:
            dense = dense.to(dtype)
        torch.mm(x, dense.t(), out=out[:, start:stop])
    if bias is not None:
        out += bias
    return out.reshape(*activation.shape[:-1], rows)
