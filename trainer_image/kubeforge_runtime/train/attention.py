"""Attention kernels for packed samples: document boundaries, not a materialised mask.

Called by the trainer (``trainer.py``) right after the model is built, and by
``parallelize.CausalLMStage`` (every layout's forward) for the mask it hands the layers.

A packed sample holds several records; its position ids restart at every record, and each
record must attend to itself only (document-causal attention). How that reaches the kernel
depends on the attention implementation, all through transformers' own attention and mask
interfaces (``create_causal_mask`` dispatches on ``config._attn_implementation``):

* ``flash_attention_2`` - no mask at all: transformers reads the record boundaries from the
  position ids and calls the varlen kernel with cumulative sequence lengths.
* ``flex_attention`` - a ``BlockMask`` built from the document-causal rule; blocks that lie
  wholly outside a record are skipped, the rest run in the fused flex kernel.
* ``sdpa`` - a batch without packed rows takes SDPA's ``is_causal`` fast path (no mask);
  a packed batch gets the dense block-diagonal boolean mask: the fallback.
* ``eager`` - the plain matmul-softmax reference (dense mask), for tests.

``auto`` picks the fastest one that can train on the device: flash-attention 2 on CUDA when
the ``flash_attn`` package is installed, else flex attention on CUDA, else SDPA. On CPU that
is SDPA: FlexAttention has no backward on CPU in torch 2.13 ("FlexAttention does not support
backward on CPU"), and SDPA's CPU flash kernel takes the boolean mask itself.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import torch
from torch import nn

from .config import ConfigError

log = logging.getLogger(__name__)

Attention = Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"]
IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "flex_attention", "flash_attention_2", "eager")


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package (flash-attention 2, CUDA only) is importable."""
    return importlib.util.find_spec("flash_attn") is not None


def flex_available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve(requested: str, device_type: str, *, training: bool = True) -> str:
    """The implementation to use for ``training.attention`` on ``device_type``; a clear
    ConfigError (exit 78) when the requested one cannot run here."""
    if requested == "auto":
        if device_type == "cuda" and flash_attn_installed():
            return "flash_attention_2"
        if device_type == "cuda" and flex_available():
            return "flex_attention"
        return "sdpa"
    if requested not in IMPLEMENTATIONS:
        raise ConfigError(f"training.attention {requested!r}: use one of auto, {', '.join(IMPLEMENTATIONS)}")
    if requested == "flash_attention_2" and (device_type != "cuda" or not flash_attn_installed()):
        raise ConfigError("training.attention flash_attention_2 needs CUDA GPUs and the flash_attn package; "
                          "use auto (or sdpa)")
    if requested == "flex_attention":
        if not flex_available():
            raise ConfigError("training.attention flex_attention needs torch.nn.attention.flex_attention "
                              f"(torch {torch.__version__} lacks it); use auto (or sdpa)")
        if training and device_type != "cuda":
            raise ConfigError("training.attention flex_attention has no backward on CPU in this torch; "
                              "use auto (or sdpa) on CPU")
    return requested


def apply(lm: nn.Module, implementation: str) -> None:
    """Switch ``lm`` (a ``*ForCausalLM``) to ``implementation`` in place; its layers and the
    stage's mask builder both read it from the model config."""
    if getattr(lm.config, "_attn_implementation", None) != implementation:
        lm.set_attn_implementation(implementation)
    log.info("attention: %s", implementation)


def stage_mask(config: Any, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
    """The mask the decoder layers get for this forward: None (causal fast path, or FA2
    varlen from the position ids), a flex ``BlockMask``, or a dense boolean mask (see the
    module docstring). Built once per forward and shared by every layer."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
