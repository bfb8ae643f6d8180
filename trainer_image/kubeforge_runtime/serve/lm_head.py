"""The vocabulary projection of a decode step: one row against ``[hidden, vocab]``, a few in slices.

A decode step of one request projects one hidden vector onto the whole vocabulary
(SmolLM2: 576 x 49,152 weights, 113 MB in fp32, a fifth of the model's weights and the largest
single matmul of the step). ``nn.Linear`` keeps the weight ``[vocab, hidden]`` and computes
``x @ W.T``. On this CPU (2 threads, AVX2, MKL; ``benchmarks/bench_lm_head.py``, README
"Serving"):

* one row: ``x @ Wt`` with ``Wt`` a contiguous ``[hidden, vocab]`` copy took about 0.6x the
  time of ``nn.Linear``; for 8 and 32 rows the copy was slower than ``nn.Linear`` (an
  unlocked run, load 3), so only one-row calls take it;
* a few rows (a decode step of several requests: 2 to :data:`CHUNKED_MAX_ROWS`): one matmul
  per :data:`CHUNK` vocabulary rows of the original weight, writing the logits transposed,
  took 0.5-0.8x the time of one ``x @ W.T``. The single call appears to stream the
  113 MB weight once per block of rows; a slice that stays in cache is read once for all
  rows. Larger calls keep ``nn.Linear``'s one matmul.

Cost: one extra copy of the projection's weight (113 MB for SmolLM2), held by the engine, not
in the model's state dict. The copy is taken once, when the engine starts: the serving model's
weights do not change afterwards (adapters are LoRA modules on the decoder, not on
``lm_head``; a head that is not a plain ``nn.Linear`` is left alone).
"""

from __future__ import annotations

from typing import Any

import torch


CHUNK = 512
"""Vocabulary rows per matmul of a several-row call: a 512 x 576 fp32 slice (1.2 MB) stays in
cache while every row of the batch is multiplied by it (512 beat 128 and 256 here:
``bench_lm_head.py --chunks 128,256,512``)."""

CHUNKED_MAX_ROWS = 64
"""Calls with more rows (prefills without ``logits_to_keep``) keep ``nn.Linear``'s one matmul."""


def _chunked(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` of a few rows, one vocabulary slice of ``weight`` at a time."""
    out = torch.empty(weight.shape[0], x.shape[0], dtype=x.dtype)  # logits transposed: each slice's rows contiguous
    xt = x.t()
    for start in range(0, weight.shape[0], CHUNK):
        torch.mm(weight[start : start + CHUNK], xt, out=out[start : start + CHUNK])
    return out.t().contiguous()


def install(model: Any) -> bool:
    """Route ``model``'s output projection through the one-row copy and the sliced few-row path.

    Only for a plain ``nn.Linear`` head with a plain floating-point weight on the CPU; returns
    whether it applied. Idempotent.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or getattr(head, "_kf_one_row", False):
        return False
    weight = head.weight
    # A quantized weight (a tensor subclass, e.g. torchao's) keeps its own kernels.
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.device.type != "cpu" or not weight.is_floating_point():
        return False
    with torch.no_grad():
        weight_t = weight.detach().t().contiguous()  # [hidden, vocab]
    bias = head.bias
    linear = head.forward
    vocab = weight.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and weight.requires_grad:  # out= below has no autograd
            return linear(x)
        if rows == 1:
            out = torch.matmul(x, weight_t)
        elif rows <= CHUNKED_MAX_ROWS:
            out = _chunked(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], vocab)
        else:
            return linear(x)
        return out if bias is None else out + bias

    head.forward = forward
    head._kf_one_row = True
    return True
