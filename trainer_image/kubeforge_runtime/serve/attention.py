"""Per-request attention for the continuous engine's paged batches (CPU, eager plan).

transformers' paged path with ``sdpa`` hands every layer the queries of the whole batch
(``[1, heads, q_tokens, dim]``) and the keys and values of *every* request concatenated
(``[1, kv_heads, k_tokens, dim]``, read back from the paged cache), plus a block-diagonal
``[q_tokens, k_tokens]`` mask built in Python each step. ``sdpa`` then scores each query against
every request's keys and masks all but its own: at 32 decoding requests of ~100 tokens, 32
queries x 3,200 keys per head where 32 x 100 are needed, with the keys repeated per head (a
mask rules out ``sdpa``'s grouped-query path on CPU) - ~17 % of a decoding step at 32 clients
(py-spy, README "Serving").

:func:`paged_attention` is registered through transformers' attention interface under
:data:`NAME` and attends each request's queries to its own keys only, from the cumulative
lengths (``cu_seq_lens_q`` / ``cu_seq_lens_k``) the batch carries anyway:

* decoding rows (one query each) in one ``sdpa`` call: their keys gathered into a
  ``[rows, kv_heads, longest, dim]`` batch, right-padded and masked, the query heads grouped
  per key head (``[rows, kv_heads, heads_per_kv, dim]``), so no key is repeated;
* prefill rows (several queries) one request at a time: causal ``sdpa`` on the request's own
  slices, bottom-right aligned when part of the prompt is already cached (prefix cache,
  chunked prefill).

On a decoding-only step (every request has one query: most steps) the keys are read from the
paged cache straight into that padded batch: :func:`install_cache_reads` wraps the cache's
``update`` so that it writes the new keys and values as before but, instead of first reading
every request's keys back into one concatenated tensor (which the batch then gathers again),
reads them once through the composed index, and tells the attention so (``kf_decode_batch``).

The causal rule is flash attention's varlen one: query ``i`` of a request with ``q`` queries
and ``k`` keys sees keys ``0 .. k - q + i``. With this implementation selected the manager
builds no mask at all (it builds one only for ``sdpa`` and ``paged|eager``).
:func:`install` switches a ``ContinuousBatchingManager``'s model to it before the batch
processor exists, and leaves the manager's ``stop`` to switch the model back.
"""

from __future__ import annotations

import itertools
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
    padded = kwargs.get("kf_decode_batch")
    if padded is not None:  # keys already read from the cache as [rows x longest] (install_cache_reads)
        return _decode_padded(query, key, value, padded, scaling), None
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


def _right_padded(starts: list[int], lens: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For ``n`` requests whose keys are ``lens[i]`` tokens from ``starts[i]``: the
    ``[n, 1, 1, longest]`` mask of real keys and the ``[n * longest]`` token index that lays
    them out right-padded to the longest (pads repeat the request's last key, masked out).
    The mask is None when no request is padded (one request, or all of one length): ``sdpa``
    then takes its unmasked kernel."""
    length = torch.tensor(lens).unsqueeze(1)
    offset = torch.arange(max(lens)).unsqueeze(0)
    valid = None if min(lens) == max(lens) else (offset < length).view(len(lens), 1, 1, -1)
    index = (torch.tensor(starts).unsqueeze(1) + torch.minimum(offset, length - 1)).flatten()
    return valid, index


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
    valid, gather = _right_padded(starts, lens)
    kb = k.index_select(0, gather).view(n, longest, kv_heads, dim).transpose(1, 2)
    vb = v.index_select(0, gather).view(n, longest, kv_heads, dim).transpose(1, 2)
    contiguous_rows = rows[-1] - rows[0] == n - 1
    index = None if contiguous_rows else torch.tensor(rows)
    qb = q[rows[0] : rows[0] + n] if contiguous_rows else q.index_select(0, index)  # [n, heads, dim]
    qb = qb.reshape(n, kv_heads, group, dim)  # query heads grouped by the key head they read
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid, scale=scaling)
    o = o.reshape(n, kv_heads * group, dim)
    if contiguous_rows:
        out[rows[0] : rows[0] + n] = o
    else:
        out.index_copy_(0, index, o)


def _decode_padded(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padded: DecodeBatch, scaling: float | None
) -> torch.Tensor:
    """Attention of a decoding-only step whose keys arrive as ``[1, kv_heads, rows * longest, dim]``."""
    _, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    kb = key[0].transpose(0, 1).reshape(n, padded.longest, kv_heads, dim).transpose(1, 2)
    vb = value[0].transpose(0, 1).reshape(n, padded.longest, kv_heads, dim).transpose(1, 2)
    qb = query[0].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=padded.valid, scale=scaling)
    return o.reshape(1, n, heads, dim)


class DecodeBatch:
    """Where each decoding request's keys are in the paged cache, right-padded to the longest."""

    def __init__(self, read_index: torch.Tensor, lens: list[int]) -> None:
        self.longest = max(lens)
        starts = [0, *itertools.accumulate(lens[:-1])]  # the requests' keys follow each other in read_index
        self.valid, within = _right_padded(starts, lens)
        self.cache_index = read_index.index_select(0, within)  # [n * longest] rows of the paged cache


def install_cache_reads(cache: Any) -> bool:
    """Wrap ``cache.update`` (our instance) so decoding-only steps read their keys from the cache
    once, padded per request, for :func:`paged_attention`; other steps are unchanged.

    Only for caches whose every layer is full attention (a sliding-window layer reads and writes
    in another order); returns whether it wrapped.
    """
    from transformers.generation.continuous_batching.cache_allocators.full_attention import (
        FullAttentionCacheAllocator,
    )

    if not all(type(a) is FullAttentionCacheAllocator for a in cache.cache_allocators.values()):
        return False
    update = cache.update
    step: list[Any] = [None, None]  # the step's read-index list (same object for every layer), its plan

    def decode_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict[str, Any]):
        reads = kwargs.get("read_index")
        if kwargs.get("block_table") is not None or not reads:
            return update(key_states, value_states, layer_idx, kwargs)
        allocator = cache.layer_to_allocator[layer_idx]
        read_index = reads[allocator.index]
        cu_k = kwargs["cu_seq_lens_k"][allocator.layer_type]
        if step[0] is not reads:  # first layer of a new step: is it decoding only?
            q_lens = _lengths(kwargs["cu_seq_lens_q"])
            plan = None
            if read_index.numel() and q_lens and all(n == 1 for n in q_lens):
                plan = DecodeBatch(read_index, _lengths(cu_k))
            step[0], step[1] = reads, plan
        plan = step[1]
        if plan is None:
            return update(key_states, value_states, layer_idx, kwargs)
        kwargs["cu_seq_lens_k"] = cu_k.to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        k_cache, v_cache = allocator._kv_token_views[layer_idx]
        write_index = kwargs["write_index"][allocator.index]
        k_cache.index_copy_(0, write_index, key_states[0].transpose(0, 1))  # as the allocator writes
        v_cache.index_copy_(0, write_index, value_states[0].transpose(0, 1))
        kwargs["kf_decode_batch"] = plan
        keys = k_cache.index_select(0, plan.cache_index).transpose(0, 1).unsqueeze(0)
        values = v_cache.index_select(0, plan.cache_index).transpose(0, 1).unsqueeze(0)
        return keys, values

    cache.update = decode_update
    return True


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
