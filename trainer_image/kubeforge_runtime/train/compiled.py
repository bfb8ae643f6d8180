"""Compiled training steps: ``torch.compile`` of each decoder block, as torchtitan does.

Called by the trainer (``trainer.py``) after tensor parallelism and pipeline pruning and
before the data-parallel wrapping (so FSDP2's per-layer hooks sit around the compiled
blocks), and by ``benchmarks/bench_attention.py``.

Each block is compiled in place (``nn.Module.compile``): parameter names do not change, so
checkpoints stay interchangeable between compiled and eager runs and between layouts. Every
block has the same shapes, so the first block's graph is reused by the others (one
compilation per distinct block, not per layer); the embedding, final norm, ``lm_head`` and
the loss stay eager. Attention masks are built once per forward outside the blocks
(``attention.stage_mask``) and passed in.

``training.compile``: ``on`` compiles, ``off`` does not, ``auto`` compiles on CUDA GPUs
(where kernel fusion is worth the compile time) and not on CPU, where the benchmark in the
README decides whether to turn it on (compilation takes minutes there and a short job does
not earn it back).
"""

from __future__ import annotations

import logging

from torch import nn

from .parallelize import layer_items

log = logging.getLogger(__name__)


def resolve(requested: str, device_type: str) -> bool:
    """Whether to compile for ``training.compile`` on ``device_type``."""
    if requested == "auto":
        return device_type == "cuda"
    return requested == "on"


def compile_blocks(lm: nn.Module) -> int:
    """Compile every decoder block of ``lm`` (a ``*ForCausalLM`` or a pipeline stage's part
    of one) in place; returns how many."""
    items = layer_items(lm)
    for _, layer in items:
        layer.compile(dynamic=False)
    log.info("compiled %d decoder blocks (torch.compile, per block)", len(items))
    return len(items)
