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

:func:`install_sampler` also lets a step whose every row is greedy (``top_k=1``: all of one
client's greedy steps, and every step of a greedy workload) skip the processors, the softmax and
the draw altogether: the token is the argmax of the raw logits, which is what the filtered
one-candidate distribution gives and what ``generate(do_sample=False)`` takes (on an exact tie
at the top, the first index, as ``generate`` does, where the filtered draw would pick among the
tied tokens).

:func:`install` swaps the warpers into a ``ContinuousBatchingManager`` before its batch
processor is built; both are for the eager plan only (their row selection is data-dependent,
which neither a compiled step nor a CUDA graph can hold).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper,
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


class GreedySteps:
    """A ``ModelRunner``'s processor list that a step of greedy rows only skips.

    Called as the list is (``(input_ids, scores, args)``, one ``args`` row per per-request
    processor, in list order); when every row's ``top_k`` is 1 it returns the scores untouched
    and sets :attr:`all_greedy` for the sampling step that follows in the same forward.
    """

    def __init__(self, processors: Any, top_k_arg: int) -> None:
        self.processors = processors
        self.top_k_arg = top_k_arg
        self.all_greedy = False

    def __getattr__(self, name: str) -> Any:  # do_processing, prepare_tensor_args, ...: the list's own
        return getattr(self.processors, name)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        top_k = args[self.top_k_arg, : scores.size(0)]
        self.all_greedy = bool((top_k == 1).all())
        if self.all_greedy:
            return scores
        return self.processors(input_ids, scores, args)


def _top_k_arg(processors: Any) -> int | None:
    """Row of the processors' argument tensor that holds ``top_k``; None without a per-request
    top-k, or with any processor besides temperature, top-k and top-p (which leave a ``top_k=1``
    row's argmax as it is: another processor, a repetition penalty say, could move it)."""
    arg = None
    for i, processor in enumerate(processors.logits_processor):
        if isinstance(processor, ContinuousBatchingTopKLogitsWarper):
            arg = i
        elif not isinstance(processor, (ContinuousBatchingTemperatureLogitsWarper, ContinuousBatchingTopPLogitsWarper)):
            return None
    return arg


def install_sampler(model_runner: Any) -> bool:
    """Replace a ``ModelRunner``'s sampling step by :func:`sample_rows` (sampling mode, no
    log-probabilities: what the engine runs), with :class:`GreedySteps` in front of its
    processors when they have a per-request top-k; returns whether it replaced the step."""
    if not model_runner.do_sample or model_runner.return_logprobs:
        return False
    processors = getattr(model_runner, "logit_processor", None)
    arg = _top_k_arg(processors) if processors is not None and processors.do_processing else None
    greedy = GreedySteps(processors, arg) if arg is not None else None
    if greedy is not None:
        model_runner.logit_processor = greedy

    def _sample(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        if greedy is not None and greedy.all_greedy:
            next_tokens = scores[0].argmax(dim=-1)
        else:
            next_tokens = sample_rows(torch.softmax(scores[0], dim=-1))
        output_ids[0, : next_tokens.size(0)].copy_(next_tokens)

    model_runner._sample = _sample
    return True
