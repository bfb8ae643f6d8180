"""Per-request top-k and top-p for the continuous engine that cost nothing for rows that do not filter.

transformers' continuous-batching warpers (``cb_logits_processors``) apply top-k and top-p to
every row of the batch with a full descending sort of the vocabulary each, whatever the
row's values: with SmolLM2's 49,152-token vocabulary and 32 running requests that is two
sorts of 1.6 M scores per decoding step (with the draw below: 310 ms per step for 32 greedy
rows, 24 ms for one, on the loaded 2-core development machine; ``benchmarks/bench_sampling.py``,
README "Measured"). The engine expresses greedy as
``top_k=1`` and "no top-k" as a ``top_k`` larger than the vocabulary, and most requests
have ``top_p=1``, so almost all of that work filters nothing.

These subclasses keep the manager's per-request arguments (same ``supported_kwargs``, same
tensor layout, so ``add_request(top_k=..., top_p=...)`` is unchanged) and compute the same
filter, restricted to the rows it can change:

* top-k: rows with ``k`` below the vocabulary size only, with ``torch.topk`` of the largest
  ``k`` among them instead of a full sort (a batch of greedy rows costs one ``max`` per row);
  ties at the threshold are kept, as transformers does;
* top-p: rows with ``top_p < 1`` only (for ``top_p = 1`` transformers removes only tokens
  whose probability is already 0, which sampling never picks).

The manager then samples every row with ``softmax`` and ``torch.multinomial`` over the whole
vocabulary, a cumulative pass per row. :func:`install_sampler` replaces that step
with one that takes the argmax of rows left with a single candidate (greedy requests: their
probability is exactly 1) and samples the other rows with the exponential-race form of the
same distribution (``argmax(p / E)``, ``E ~ Exp(1)``, as vLLM and gpt-fast sample).

:func:`install` swaps the warpers into a ``ContinuousBatchingManager`` before its batch
processor is built; both are for the eager plan only (their row selection is data-dependent,
which neither a compiled step nor a CUDA graph can hold).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)


class RowwiseTopK(ContinuousBatchingTopKLogitsWarper):
    """Top-k per request, on the rows whose ``k`` filters anything."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        vocab = scores.size(-1)
        top_k = tensor_arg[: scores.size(0)].to(torch.int64)
        rows = (top_k < vocab).nonzero().squeeze(1)
        if rows.numel() == 0:
            return scores
        k = top_k[rows].clamp(min=1)
        picked = scores[rows]
        largest = torch.topk(picked, int(k.max()), dim=-1, sorted=True).values
        thresholds = largest.gather(-1, (k - 1).unsqueeze(-1))
        out = scores.clone()
        out[rows] = picked.masked_fill(picked < thresholds, self.filter_value)
        return out


class RowwiseTopP(ContinuousBatchingTopPLogitsWarper):
    """Top-p (nucleus) per request, on the rows with ``top_p < 1``."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        rows = (top_p < 1.0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return scores
        out = scores.clone()
        out[rows] = super().__call__(scores[rows], tensor_arg[rows])
        return out


def _rowwise(processor: Any) -> Any:
    for base, fast in ((ContinuousBatchingTopKLogitsWarper, RowwiseTopK), (ContinuousBatchingTopPLogitsWarper, RowwiseTopP)):
        if type(processor) is base:
            replacement = fast.__new__(fast)
            replacement.__dict__.update(processor.__dict__)
            return replacement
    return processor


def install(manager: Any) -> int:
    """Replace the manager's per-request top-k/top-p warpers by the row-wise ones; returns how many."""
    processors = manager.logit_processor.logits_processor
    swapped = 0
    for i, processor in enumerate(processors):
        fast = _rowwise(processor)
        if fast is not processor:
            processors[i] = fast
            swapped += 1
    return swapped


def sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ([rows, vocab], rows summing to 1), drawn from that row.

    A row whose largest probability is 1 has one candidate: its argmax, with no random draw.
    The others race exponential clocks (``argmax(p / E)``), which picks token ``i`` with
    probability ``p[i]``, in one pass instead of ``multinomial``'s cumulative sums.
    """
    best_p, best = probs.max(dim=-1)
    rows = (best_p < 1.0).nonzero().squeeze(1)
    if rows.numel():
        picked = probs[rows]
        clocks = torch.empty_like(picked).exponential_()
        best[rows] = (picked / clocks).argmax(dim=-1)
    return best


def install_sampler(model_runner: Any) -> bool:
    """Replace a ``ModelRunner``'s sampling step by :func:`sample_rows` (sampling mode, no
    log-probabilities: what the engine runs); returns whether it did."""
    if not model_runner.do_sample or model_runner.return_logprobs:
        return False

    def _sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        next_tokens = sample_rows(torch.softmax(scores[0], dim=-1))
        output_ids[0, : next_tokens.size(0)].copy_(next_tokens)

    model_runner._sample = _sample
    return True
