"""Per-request attention for the continuous engine's paged batches (CPU, eager plan).

transformers' paged path with ``sdpa`` hands every layer the queries of the whole batch
(``[1, heads, q_tokens, dim]``) and the keys and values of *every* request concatenated
(``[1, kv_heads, k_tokens, dim]``, read back from the paged cache), plus a block-diagonal
``[q_tokens, k_tokens]`` mask built in Python each step. ``sdpa`` then scores each query against
every request's keys and masks all but its own: at 32 decoding requests of ~100 tokens, 32
queries x 3,200 keys per head where 32 x 100 are needed, with the keys repeated per head (a
mask rules out ``sdpa``'s grouped-query path on CPU) - ~17 % of a decoding step at 32 clients
(py-spy, README "Where a decode step went").

:func:`paged_attention` is registered through transformers' attention interface under
:data:`NAME` and attends each request's queries to its own keys only, from the cumulative
lengths (``cu_seq_lens_q`` / ``cu_seq_lens_k``) the batch carries anyway:

* decoding rows (one query each) in one ``sdpa`` call: their keys gathered into a
  ``[rows, kv_heads, longest, dim]`` batch, right-padded and masked, the query heads grouped
  per key head (``[rows, kv_heads, heads_per_kv, dim]``), so no key is repeated;
* prefill rows (several queries) one request at a time: causal ``sdpa`` on the request's own
  slices, bottom-right aligned when part of the prompt is already cached (prefix cache,
  chunked prefill).

The causal rule is flash attention's varlen one: query ``i`` of a request with ``q`` queries
and ``k`` keys sees keys ``0 .. k - q + i``. With this implementation selected the manager
builds no mask at all (it builds one only for ``sdpa`` and ``paged|eager``).
:func:`install` switches a ``ContinuousBatchingManager``'s model to it before the batch
processor exists, and leaves the manager's ``stop`` to switch the model back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "kubeforge_paged_sdpa"


def _lengths(cu_seq_lens: torch.Tensor) -> list[int]:
    bounds = cu_seq_lens.tolist()
    return [b - a for a, b in zip(bounds, bounds[1:])]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, q_tokens, dim]
    key: torch.Tensor,  # [1, kv_heads, k_tokens, dim]
    value: torch.Tensor,  # [1, kv_heads, k_tokens, dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of each request's queries to its own keys; returns ``[1, q_tokens, heads, dim]``."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(f"{NAME} serves continuous-batching steps only (no cu_seq_lens_q/cu_seq_lens_k given)")
    q_lens = _lengths(cu_seq_lens_q)
    k_lens = _lengths(cu_seq_lens_k)
    _, heads, q_tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    q = query[0].transpose(0, 1)  # [q_tokens, heads, dim]
    k = key[0].transpose(0, 1)  # [k_tokens, kv_heads, dim]
    v = value[0].transpose(0, 1)
    out = query.new_empty(q_tokens, heads, dim)

    decode_rows: list[int] = []  # query token of each one-query request
    decode_starts: list[int] = []  # its first key token
    decode_lens: list[int] = []
    q_start = k_start = 0
    for q_len, k_len in zip(q_lens, k_lens):
        if q_len == 1:
            decode_rows.append(q_start)
            decode_starts.append(k_start)
            decode_lens.append(k_len)
        elif q_len > 1:
            qr = q[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, dim]
            kr = k[k_start : k_start + k_len].transpose(0, 1).unsqueeze(0)
            vr = v[k_start : k_start + k_len].transpose(0, 1).unsqueeze(0)
            if k_len == q_len:
                o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scaling, enable_gqa=group > 1)
            else:  # part of the request is cached: query i sees keys 0 .. k_len - q_len + i
                rows = torch.arange(q_len).unsqueeze(1) + (k_len - q_len)
                mask = torch.arange(k_len).unsqueeze(0) <= rows
                o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scaling, enable_gqa=group > 1)
            out[q_start : q_start + q_len] = o[0].transpose(0, 1)
        q_start += q_len
        k_start += k_len

    if decode_rows:
        _decode(q, k, v, out, decode_rows, decode_starts, decode_lens, group, scaling)
    return out.unsqueeze(0), None


def _decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    rows: list[int],
    starts: list[int],
    lens: list[int],
    group: int,
    scaling: float | None,
) -> None:
    """One ``sdpa`` call for every one-query request: keys right-padded to the longest."""
    n = len(rows)
    longest = max(lens)
    kv_heads, dim = k.shape[1], k.shape[2]
    start = torch.tensor(starts).unsqueeze(1)
    length = torch.tensor(lens).unsqueeze(1)
    offset = torch.arange(longest).unsqueeze(0)
    valid = offset < length  # [n, longest]
    gather = (start + torch.minimum(offset, length - 1)).flatten()  # pads repeat the last key
    kb = k.index_select(0, gather).view(n, longest, kv_heads, dim).transpose(1, 2)
    vb = v.index_select(0, gather).view(n, longest, kv_heads, dim).transpose(1, 2)
    contiguous_rows = rows[-1] - rows[0] == n - 1
    index = None if contiguous_rows else torch.tensor(rows)
    qb = q[rows[0] : rows[0] + n] if contiguous_rows else q.index_select(0, index)  # [n, heads, dim]
    qb = qb.reshape(n, kv_heads, group, dim)  # query heads grouped by the key head they read
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid.view(n, 1, 1, longest), scale=scaling)
    o = o.reshape(n, kv_heads * group, dim)
    if contiguous_rows:
        out[rows[0] : rows[0] + n] = o
    else:
        out.index_copy_(0, index, o)


def register() -> None:
    """Make :data:`NAME` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)


def install(manager: Any) -> bool:
    """Switch the manager's model from ``sdpa`` to :func:`paged_attention`; returns whether it did.

    Must run before the manager builds its batch processor (``warmup``/``start``), which
    decides then whether to build masks. Only ``sdpa`` is replaced: flash implementations
    already attend per request, and ``paged|eager`` is kept as chosen.
    """
    model = manager.model
    current = model.config._attn_implementation
    if current != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    if manager._original_attn_impl is None:  # the manager's stop() restores this
        manager._original_attn_impl = current
    return True
