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
  a packed batch runs record by record (:class:`Documents`, varlen attention made of SDPA
  calls): the records are gathered into a few buckets of equal padded length (powers of two)
  and each bucket is one ``is_causal`` SDPA call, so no query meets a key of another record
  and no mask is built. In compiled blocks (``compiled.py``) the attention call stays
  outside the graph (bucket shapes change every batch and would recompile), the rest of
  the block is compiled. The dense block-diagonal boolean mask is the fallback
  (``stage_mask(documents=False)``).
* ``eager`` - the plain matmul-softmax reference (dense mask), for tests.

``auto`` picks the fastest one that can train on the device: flash-attention 2 on CUDA when
the ``flash_attn`` package is installed, else flex attention on CUDA, else SDPA. On CPU that
is SDPA: FlexAttention has no backward on CPU in torch 2.13 ("FlexAttention does not support
backward on CPU"), and the record buckets keep SDPA on its causal flash kernel.
The work of a packed row is then the sum of its records' squared lengths (padded to the
bucket), not the row's: for the first micro-batch of the shipped text set (48 records in 4 x 256
tokens) that is about a fifth of the dense mask's (13 records padded to 16, 31 to 32, 4 to 64).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .config import ConfigError

BUCKET_MIN = 16
"""The shortest padded record length of :class:`Documents` (shorter records are padded to it)."""

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
    stage's mask builder both read it from the model config. For ``sdpa`` this also installs
    :func:`sdpa_or_documents` as transformers' ``sdpa`` attention function (in this process):
    it runs :class:`Documents` record by record and hands every other mask to transformers'
    own SDPA function unchanged."""
    if getattr(lm.config, "_attn_implementation", None) != implementation:
        lm.set_attn_implementation(implementation)
    if implementation == "sdpa":
        install_documents()
    log.info("attention: %s", implementation)


class Documents:
    """Where the records of a packed micro-batch are, for record-by-record attention: the
    "mask" :func:`stage_mask` hands the layers for a packed ``sdpa`` batch (see the module
    docstring). Built once per forward from the position ids (a record starts where they
    restart at 0), shared by every layer.

    The (batch x sequence) tokens are gathered (``gather``) into buckets; bucket ``(start,
    count, length)`` holds ``count`` records, each right-padded to ``length`` (a power of two
    from :data:`BUCKET_MIN`, or the sequence length). A pad slot repeats the record's last
    token: attention is causal, so no real query of the record sees it, and its output is
    never read back (``scatter``: each token's slot), so it adds nothing to a gradient
    either. The work is the sum of the records' squared lengths, not rows x sequence²."""

    def __init__(self, position_ids: torch.Tensor) -> None:
        # Array operations over the records (numpy: single-threaded, no per-op thread
        # start-up for these few-thousand-element arrays), no Python loop over tokens.
        rows, seq = position_ids.shape
        tokens = rows * seq
        starts = (position_ids.detach().cpu() == 0).numpy()
        starts[:, 0] = True  # a record never runs over a row's end: row starts are record starts
        first = np.flatnonzero(starts)
        n = np.diff(first, append=tokens)
        # Padded length: the next power of two, at least BUCKET_MIN, at most the sequence.
        length = np.clip(1 << np.ceil(np.log2(n)).astype(np.int64), BUCKET_MIN, seq)
        order = np.argsort(length, kind="stable")  # buckets by length, records in order within one
        slot0 = np.empty_like(length)  # each record's first slot in the gathered order
        slot0[order] = np.cumsum(length[order]) - length[order]
        # gather: slot -> token (pad slots repeat the record's last token)
        slot_record = np.repeat(order, length[order])
        within = np.arange(len(slot_record)) - slot0[slot_record]
        gather = first[slot_record] + np.minimum(within, n[slot_record] - 1)
        # scatter: token -> its slot
        token_record = np.repeat(np.arange(len(first)), n)
        scatter = slot0[token_record] + np.arange(tokens) - first[token_record]
        sizes, begins, counts = np.unique(length[order], return_index=True, return_counts=True)
        self.buckets: list[tuple[int, int, int]] = [
            (int(slot0[order[i]]), int(c), int(size)) for size, i, c in zip(sizes, begins, counts)]
        device = position_ids.device
        self.gather = torch.from_numpy(gather).to(device)
        self.scatter = torch.from_numpy(scatter).to(device)
        self.shape = (rows, seq)
        self.records = len(first)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
               dropout: float) -> torch.Tensor:
        """Record-by-record causal attention; query (batch, heads, seq, dim), key and value
        (batch, kv heads, seq, dim). Returns (batch, seq, heads, dim), what transformers'
        attention functions return."""
        rows, seq = self.shape
        heads, dim = query.shape[1], query.shape[3]
        rep = heads // key.shape[1]

        def gathered(t: torch.Tensor) -> torch.Tensor:  # (tokens, heads, dim) in bucket order
            return _ToSlots.apply(t.transpose(1, 2).reshape(rows * seq, t.shape[1], t.shape[3]), self.gather,
                                  self.scatter)

        # The buckets tile the slots in order: split, whose backward concatenates the
        # buckets' gradients (a slice's backward fills a zero tensor of the whole size for
        # each bucket, then copies its part in).
        sizes = [count * length for _, count, length in self.buckets]
        qs, ks, vs = (gathered(t).split(sizes) for t in (query, key, value))
        outs = []
        for (_, count, length), qt, kt, vt in zip(self.buckets, qs, ks, vs):
            def bucket(t: torch.Tensor) -> torch.Tensor:
                return t.view(count, length, t.shape[1], dim).transpose(1, 2)

            # Grouped-query heads share their key/value head inside the kernel (no copies).
            o = torch.nn.functional.scaled_dot_product_attention(bucket(qt), bucket(kt), bucket(vt), dropout_p=dropout,
                                                                 is_causal=True, scale=scaling, enable_gqa=rep > 1)
            outs.append(o.transpose(1, 2).reshape(count * length, heads, dim))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return _ToTokens.apply(out, self.scatter).view(rows, seq, heads, dim)


class _ToSlots(torch.autograd.Function):
    """Tokens -> bucket slots (``index_select`` by ``gather``), for :meth:`Documents.attend`.

    Backward reads each token's own slot (``index_select`` by ``scatter``) instead of
    autograd's scatter-add over all slots into a zero-filled buffer (a few per cent of a step
    on CPU): a pad slot's gradient is exactly zero here - its output is dropped
    (:class:`_ToTokens`), and attention is causal, so no real query attends to it and its
    query, key and value get no gradient - so leaving the pad slots out adds nothing less."""

    @staticmethod
    def forward(ctx: Any, tokens: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scatter)
        return tokens.index_select(0, gather)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (scatter,) = ctx.saved_tensors
        return grad.index_select(0, scatter), None, None


class _ToTokens(torch.autograd.Function):
    """Bucket slots -> tokens (``index_select`` by ``scatter``: each token's slot, pad slots
    dropped), for :meth:`Documents.attend`. Every slot is read at most once, so backward
    copies the gradients into their slots (``index_copy_``; pad slots zero) rather than
    autograd's scatter-add."""

    @staticmethod
    def forward(ctx: Any, slots: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scatter)
        ctx.slots = slots.shape[0]
        return slots.index_select(0, scatter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scatter,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.slots, *grad.shape[1:]))
        return out.index_copy_(0, scatter, grad), None


@torch.compiler.disable
def _attend_documents(docs: Documents, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scaling: float | None, dropout: float) -> torch.Tensor:
    """``docs.attend``, never traced: in a compiled block (``compiled.py``) the graph breaks
    here, the code before and after the attention stays compiled, and a new bucket plan
    (every batch) recompiles nothing."""
    return docs.attend(query, key, value, scaling, dropout)


def sdpa_or_documents(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention function, record by record for a :class:`Documents` mask."""
    if isinstance(attention_mask, Documents):
        return _attend_documents(attention_mask, query, key, value, scaling, dropout), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def install_documents() -> None:
    """Make :func:`sdpa_or_documents` transformers' ``sdpa`` attention function (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa", sdpa_or_documents)


def packed(position_ids: torch.Tensor) -> bool:
    """Whether any row of ``position_ids`` holds more than one record (a restart at 0)."""
    return bool((position_ids[:, 1:] == 0).any())


def stage_mask(config: Any, hidden: torch.Tensor, position_ids: torch.Tensor, documents: bool = True) -> Any:
    """The mask the decoder layers get for this forward: None (causal fast path, or FA2
    varlen from the position ids), :class:`Documents` (``sdpa`` on a packed batch, unless
    ``documents`` is False: compiled blocks), a flex ``BlockMask``, or a dense boolean mask
    (see the module docstring). Built once per forward and shared by every layer."""
    from transformers.masking_utils import create_causal_mask

    if documents and config._attn_implementation == "sdpa" and packed(position_ids):
        install_documents()
        return Documents(position_ids)
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=position_ids)
